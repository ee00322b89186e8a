"""COCO evaluation of a detector (official protocol, SPEC §9.4).

Protocol: stretch-resize every image to ``cfg.test.image_size`` (no letterbox), RGB 0–255 float,
forward + :func:`damo_jax.ops.nms.multiclass_nms` (``cfg.test`` conf / iou / max_dets /
pre_nms_topk) through :mod:`damo_jax.inference.pipeline` (the same path as predict and
``Detector``), boxes mapped back with independent x / y factors, COCO bbox evaluation.

Any backend can be scored: the Flax model (:func:`evaluate` / :func:`collect_detections`) or an
exported ONNX / OpenVINO file (:func:`evaluate_backend`; ``damo-jax eval --onnx FILE``). An
``--end2end`` file is scored with its in-graph NMS (its IoU threshold and K; ``cfg.test`` conf /
max_dets filter its rows: :func:`damo_jax.inference.pipeline.end2end_params`).
The command line is ``damo-jax eval`` (:mod:`damo_jax.cli.eval`).
"""
from __future__ import annotations

import logging
import math

import jax
import numpy as np

from damo_jax.evaluation.coco import coco_evaluate, detections_to_coco
from damo_jax.inference.pipeline import JaxBackend, detect, end2end_params, nms_params

log = logging.getLogger("damo_jax.evaluation.evaluator")


def check_num_classes(cfg, dataset, where: str = "evaluate") -> None:
    """Clear error when the model's class count differs from the dataset's."""
    from damo_jax.errors import ConfigError
    model_classes = int(cfg.model.head.num_classes)
    data_classes = len(dataset.class_names)
    if model_classes != data_classes:
        raise ConfigError(
            f"{where}: the model predicts {model_classes} classes (config model.head.num_classes) "
            f"but the dataset has {data_classes} classes ({', '.join(dataset.class_names[:5])}...); "
            "evaluate on a dataset with the classes the weights were trained on")


def test_image_size(cfg) -> tuple[int, int]:
    """(H, W) evaluation size: ``cfg.test.image_size`` (else ``model.image_size``), checked."""
    from damo_jax.config import config_value
    from damo_jax.ops.boxes import check_image_size
    size = config_value(cfg.get("test"), "image_size", cfg.model.image_size)
    return check_image_size(size, "evaluate: test.image_size")


def resolve_inputs(cfg, dataset, batch_size=None):
    """(cfg, dataset) of the evaluation functions: ``cfg`` may be a ConfigDict or a config name /
    path, ``dataset`` an opened dataset or a data spec (opened at ``cfg.data.val_split``). The
    config is checked (:func:`damo_jax.config.validate_config`: thresholds, sizes) and
    ``batch_size`` must be None or an integer >= 1 (ConfigError naming the value)."""
    import os

    from damo_jax.config import config_value, load_config, validate_config
    from damo_jax.errors import ConfigError
    if isinstance(cfg, (str, os.PathLike)):
        cfg = load_config(cfg)
    validate_config(cfg, where="evaluate: config")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise ConfigError(f"evaluate: batch_size={batch_size!r} must be an integer >= 1 "
                          f"(or None: the config's test.batch_size)")
    if isinstance(dataset, (str, os.PathLike)):
        from damo_jax.data_pipelines import open_dataset
        dataset = open_dataset(str(dataset), config_value(cfg.get("data"), "val_split", "val"))
    return cfg, dataset


