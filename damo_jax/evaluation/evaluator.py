"""COCO evaluation of a detector (official protocol, SPEC §9.4) and the ``damo_jax.evaluation.evaluator`` CLI.

Protocol: stretch-resize every image to ``cfg.test.image_size`` (no letterbox), RGB 0–255 float,
one jitted forward + :func:`damo_jax.ops.nms.multiclass_nms` (``cfg.test`` conf / iou / max_dets /
pre_nms_topk), boxes mapped back with independent x / y factors, COCO bbox evaluation.

CLI::

    python -m damo_jax.evaluation.evaluator --config s --weights damoyolo_s.pth --data coco:/data/coco
    python -m damo_jax.evaluation.evaluator --checkpoint runs/s_demo --data demo --json-out results.json
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from damo_jax.evaluation.coco import coco_evaluate, detections_to_coco, print_coco_table
from damo_jax.ops.nms import iou_threshold_f32, multiclass_nms

log = logging.getLogger("damo_jax.evaluation.evaluator")


@functools.partial(jax.jit, static_argnames=("model", "max_dets", "pre_nms_topk"))
def detect_batch(model, variables, images, conf_thre, iou_thre, *, max_dets=500, pre_nms_topk=1000):
    """Forward + NMS in one jit. images (B,H,W,3) uint8 or float RGB 0–255 -> NMS dict.

    ``iou_thre`` should come through :func:`damo_jax.ops.nms.iou_threshold_f32` (traced here).
    """
    out = model.apply(variables, images.astype(jnp.float32), train=False)
    return multiclass_nms(out["scores"], out["boxes"], conf_thre=conf_thre, iou_thre=iou_thre,
                          max_dets=max_dets, pre_nms_topk=pre_nms_topk)


def _test_value(cfg, key, default):
    return cfg.test[key] if "test" in cfg and key in cfg.test else default


def check_num_classes(cfg, dataset, where: str = "evaluate") -> None:
    """Clear error when the model's class count differs from the dataset's."""
    model_classes = int(cfg.model.head.num_classes)
    data_classes = len(dataset.class_names)
    if model_classes != data_classes:
        raise ValueError(
            f"{where}: the model predicts {model_classes} classes (config model.head.num_classes) "
            f"but the dataset has {data_classes} classes ({', '.join(dataset.class_names[:5])}...); "
            "evaluate on a dataset with the classes the weights were trained on")


def _mesh_shardings(batch_size: int):
    """(data sharding, replicated sharding) over this process's devices, or (None, None) when
    there is one device or ``batch_size`` does not split evenly. (Multi-host: every process
    evaluates the whole dataset on its own devices.)"""
    devices = jax.local_devices()
    if len(devices) < 2 or batch_size % len(devices):
        return None, None
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def collect_detections(model, variables, dataset, cfg, *, batch_size=None, progress=True):
    """Run the detector over ``dataset`` -> list of COCO result dicts (original pixels, source ids)."""
    from damo_jax.data_pipelines import eval_batches

    check_num_classes(cfg, dataset)
    image_hw = tuple(int(v) for v in _test_value(cfg, "image_size", cfg.model.image_size))
    if image_hw[0] % 32 or image_hw[1] % 32:
        raise ValueError(f"evaluate: test image size {image_hw} must be multiples of 32")
    batch_size = int(batch_size or _test_value(cfg, "batch_size", 8))
    conf = float(_test_value(cfg, "conf_thre", 0.05))
    iou = iou_threshold_f32(float(_test_value(cfg, "iou_thre", 0.7)))
    nms_kw = dict(max_dets=int(_test_value(cfg, "max_dets", 500)),
                  pre_nms_topk=int(_test_value(cfg, "pre_nms_topk", 1000)))
    data_sharding, replicated = _mesh_shardings(batch_size)
    if replicated is not None:
        variables = jax.device_put(variables, replicated)
    workers = int(cfg.data.get("workers", 0)) if "data" in cfg else 0
    batches = eval_batches(dataset, image_hw, batch_size, workers=workers)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=math.ceil(len(dataset) / batch_size), desc="eval", unit="batch")
    results, in_flight = [], None

    def finish(out, batch):  # blocks on the device result of one batch
        results.extend(detections_to_coco(jax.device_get(out), batch["image_ids"], batch["orig_sizes"],
                                          image_hw, dataset.category_ids, valid=batch["valid"]))

    for batch in batches:
        images = batch["images"]
        if data_sharding is not None:
            images = jax.device_put(images, data_sharding)
        out = detect_batch(model, variables, images, conf, iou, **nms_kw)  # async dispatch
        if in_flight is not None:
            finish(*in_flight)  # the previous batch, while this one runs on the device
        in_flight = (out, batch)
    if in_flight is not None:
        finish(*in_flight)
    return results


def evaluate(model, variables, dataset, cfg, *, batch_size=None, progress=True, use_fast=True) -> dict:
    """COCO bbox stats (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) of a model.

    ``model``/``variables``: a ``build_model`` module (train or deploy graph) and its variables;
    ``dataset``: a ``data_pipelines.open_dataset`` dataset; ``cfg``: the config (``test`` section).
    """
    detections = collect_detections(model, variables, dataset, cfg, batch_size=batch_size,
                                    progress=progress)
    return coco_evaluate(dataset.to_coco_dict(), detections, use_fast=use_fast)


# ----------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m damo_jax.evaluation.evaluator", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training checkpoint directory (Orbax, EMA weights)")
    src.add_argument("--weights", help="official .pth or converted .npz (needs --config)")
    p.add_argument("--config", help="model config name (t, s, m, l, ns, nm, nl, n) or path")
    p.add_argument("--data", help="dataset spec (demo, coco:/path, yolo:/path/data.yaml, voc:/path, "
                   "tfds:coco/2017); default: the config's data.val / data.train")
    p.add_argument("--split", default=None, help="dataset split (default: config data.val_split)")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="test size (multiples of 32)")
    p.add_argument("--batch-size", type=int, help="images per batch (default config test.batch_size)")
    p.add_argument("--conf", type=float, help="score threshold (default config test.conf_thre)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default config test.iou_thre)")
    p.add_argument("--max-dets", type=int, help="detections kept per image (default 500)")
    p.add_argument("--pre-nms-topk", type=int, help="candidates per image before NMS (default 1000)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fast", dest="use_fast", action="store_true", default=True,
                       help="faster-coco-eval (default)")
    group.add_argument("--pycocotools", dest="use_fast", action="store_false", help="pycocotools")
    p.add_argument("--no-fuse", action="store_true", help="evaluate the train graph (no RepConv/BN fusion)")
    p.add_argument("--json-out", help="write the detections (COCO results format) to this file")
    p.add_argument("--stats-out", help="write the 12 stats as JSON to this file")
    p.add_argument("--no-progress", action="store_true")
    return p


def apply_test_overrides(cfg, args) -> None:
    if args.img_size:
        cfg.test.image_size = tuple(args.img_size)
    for flag, key in (("batch_size", "batch_size"), ("conf", "conf_thre"), ("iou", "iou_thre"),
                      ("max_dets", "max_dets"), ("pre_nms_topk", "pre_nms_topk")):
        value = getattr(args, flag)
        if value is not None:
            cfg.test[key] = value


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("damo_jax").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    from damo_jax.inference.detector import load_jax_model
    from damo_jax.data_pipelines import open_dataset

    try:
        cfg, model, variables, class_names = load_jax_model(
            config=args.config, checkpoint=args.checkpoint, weights=args.weights, fuse=not args.no_fuse)
    except (ValueError, FileNotFoundError, KeyError) as e:
        sys.exit(f"damo_jax.evaluation.evaluator: {e}")
    apply_test_overrides(cfg, args)
    spec = args.data or cfg.data.val or cfg.data.train
    split = args.split or cfg.data.val_split
    try:
        dataset = open_dataset(spec, split)
        check_num_classes(cfg, dataset, where="damo_jax.evaluation.evaluator")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"damo_jax.evaluation.evaluator: {e}" if not str(e).startswith("damo_jax.evaluation.evaluator") else str(e))
    if tuple(dataset.class_names) != tuple(class_names):
        log.warning("class names of the weights and of the dataset differ (same count %d); "
                    "labels are matched by index", len(class_names))
    log.info("evaluating %s on %s (%s, %d images) at %s", cfg.model.name, spec, split, len(dataset),
             tuple(cfg.test.image_size))
    start = time.time()
    detections = collect_detections(model, variables, dataset, cfg, progress=not args.no_progress)
    stats = coco_evaluate(dataset.to_coco_dict(), detections, use_fast=args.use_fast)
    log.info("%d detections on %d images in %.1f s", len(detections), len(dataset), time.time() - start)
    print_coco_table(stats)
    print(json.dumps({k: round(v, 5) for k, v in stats.items()}))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(detections, f)
    if args.stats_out:
        with open(args.stats_out, "w") as f:
            json.dump(stats, f, indent=1)
    return stats


if __name__ == "__main__":
    main()
