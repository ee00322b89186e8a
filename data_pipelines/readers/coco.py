"""COCO JSON reader (``instances_*.json`` + an image folder), as the official COCODataset.

* Crowd annotations (``iscrowd`` = 1) are not used for training (counted ``crowd_boxes``) but kept
  as ignore regions, and ``to_coco_dict()`` returns the original annotations (with their
  segmentation-based ``area``), so evaluation matches pycocotools on the source file.
* Boxes xywh → x1y1x2y2, clipped to the image; zero width/height (after clipping) removed.
* Polygon ``segmentation`` of the used objects is kept (all polygons of an object concatenated
  into one outline, as the official ``pull_item``): the random affine of training takes its boxes
  from the outlines when every object of a mosaic has one (SPEC §9.2). An RLE mask, a malformed
  polygon, or polygons whose tight box does not match the ``bbox`` (IoU < ``OUTLINE_MIN_IOU``,
  e.g. polygons written in 0..1 instead of pixels: the affine would take the boxes from them and
  lose the objects; one warning per file) give that object no outline (counted
  ``polygons_not_used``).
* Images without annotations are kept (negatives); images are ordered by id.
* Category ids are mapped to contiguous labels 0..C-1 in the order of the file's ``categories``
  list (pycocotools' ``getCatIds()``, the official COCODataset's mapping: official weights trained
  on a file with unsorted categories keep their classes); class names come from ``categories``.
  An annotation with an unknown ``category_id`` or ``image_id``, or an
  ``iscrowd`` that is not 0/1 (int or bool; absent = 0), raises :class:`DataError` naming the
  file, the annotation id and the field.
* ``file_name`` must stay inside the image folder: an absolute path, or one that climbs out of
  it with ``..``, is a :class:`DataError` unless ``allow_outside_root=True`` (data spec
  ``coco:/path?allow_outside_root=1``). The check is on the path as written (symlinks inside the
  folder are followed as usual).
* Dropped boxes are counted by reason (``data_pipelines.quality``); when more than
  ``DROP_WARN_SHARE`` of the file's boxes are dropped a warning guesses the cause.
"""
from __future__ import annotations

import collections
import gc
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from damo_jax.data_pipelines.quality import hint_by_reason
from damo_jax.data_pipelines.records import (DataError, DetectionDataset, DropAudit,
                                             MissingSplitError, Record, check_inside, clean_boxes,
                                             empty_boxes, pack_polygons)

log = logging.getLogger(__name__)


class CocoDataset(DetectionDataset):
    """Dataset over a COCO instances JSON; ``to_coco_dict`` returns the source annotations (the
    boxes training drops included: the evaluation scores the file as it is)."""

    scores_source_annotations = True

    def __init__(self, records, class_names, category_ids, *, name, stats, coco_gt):
        super().__init__(records, class_names, category_ids, name=name, stats=stats)
        self._coco_gt = coco_gt

    def to_coco_dict(self) -> dict[str, Any]:
        return self._coco_gt


def resolve_coco_paths(path: str | os.PathLike, split: str, *,
                       require_split: bool = False) -> tuple[Path, Path]:
    """(annotation json, image dir) for ``coco:`` specs; see ``open_dataset``. A JSON file is the
    data of every split, unless ``require_split`` (then :class:`MissingSplitError`)."""
    p = Path(path).expanduser()
    if p.is_file():
        if require_split:
            raise MissingSplitError(f"coco:{path}: a single annotation file has no split {split!r} of "
                                    f"its own (only a folder with annotations/instances_{split}*.json "
                                    f"has splits)")
        # .../annotations/instances_val2017.json -> .../val2017, else images/ beside, else the json dir
        stem = p.stem.removeprefix("instances_")
        candidates = [p.parent.parent / stem, p.parent.parent / "images" / stem, p.parent / "images"]
        for d in candidates:
            if stem and d.is_dir():
                return p, d
        return p, p.parent
    if not p.is_dir():
        raise DataError(f"coco:{path}: no such file or directory")
    if p.suffix.lower() == ".json" and not (p / "annotations").is_dir():
        raise DataError(f"coco:{path}: a folder, not an annotation file (give the COCO JSON file, or "
                        f"the dataset folder holding annotations/)")
    tried = []
    for ann_name, img_dirs in (
        (f"instances_{split}2017.json", (f"{split}2017", f"images/{split}2017")),
        (f"instances_{split}.json", (split, f"images/{split}", "images")),
    ):
        ann = p / "annotations" / ann_name
        tried.append(str(ann))
        if ann.exists() and not ann.is_file():
            raise DataError(f"coco:{path}: {ann} is a folder, not an annotation file (a COCO JSON "
                            f"file is expected at that name)")
        if ann.is_file():
            for d in img_dirs:
                if (p / d).is_dir():
                    return ann, p / d
            raise DataError(f"coco:{path}: found {ann} but none of the image folders "
                            f"{', '.join(str(p / d) for d in img_dirs)}")
    raise MissingSplitError(f"coco:{path}: no annotation file for split {split!r} (tried {', '.join(tried)})")