def _mesh_shardings(batch_size: int):
    """(data sharding, replicated sharding) over this process's devices, or (None, None) when
    there is one device or ``batch_size`` does not split evenly. (Multi-host runs go through
    :mod:`damo_jax.evaluation.multiprocess` instead.)"""
    from damo_jax.runtime import make_mesh
    devices = jax.local_devices()
    if len(devices) < 2 or batch_size % len(devices):
        return None, None
    mesh = make_mesh(devices)
    return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")),
            jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def run_detections(backend, dataset, cfg, *, batch_size=None, progress=True,
                   scored_ids: set | None = None) -> list[dict]:
    """Run any backend over ``dataset`` -> list of COCO result dicts (original pixels, source ids).

    ``backend``: a :class:`~damo_jax.inference.pipeline.JaxBackend` (sharded over local devices
    when there are several) or an exported-file backend (``LoadedModel.backend``).
    ``scored_ids``: a set that receives the ids of the images actually run (unreadable images are
    skipped and logged by ``eval_batches``; :func:`score_detections` scores only these).
    """
    from damo_jax.config import config_value
    from damo_jax.data_pipelines import eval_batches

    cfg, dataset = resolve_inputs(cfg, dataset, batch_size)
    check_num_classes(cfg, dataset)
    image_hw = test_image_size(cfg)
    fixed = getattr(backend, "input_hw", None)
    if fixed is not None and tuple(fixed) != image_hw:
        from damo_jax.errors import ConfigError
        raise ConfigError(f"evaluate: the exported model takes {tuple(fixed)} inputs but "
                          f"test.image_size is {image_hw} (--img-size)")
    test = cfg.get("test")
    batch_size = int(batch_size or config_value(test, "batch_size", 8))
    params = end2end_params(backend, nms_params(test))   # an --end2end file: its NMS's values
    if isinstance(backend, JaxBackend) and jax.process_count() > 1:   # multi-host: split + gather
        from damo_jax.evaluation.multiprocess import run_detections_global
        return run_detections_global(backend, dataset, image_hw, batch_size, params, progress=progress,
                                     workers=int(config_value(cfg.get("data"), "workers", 0)),
                                     scored_ids=scored_ids)
    data_sharding = None
    if isinstance(backend, JaxBackend):
        data_sharding, replicated = _mesh_shardings(batch_size)
        if replicated is not None:
            backend = JaxBackend(backend.model, jax.device_put(backend.variables, replicated))
    workers = int(config_value(cfg.get("data"), "workers", 0))
    batches = eval_batches(dataset, image_hw, batch_size, workers=workers)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=math.ceil(len(dataset) / batch_size), desc="eval", unit="batch")
    results, in_flight, capped = [], None, []

    def finish(out, batch):  # blocks on the device result of one batch
        if scored_ids is not None:
            scored_ids.update(batch["image_ids"][batch["valid"]].tolist())
        out = jax.device_get(out)
        capped.extend(over_candidate_cap(out, batch["valid"], params))
        results.extend(detections_to_coco(out, batch["image_ids"], batch["orig_sizes"],
                                          image_hw, dataset.category_ids, valid=batch["valid"]))

    for batch in batches:
        images = batch["images"]
        if data_sharding is not None:
            images = jax.device_put(images, data_sharding)
        out = detect(backend, images, params)  # async dispatch for the jax backend
        if in_flight is not None:
            finish(*in_flight)  # the previous batch, while this one runs on the device
        in_flight = (out, batch)
    if in_flight is not None:
        finish(*in_flight)
    warn_candidate_cap(capped, len(dataset), params)
    return results


def over_candidate_cap(out: dict, valid, params) -> list[int]:
    """Candidate counts (scores above conf) of the valid images of one NMS output that exceed
    ``params.pre_nms_topk``: their lowest-scoring candidates were dropped before NMS."""
    if "num_candidates" not in out:      # an --end2end file's NMS: no pre-NMS cap
        return []
    counts = np.asarray(out["num_candidates"])[np.asarray(valid, bool)]
    return [int(c) for c in counts if c > params.pre_nms_topk]


_CAP_WARNED: set = set()


def warn_candidate_cap(capped: list[int], num_images: int, params) -> None:
    """One warning naming how many images met the static pre-NMS cap (the official NMS has
    none): their lowest candidates above conf took no part in NMS, which can lower AP a little.
    A warning the first time per cap and conf in a process; later evaluations (a training run's
    periodic ones) log the same line at INFO."""
    if capped:
        key = (int(params.pre_nms_topk), float(params.conf))
        level = logging.INFO if key in _CAP_WARNED else logging.WARNING
        _CAP_WARNED.add(key)
        log.log(level, "%d of %d images had more than %d candidates (class scores above conf %g; up "
                "to %d): the lowest were dropped before NMS (the official code keeps all); raise "
                "--pre-nms-topk / test.pre_nms_topk to keep them", len(capped), num_images,
                params.pre_nms_topk, params.conf, max(capped))


def collect_detections(model, variables, dataset, cfg, *, batch_size=None, progress=True):
    """:func:`run_detections` of a Flax ``build_model`` module and its variables."""
    return run_detections(JaxBackend(model, variables), dataset, cfg, batch_size=batch_size,
                          progress=progress)


def category_remap(model_names, data_names, category_ids) -> dict | None:
    """Model label ``k`` is class ``model_names[k]``; the detections write it as the dataset's
    ``category_ids[k]`` (label index ``k``). Returns ``{}`` when the names are the same list
    (nothing to remap); ``{written id: id of the dataset class named model_names[k]}`` when they
    are the same distinct names in another order; ``None`` when they differ otherwise (labels
    stay matched by index)."""
    model_names, data_names = tuple(map(str, model_names)), tuple(map(str, data_names))
    if model_names == data_names:
        return {}
    if (len(set(model_names)) != len(model_names) or len(set(data_names)) != len(data_names)
            or set(model_names) != set(data_names)):
        return None
    index = {name: j for j, name in enumerate(data_names)}
    return {int(category_ids[k]): int(category_ids[index[name]])
            for k, name in enumerate(model_names)}


