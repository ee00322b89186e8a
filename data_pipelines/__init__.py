"""Data pipelines for damo_jax: readers, the demo set, DAMO-YOLO augmentations, static batches.

Public API::

    ds = open_dataset("demo", "train")          # or coco:/path, yolo:/path/data.yaml, voc:/path, tfds:coco/2017
    ds[i]  -> {"image", "boxes", "labels", "image_id", "orig_size"};  ds.to_coco_dict()
    loader = TrainLoader(ds, cfg.data, batch_size=..., seed=..., steps_per_epoch=..., total_steps=...,
                         no_aug_start_step=...)
    for batch in eval_batches(ds_val, image_size, batch_size): ...

This package imports neither JAX nor TensorFlow (TFDS is imported only for ``tfds:`` specs), so
spawned loader workers start quickly.
"""
from __future__ import annotations


from damo_jax.data_pipelines.loader import TrainLoader, build_batch, eval_batches, global_indices
from damo_jax.data_pipelines.quality import format_summary
from damo_jax.data_pipelines.records import DataError, DetectionDataset, MissingSplitError, Record

SPEC_KINDS = ("demo", "coco", "yolo", "voc", "tfds")
#: reader options a spec may carry after ``?`` (``coco:/data/x.json?allow_outside_root=1``)
SPEC_OPTIONS = {"coco": {"allow_outside_root": bool, "image_dir": str},
                "voc": {"allow_outside_root": bool, "difficult": str},
                "tfds": {"data_dir": str}, "yolo": {}, "demo": {}}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def split_spec_options(kind: str, rest: str, spec: str) -> tuple[str, dict]:
    """``/path?key=value&key2=value2`` -> (``/path``, options) for the keys of :data:`SPEC_OPTIONS`.

    A ``?`` followed by text without ``=`` is part of the path. Unknown keys and bad boolean
    values raise :class:`DataError` naming the spec and the key.
    """
    path, sep, query = rest.rpartition("?")
    if not sep or "=" not in query:
        return rest, {}
    known = SPEC_OPTIONS.get(kind, {})
    options = {}
    for item in query.split("&"):
        key, _, value = item.partition("=")
        if key not in known:
            raise DataError(f"dataset spec {spec!r}: unknown option {key!r} for {kind}: specs "
                            f"(known: {', '.join(known) or 'none'})")
        if known[key] is bool:
            if value.lower() not in _TRUE + _FALSE:
                raise DataError(f"dataset spec {spec!r}: option {key!r} must be 1/0 (true/false), got {value!r}")
            options[key] = value.lower() in _TRUE
        else:
            options[key] = value
    return path, options


def spec_kind(spec: str) -> tuple[str, str]:
    """``(kind, rest)`` of a dataset spec: ``coco:/x`` -> ``("coco", "/x")``; a bare ``*.json`` /
    ``*.yaml`` path -> ``coco`` / ``yolo``; ``demo`` -> ``("demo", "")``. DataError otherwise."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        head = spec.split("?", 1)[0]
        if head.endswith(".json"):
            kind, rest = "coco", spec
        elif head.endswith((".yaml", ".yml")):
            kind, rest = "yolo", spec
        elif spec != "demo":
            raise DataError(f"dataset spec {spec!r}: expected one of "
                            f"{', '.join(k + ':...' for k in SPEC_KINDS[1:])}, 'demo', or a .json/.yaml path")
    if kind not in SPEC_KINDS:
        raise DataError(f"dataset spec {spec!r}: unknown kind {kind!r} (known: {', '.join(SPEC_KINDS)})")
    return kind, rest


def open_dataset(spec: str, split: str | None = None, *, require_split: bool = False,
                 **kwargs) -> DetectionDataset:
    """Open a dataset from a spec string.

    * ``demo`` / ``demo:<size>``: the bundled procedural set (generated once into the cache).
    * ``coco:/dir`` (``annotations/instances_{split}2017.json`` + ``{split}2017/``, or
      ``annotations/instances_{split}.json`` + ``{split}/`` / ``images/{split}/``), ``coco:/file.json``
      or a bare ``*.json`` path (images beside: ``../{stem}``, ``images/`` or the json's folder;
      ``image_dir=`` overrides; ``allow_outside_root=True`` allows ``file_name`` outside it).
    * ``yolo:/path/data.yaml``; ``voc:/path`` (kwargs ``class_names=``, ``difficult=``);
      ``tfds:<name>[/<version/config>]`` (kwarg ``data_dir=``).

    ``split`` defaults to ``"train"``; ``"val"`` and ``"validation"`` are accepted everywhere.
    Reader options can also ride on the spec (for CLIs): ``coco:/data/coco?allow_outside_root=1``,
    ``voc:/VOC2007?difficult=keep``, ``tfds:coco/2017?data_dir=/tfds`` (see :data:`SPEC_OPTIONS`).

    ``require_split=True``: the data must hold the split as a split of its own (a COCO folder's
    ``annotations/instances_{split}*.json``, a VOC ``{split}/`` folder or ``ImageSets/Main/{split}.txt``,
    a YOLO YAML key, a TFDS split). A spec that is one set of images whatever the split (a COCO
    JSON file, a flat VOC folder, a VOC devkit without ``ImageSets/Main``) then raises
    :class:`MissingSplitError` instead of giving that set: training validates on the training
    spec's ``val`` split only when there is one (never on its training images). Without it (eval,
    show, an explicit ``data.val``) such a spec is read whatever the split.
    """
    if not isinstance(spec, str) or not spec:
        raise DataError(f"dataset spec must be a non-empty string, got {spec!r}")
    split = split or "train"
    kind, rest = spec_kind(spec)
    rest, options = split_spec_options(kind, rest, spec)
    kwargs = {**options, **kwargs}
    if kind == "demo":
        from damo_jax.data_pipelines.demo import open_demo
        try:
            size = int(rest) if rest else None
        except ValueError as e:
            raise DataError(f"dataset spec {spec!r}: demo size must be an integer") from e
        if size is not None and (size < 32 or size % 32):
            raise DataError(f"dataset spec {spec!r}: demo size must be a multiple of 32 (>= 32)")
        return open_demo({"validation": "val"}.get(split, split), size)
    if kind == "coco":
        from damo_jax.data_pipelines.readers.coco import read_coco, resolve_coco_paths
        coco_split = {"validation": "val"}.get(split, split)
        ann, image_dir = resolve_coco_paths(rest, coco_split, require_split=require_split)
        return read_coco(ann, kwargs.get("image_dir", image_dir), name=f"coco:{rest}:{coco_split}",
                         allow_outside_root=bool(kwargs.get("allow_outside_root", False)), split=coco_split)
    if kind == "yolo":
        from damo_jax.data_pipelines.readers.yolo import read_yolo
        return read_yolo(rest, split)
    if kind == "voc":
        from damo_jax.data_pipelines.readers.voc import read_voc
        return read_voc(rest, {"validation": "val"}.get(split, split), require_split=require_split,
                        **kwargs)
    from damo_jax.data_pipelines.readers.tfds import read_tfds
    return read_tfds(rest, split, **kwargs)


__all__ = ["open_dataset", "TrainLoader", "eval_batches", "build_batch", "global_indices",
           "DataError", "MissingSplitError", "DetectionDataset", "Record", "format_summary"]