def _require(obj: Any, key: str, kind, where: str):
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok or (isinstance(value, float) and value.is_integer())
        if not ok:
            raise DataError(f"{where}: field {key!r} must be an integer, got {value!r}")
        return int(value)
    if not isinstance(value, kind):
        raise DataError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _parse_categories(data: dict, file: str) -> tuple[list[int], list[str]]:
    cats = _require(data, "categories", list, file)
    by_id: dict[int, str] = {}
    for i, c in enumerate(cats):
        where = f"{file}: categories[{i}]"
        cid = _require(c, "id", int, where)
        cname = _require(c, "name", str, where)
        if cid in by_id:
            raise DataError(f"{where}: duplicate category id {cid}")
        if cname in by_id.values():
            other = next(k for k, v in by_id.items() if v == cname)
            raise DataError(f"{where}: field 'name': {cname!r} is also the name of category id {other} "
                            f"(class names must be unique)")
        by_id[cid] = cname
    ids = list(by_id)          # the file's order: pycocotools' getCatIds(), the official mapping
    return ids, [by_id[i] for i in ids]


def _parse_images(data: dict, file: str, allow_outside_root: bool = False) -> dict[int, dict]:
    images: dict[int, dict] = {}
    for i, im in enumerate(_require(data, "images", list, file)):
        where = f"{file}: images[{i}]"
        iid = _require(im, "id", int, where)
        if not -2**63 <= iid < 2**63:       # image ids travel as int64 in the batches
            raise DataError(f"{where}: field 'id' = {iid} does not fit a 64-bit signed integer")
        fname = check_inside(_require(im, "file_name", str, where), f"{where} (id {iid})", "file_name",
                             allow_outside_root=allow_outside_root)
        w, h = _require(im, "width", int, where), _require(im, "height", int, where)
        if not (0 < w < 2**31 and 0 < h < 2**31):
            raise DataError(f"{where}: field 'width'/'height' must be positive integers, got {w}x{h}")
        if iid in images:
            raise DataError(f"{where}: duplicate image id {iid}")
        images[iid] = {"id": iid, "file_name": fname, "width": w, "height": h}
    return images