def names_remap(model_names, dataset, *, warn_other: bool = False) -> dict | None:
    """:func:`category_remap` of a model's class names onto ``dataset``, logged: one info line
    when the labels get mapped by name; with ``warn_other`` a warning when the names differ
    otherwise (same count: labels stay matched by index)."""
    by_name = category_remap(model_names, dataset.class_names, dataset.category_ids)
    if by_name:
        log.info("the model's classes are the dataset's in another order: its labels are mapped "
                 "to the dataset's classes by name")
    elif by_name is None and warn_other:
        log.warning("class names of the model and of the dataset differ (same count %d); "
                    "labels are matched by index", len(tuple(model_names)))
    return by_name


def apply_remap(detections: list, by_name: dict | None) -> list:
    """COCO results with each ``category_id`` replaced through ``by_name`` (when not empty)."""
    if not by_name:
        return detections
    return [dict(d, category_id=by_name[d["category_id"]]) for d in detections]


def evaluate_backend(backend, dataset, cfg, *, batch_size=None, progress=True,
                     use_fast=True) -> dict:
    """COCO bbox stats (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) of any
    backend (Flax model, ONNX, OpenVINO) on ``dataset``. The model's label k is its class
    ``cfg.model.class_names[k]``: a dataset listing the same classes in another order gets the
    labels mapped by name (:func:`category_remap`, as ``damo-jax eval`` and the official
    evaluation do)."""
    cfg, dataset = resolve_inputs(cfg, dataset, batch_size)
    by_name = names_remap(cfg.model.get("class_names", ()), dataset)
    scored: set = set()
    detections = run_detections(backend, dataset, cfg, batch_size=batch_size, progress=progress,
                                scored_ids=scored)
    return score_detections(dataset, apply_remap(detections, by_name), scored, use_fast=use_fast)


def score_detections(dataset, detections, scored_ids, *, use_fast=True, details=False):
    """COCO stats over the images that were actually run, plus ``detections`` (their count),
    ``images_scored`` and ``images_skipped`` (unreadable images are left out of the ground truth rather than counted as
    images without detections). ``images_skipped`` counts the images skipped when read and those
    the reader left out when the data opened (``dataset.stats["skipped_images"]``: YOLO / VOC
    images whose header cannot be read). Raises ``DataError`` when no image could be read.
    ``details``: return ``(stats, details)``, the second the accumulated arrays of the same COCOeval
    run (``coco.coco_evaluate(..., details=True)``; what the per-class reports read)."""
    from damo_jax.data_pipelines import DataError
    total = len(dataset)
    if not scored_ids and total:
        raise DataError(f"evaluate: none of the {total} images of {getattr(dataset, 'name', 'the dataset')} "
                        f"could be read (see the 'skipping image' warnings)")
    gt = dataset.to_coco_dict()
    if not any(not a.get("iscrowd") and int(a["image_id"]) in scored_ids for a in gt["annotations"]):
        log.warning("the %d scored images of %s have no ground-truth boxes: COCO AP and AR are "
                    "undefined and reported as -1", len(scored_ids), getattr(dataset, "name", "the dataset"))
    result = coco_evaluate(gt, detections, use_fast=use_fast, details=details,
                           image_ids=scored_ids if len(scored_ids) < total else None)
    stats, arrays = result if details else (result, None)
    at_open = int(getattr(dataset, "stats", {}).get("skipped_images", 0))
    stats = dict(stats, detections=len(detections), images_scored=len(scored_ids),
                 images_skipped=total - len(scored_ids) + at_open)
    return (stats, arrays) if details else stats


def evaluate(model, variables, dataset, cfg, *, batch_size=None, progress=True, use_fast=True) -> dict:
    """COCO bbox stats of a model.

    ``model``/``variables``: a ``build_model`` module (train or deploy graph) and its variables;
    ``dataset``: a ``data_pipelines.open_dataset`` dataset or a data spec; ``cfg``: the config
    (``test`` section) or a config name (:func:`resolve_inputs`).
    """
    return evaluate_backend(JaxBackend(model, variables), dataset, cfg, batch_size=batch_size,
                            progress=progress, use_fast=use_fast)


def main(argv=None) -> dict:
    """Alias of ``damo-jax eval`` (``python -m damo_jax.evaluation.evaluator``)."""
    from damo_jax.cli.eval import main as eval_main
    return eval_main(argv)


if __name__ == "__main__":
    main()
