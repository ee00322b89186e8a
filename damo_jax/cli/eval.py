"""``damo-jax eval``: COCO mAP of a trained, official or EXPORTED model on a dataset.

examples:
  damo-jax eval --checkpoint runs/demo --data demo
  damo-jax eval --config s --weights damoyolo_s.pth --data coco:/data/coco --json-out dets.json
  damo-jax eval --config s --onnx s.onnx --data coco:/data/coco        # the file you deploy
  damo-jax eval --checkpoint runs/demo --openvino demo.xml --data demo  # run's names/thresholds
  damo-jax eval --config s --weights s.pth --data coco:/c --config.test.conf_thre=0.001

The exported files get exactly the same pre-processing (stretch resize, RGB 0-255) and the same
NMS as the Flax model, so their mAP is directly comparable. An --end2end file is scored with the
NMS inside it (the mAP of what you deploy): its thresholds and its topk K, which caps the
detections per image at K (logged); --conf above its score threshold and --max-dets up to K filter
its rows, an --iou other than its own, a lower --conf, a larger --max-dets or --pre-nms-topk is an
error.

The model's label k is its class name k. Data with the same class names in another order gets the
labels mapped by name (:func:`damo_jax.evaluation.evaluator.category_remap`, one info line); other
names are matched by index (a warning); a different class count is an error.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from damo_jax.cli import common
from damo_jax.config import PRE_NMS_TOPK
from damo_jax.errors import ConfigError, InputPathError

log = logging.getLogger("damo_jax.cli.eval")
PROG = "damo-jax eval"


def add_arguments(p) -> None:
    common.add_model_source(p, ("weights", "onnx", "openvino", "checkpoint"),
                            run_config_for_exports=True, config_help=(
                                "model config name or .py path, or a training run directory "
                                "(needed with --weights; optional with --onnx/--openvino files "
                                "damo-jax exported: their metadata holds it)"))
    common.add_data(p, help_extra=" (default: the config's data.val / data.train)")
    p.add_argument("--split", default=None, help="dataset split (default: config data.val_split)")
    common.add_img_size(p, "test size (default config test.image_size)")
    p.add_argument("--batch-size", type=int, help="images per batch (default config test.batch_size)")
    p.add_argument("--conf", type=float, help="score threshold (default config test.conf_thre)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default config test.iou_thre)")
    p.add_argument("--max-dets", type=int, help="detections kept per image (default 500)")
    p.add_argument("--pre-nms-topk", type=int, help=f"candidates per image before NMS (default: the "
                   f"config's test.pre_nms_topk, {PRE_NMS_TOPK})")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fast", dest="use_fast", action="store_true", default=True,
                       help="faster-coco-eval (default)")
    group.add_argument("--pycocotools", dest="use_fast", action="store_false", help="pycocotools")
    p.add_argument("--no-fuse", action="store_true",
                   help="evaluate without folding RepConvs and BNs (the train graph; the "
                        "re-parameterised graph of a deploy state dict given to --weights)")
    p.add_argument("--json-out", help="write the detections (COCO results format) to this file")
    p.add_argument("--stats-out", help="write the 12 stats as JSON to this file")
    p.add_argument("--out", help="report folder: per-class AP/AP50 table (per_class.json/.md, also "
                   "printed), pr_curves.png, confusion_matrix.png/.json")
    p.add_argument("--per-class", action="store_true",
                   help="print the per-class AP / AP50 table (always printed with --out)")
    p.add_argument("--save-json", action="store_true",
                   help="with --out: also the detections in COCO results format (detections.json)")
    p.add_argument("--cm-conf", type=float, default=0.25,
                   help="confusion matrix: score threshold (default 0.25)")
    p.add_argument("--cm-iou", type=float, default=0.5,
                   help="confusion matrix: IoU to match a ground-truth box (default 0.5)")
    from damo_jax.inference.tiling import add_tile_arguments
    add_tile_arguments(p)
    p.add_argument("--no-progress", action="store_true")


def build_parser(prog: str = PROG):
    return common.command_parser(prog, __doc__, add_arguments)


TEST_FLAGS = (("batch_size", "batch_size"), ("conf", "conf_thre"), ("iou", "iou_thre"),
              ("max_dets", "max_dets"), ("pre_nms_topk", "pre_nms_topk"))


def test_overrides(args, overrides=()) -> list[str]:
    """eval flags as ``test.*`` overrides (one mechanism with ``--config.test.KEY=V``); a flag
    and an override of the same key is a ConfigError."""
    common.refuse_flag_and_override(
        overrides, ("--img-size", args.img_size, ("test.image_size",)),
        *((f"--{flag.replace('_', '-')}", getattr(args, flag, None), (f"test.{key}",))
          for flag, key in TEST_FLAGS))
    size = common.img_size(args.img_size)
    out = common.override("test.image_size", size)
    for flag, key in TEST_FLAGS:
        out += common.override(f"test.{key}", getattr(args, flag, None))
    return out


def run(args, overrides) -> dict:
    from damo_jax.data_pipelines import format_summary, open_dataset
    from damo_jax.evaluation.coco import print_coco_table
    from damo_jax.evaluation.evaluator import (apply_remap, check_num_classes, names_remap,
                                               run_detections, score_detections)

    from damo_jax.inference.tiling import check_tile_arguments
    if args.data:
        common.check_data_spec(args.data)
    check_tile_arguments(args)
    from damo_jax.inference.pipeline import check_detection_options
    check_detection_options(conf=args.conf, iou=args.iou, max_dets=args.max_dets,
                            pre_nms_topk=args.pre_nms_topk, batch_size=args.batch_size)
    if args.no_fuse and (args.onnx or args.openvino):
        raise ConfigError("--no-fuse: evaluates the JAX train graph (--checkpoint / --weights); an "
                          "exported file is already fused")
    if args.save_json and not args.out:
        raise ConfigError("--save-json writes into the report folder: give --out DIR")
    inputs = {"--onnx": args.onnx, "--openvino": args.openvino, "--weights": args.weights,
              "--openvino weights": args.openvino and str(Path(args.openvino).with_suffix(".bin"))}
    for flag, path in (("--json-out", args.json_out), ("--stats-out", args.stats_out)):
        if path:                       # unwritable outputs fail now, not after the evaluation
            common.output_file(path, flag, inputs=inputs)
            common.check_not_in_data(path, flag, args.data)
    if args.json_out and args.stats_out and common.same_path(args.json_out, args.stats_out):
        raise ConfigError(f"--json-out and --stats-out both name {args.json_out}: one would replace "
                          f"the other, give two file names")
    from damo_jax.errors import is_probability
    for flag, value in (("--cm-conf", args.cm_conf), ("--cm-iou", args.cm_iou)):
        if not is_probability(value) or (flag == "--cm-iou" and value == 0):
            raise ConfigError(f"{flag} {value}: the confusion matrix's "
                              + ("score threshold must be a number in [0, 1]" if flag == "--cm-conf"
                                 else "IoU must be a number in (0, 1]"))
    if args.out:
        common.output_dir(args.out, "--out")
    loaded = common.load_model_from_args(args, overrides + test_overrides(args, overrides),
                                         fuse=not getattr(args, "no_fuse", False))
    cfg = loaded.cfg
    common.check_end2end_flags(loaded.backend, args, overrides, cfg.test)
    e2e = getattr(loaded.backend, "end2end", None)
    if e2e is not None:
        from damo_jax.inference.pipeline import end2end_params, nms_params
        used = end2end_params(loaded.backend, nms_params(cfg.test))
        then = ", ".join(f"{what} {mine:g}" for what, mine, its in (
            ("score threshold", used.conf, e2e.conf_thre), ("max dets", used.max_dets, e2e.topk))
            if its is not None and mine != its)
        log.info("%s is an --end2end export: the mAP is that of its in-graph NMS (%s), which keeps "
                 "at most %s detections per image%s", loaded.source, e2e.describe(),
                 "?" if e2e.topk is None else e2e.topk,
                 f"; then filtered by {then}" if then else "")
    if loaded.input_hw is not None and args.img_size is None:
        cfg.test.image_size = tuple(loaded.input_hw)   # an exported file has one input size
    spec = args.data or cfg.data.val or cfg.data.train
    split = args.split or cfg.data.val_split
    for flag, path in (("--json-out", args.json_out), ("--stats-out", args.stats_out)):
        if path and not args.data:       # the config's dataset: known only now
            common.check_not_in_data(path, flag, spec)
    dataset = open_dataset(spec, split)
    log.info("%s", format_summary(dataset, "eval data"))
    check_num_classes(cfg, dataset, where=PROG)
    by_name = names_remap(loaded.class_names, dataset, warn_other=True)
    log.info("evaluating %s (%s %s) on %s (%s, %d images) at %s", cfg.model.name, loaded.kind,
             loaded.source, spec, split, len(dataset), tuple(cfg.test.image_size))
    start = time.time()
    scored: set = set()
    if args.tile:
        from damo_jax.inference.detector import Detector
        from damo_jax.inference.tiling import run_tiled_detections
        detections = run_tiled_detections(
            Detector.from_loaded(loaded), dataset, tile=args.tile, overlap=args.overlap,
            full_image=args.tile_full_image, scored_ids=scored, progress=not args.no_progress)
    else:
        detections = run_detections(loaded.backend, dataset, cfg, progress=not args.no_progress,
                                    scored_ids=scored)
    detections = apply_remap(detections, by_name)
    reports = bool(args.out or args.per_class)    # they read the same COCOeval run's arrays
    result = score_detections(dataset, detections, scored, use_fast=args.use_fast, details=reports)
    stats, details = result if reports else (result, None)
    log.info("%d detections on %d images in %.1f s; %d images scored, %d skipped (unreadable)",
             len(detections), len(dataset), time.time() - start, stats["images_scored"],
             stats["images_skipped"])
    print_coco_table(stats)
    print(json.dumps({k: round(v, 5) for k, v in stats.items()}))
    unwritten = []                     # checked before the evaluation, but a disk can fill up
    for flag, path, payload, kw in (("--json-out", args.json_out, detections, {}),
                                    ("--stats-out", args.stats_out, stats, {"indent": 1})):
        if path:
            try:
                with open(path, "w") as f:
                    json.dump(payload, f, **kw)
            except OSError as e:
                unwritten.append(f"{flag} {path}: cannot write ({e.strerror or e})")
    if reports:
        from damo_jax.evaluation.coco import restrict_to_images
        from damo_jax.evaluation.reports import (format_per_class_table, per_class_rows,
                                                 write_eval_reports)
        gt = restrict_to_images(dataset.to_coco_dict(), scored)
        if args.out:             # prints the table too
            report = write_eval_reports(args.out, gt, detections, class_names=dataset.class_names,
                                        conf=args.cm_conf, iou=args.cm_iou, use_fast=args.use_fast,
                                        save_json=args.save_json, details=details)
            log.info("reports in %s: %s", args.out, ", ".join(sorted(report["files"])))
        else:
            print(format_per_class_table(per_class_rows(gt, detections, dataset.class_names, details)))
    if unwritten:
        raise InputPathError("; ".join(unwritten) + " (the stats are printed above)")
    return stats


def main(argv=None, prog: str = PROG) -> dict:
    return common.run_command(build_parser, run, argv, prog)