def _finite_float(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _parse_bbox(ann: dict, where: str) -> list[float]:
    bbox = _require(ann, "bbox", list, where)
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        raise DataError(f"{where}: field 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
    try:
        return [float(v) for v in bbox]
    except OverflowError as e:
        raise DataError(f"{where}: field 'bbox' value out of range: {bbox!r}") from e


def _iscrowd(ann: dict, where: str) -> bool:
    """``iscrowd`` as a bool: 0/1 as int, bool (or an integral float); absent = 0."""
    value = ann.get("iscrowd", 0)
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: field 'iscrowd' must be 0 or 1 (int or bool), got {value!r} "
                    f"({type(value).__name__})")


_guess = hint_by_reason({
    "inverted_boxes": "negative width or height in 'bbox': COCO boxes are [x, y, width, height]",
    "zero_size_boxes": "'bbox' width or height is 0",
    "outside_boxes": "boxes lie outside their image: 'bbox' must be [x, y, width, height] in pixels of "
                     "the image ('width'/'height' fields)",
    "nonfinite_boxes": "NaN/inf values in 'bbox'"})


def _outline(segmentation) -> np.ndarray | None:
    """An object's polygons (``[[x1, y1, x2, y2, ...], ...]`` px) as one (K, 2) float32 outline,
    the official ``pull_item``'s concatenation; None for RLE, empty or malformed ones."""
    if not isinstance(segmentation, list) or not segmentation:
        return None
    points = []
    for polygon in segmentation:
        if not isinstance(polygon, list) or len(polygon) % 2:
            return None
        points += polygon
    try:
        xy = np.asarray(points, np.float32).reshape(-1, 2)
    except (TypeError, ValueError):      # a string, None or a nested list among the values
        return None
    return xy if len(xy) and np.isfinite(xy).all() else None


#: an outline is used only when its tight box overlaps the annotation's ``bbox`` this much (IoU,
#: both boxes widened by ``OUTLINE_PAD`` px on each side). COCO derives ``bbox`` from the mask of
#: the polygon, so the two differ by rounding (< 1 px per edge): for boxes of a few pixels that
#: alone can bring the plain IoU below 0.5, hence the padding (a 2x2 box against a 3x3 one: 0.44
#: plain, 0.64 padded); for objects of 10+ px the padding barely matters. The exporter bugs this
#: catches (polygons normalised to 0..1, or in another image's frame) give an IoU near 0.
OUTLINE_MIN_IOU = 0.5
OUTLINE_PAD = 1.0


def _outline_box(outline: np.ndarray) -> list[float]:
    return [float(v) for v in (*outline.min(0), *outline.max(0))]


def _fmt_box(box) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _outline_fits_box(outline: np.ndarray, box: list[float]) -> bool:
    """Whether an outline's tight box matches the annotation's x1y1x2y2 ``box`` (see
    :data:`OUTLINE_MIN_IOU`). A box that is not finite or not positive-sized is dropped later with
    its outline anyway: True."""
    x1, y1, x2, y2 = box
    if not all(math.isfinite(v) for v in box) or x2 <= x1 or y2 <= y1:
        return True
    p = OUTLINE_PAD
    a = [x1 - p, y1 - p, x2 + p, y2 + p]
    ox1, oy1, ox2, oy2 = _outline_box(outline)
    b = [ox1 - p, oy1 - p, ox2 + p, oy2 + p]
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter >= OUTLINE_MIN_IOU * union


def _count_missing_files(records, image_dir, file: str, stats) -> None:
    """``stats["image_files_not_found"]`` and one warning for listed images that are not on disk
    (training skips them, evaluation counts them as skipped); DataError when none is there (a
    wrong image folder or renamed files: every sample would fail)."""
    missing = [r.file for r in records if not os.path.isfile(r.file)]
    if not missing:
        return
    if len(missing) == len(records):
        raise DataError(f"{file}: none of its {len(records)} images is in {image_dir} (e.g. "
                        f"{missing[0]} not found): wrong image folder, or renamed files?")
    stats["image_files_not_found"] += len(missing)
    log.warning("%s: %d of %d listed images not found in %s (e.g. %s): skipped in training, "
                "counted as skipped in evaluation", file, len(missing), len(records), image_dir,
                os.path.basename(missing[0]))


def read_coco(ann_file: str | os.PathLike, image_dir: str | os.PathLike, *, name: str | None = None,
              allow_outside_root: bool = False, split: str | None = None) -> CocoDataset:
    """Read a COCO instances JSON into a :class:`CocoDataset` (see module docstring). A file
    without images is a :class:`DataError` (``split`` names the split in its message).

    Python's cyclic garbage collector is paused while reading: the millions of small objects of a
    COCO train file (polygons) made it run over and over for nothing (~35 % of the read time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _read_coco(ann_file, image_dir, name=name, allow_outside_root=allow_outside_root,
                          split=split)
    finally:
        if enabled:
            gc.enable()


def _read_coco(ann_file, image_dir, *, name, allow_outside_root, split) -> CocoDataset:
    file = str(ann_file)
    try:
        with open(file, "rb") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DataError(f"{file}: annotation file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{file}: top level must be a JSON object, got {type(data).__name__}")
    cat_ids, class_names = _parse_categories(data, file)
    label_of = {cid: i for i, cid in enumerate(cat_ids)}
    images = _parse_images(data, file, allow_outside_root)
    if not images:
        raise DataError(f"{file}: " + (f"split {split!r} has no images" if split else "no images")
                        + " (field 'images' is empty)")
    stats: collections.Counter = collections.Counter()
    per_image = collections.defaultdict(lambda: ([], [], [], [], []))
    gt_annotations = []
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(f"{file}: field 'annotations' must be a list, got {type(annotations).__name__}")
    mismatched = []          # (where, outline, box) of polygons that disagree with their bbox
    for i, ann in enumerate(annotations):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"{file}: annotations[{i}]" + (f" (id {ann_id})" if ann_id is not None else "")
        iid = _require(ann, "image_id", int, where)
        cid = _require(ann, "category_id", int, where)
        if iid not in images:
            raise DataError(f"{where}: field 'image_id' = {iid} is not an image id of the file")
        if cid not in label_of:
            raise DataError(f"{where}: unknown category_id {cid} (known: {cat_ids})")
        x, y, w, h = _parse_bbox(ann, where)
        crowd = _iscrowd(ann, where)
        box = [x, y, x + w, y + h]
        boxes, labels, crowd_boxes, crowd_labels, outlines = per_image[iid]
        (crowd_boxes if crowd else boxes).append(box)
        (crowd_labels if crowd else labels).append(label_of[cid])
        if not crowd:
            segmentation = ann.get("segmentation")
            outline = _outline(segmentation)
            if outline is not None and not _outline_fits_box(outline, box):
                mismatched.append((where.removeprefix(f"{file}: "), outline, box))
                outline = None
            outlines.append(outline)
            if outline is None and segmentation not in (None, [], {}):
                stats["polygons_not_used"] += 1     # RLE, malformed or off the box: corners used
        stats["crowd_boxes"] += int(crowd)
        area = _finite_float(ann.get("area"))
        area = area if area is not None else max(w, 0.0) * max(h, 0.0)
        gt_annotations.append({"id": ann_id if isinstance(ann_id, int) else i + 1,
                               "image_id": iid, "category_id": cid, "bbox": [x, y, w, h],
                               "area": area, "iscrowd": int(crowd)})
    if mismatched:
        where, outline, box = mismatched[0]
        log.warning("%s: %d polygon 'segmentation'(s) do not match their 'bbox' (IoU of the polygon's "
                    "tight box with 'bbox' < %g; e.g. %s: polygon box %s, bbox %s; polygons in 0..1 "
                    "instead of pixels?): those objects train on their box without the polygon "
                    "(counted polygons_not_used)", file, len(mismatched), OUTLINE_MIN_IOU, where,
                    _fmt_box(_outline_box(outline)), _fmt_box(box))
    ids = [a["id"] for a in gt_annotations]
    # COCOeval keys the ground truth by id (a repeat drops boxes) and stores the matched ground
    # truth's id per detection with 0 meaning "unmatched" (an id 0 turns its true positives into
    # false positives): the ids must be unique and >= 1
    not_positive = sum(1 for i in ids if i < 1)
    if len(set(ids)) != len(ids) or not_positive:
        repeats = len(ids) - len(set(ids))
        why = ([f"{repeats} annotation id(s) repeat (or collide with the index numbers given to "
                f"annotations without an id)"] if repeats else []) + (
            [f"{not_positive} annotation id(s) are 0 or negative (COCOeval reads id 0 as "
             f"'unmatched')"] if not_positive else [])
        log.warning("%s: %s; the evaluation ground truth numbers all %d annotations 1..%d instead",
                    file, "; ".join(why), len(ids), len(ids))
        stats["renumbered_annotation_ids"] += len(ids)
        for k, a in enumerate(gt_annotations):
            a["id"] = k + 1
    records = []
    audit = DropAudit(name or file)
    for iid in sorted(images):
        im = images[iid]
        boxes, labels, crowd_boxes, crowd_labels, outlines = per_image.get(iid, ([], [], [], [], []))
        b, l, keep = (clean_boxes(boxes, labels, im["width"], im["height"], stats, audit, file, _guess,
                                  with_keep=True) if boxes else (*empty_boxes(), []))
        polygons, polygon_sizes = pack_polygons([o for o, k in zip(outlines, keep) if k])
        cb, cl = (clean_boxes(crowd_boxes, crowd_labels, im["width"], im["height"], collections.Counter())
                  if crowd_boxes else empty_boxes())
        records.append(Record(image_id=iid, width=im["width"], height=im["height"], boxes=b, labels=l,
                              file=os.path.join(str(image_dir), im["file_name"]),
                              ignore_boxes=cb, ignore_labels=cl, polygons=polygons,
                              polygon_sizes=polygon_sizes))
    _count_missing_files(records, image_dir, file, stats)
    gt = {"images": [images[i] for i in sorted(images)], "annotations": gt_annotations,
          "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, class_names)]}
    audit.warn()
    ds = CocoDataset(records, class_names, cat_ids, name=name or file, stats=stats, coco_gt=gt)
    if not len(ds.indices_with_boxes):
        if "annotations" not in data:
            ds.no_boxes_hint = f"{file} has no field 'annotations'"
        elif not annotations:
            ds.no_boxes_hint = f"{file}: field 'annotations' is empty"
        elif stats["crowd_boxes"] == len(annotations):
            ds.no_boxes_hint = (f"all {len(annotations)} annotations of {file} have iscrowd=1 (crowd "
                                f"regions are ignored in training)")
        else:
            ds.no_boxes_hint = f"none of the {len(annotations)} annotations of {file} is a usable box"
    return ds
