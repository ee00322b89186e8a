"""The common record every reader produces, the dataset base class, and the error type.

A reader (COCO JSON, TFDS, YOLO txt, Pascal VOC XML) turns its source into a list of
:class:`Record` — one per image, annotations already cleaned (boxes x1y1x2y2 in pixels of the
*annotated frame*, labels contiguous 0..C-1) — and wraps them in a :class:`DetectionDataset`.
``ds[i]`` decodes the image (see ``data_pipelines.imageio``) and returns

* ``image``     (H, W, 3) uint8 RGB, H, W = the annotated size (``orig_size``)
* ``boxes``     (N, 4) float32 x1y1x2y2 pixels
* ``labels``    (N,) int32 in 0..C-1
* ``image_id``  int (source image id)
* ``orig_size`` (h, w) ints

Problems in the input either raise :class:`DataError` (message names the file and field) or are
dropped and counted in ``ds.stats`` (a ``collections.Counter``; keys listed in the README of the
package, e.g. ``crowd_boxes``, ``outside_boxes``, ``clipped_boxes``, ``images_without_boxes``); the
box cleaning and the drop warnings live in ``data_pipelines.quality``.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from damo_jax.data_pipelines.quality import DropAudit, clean_boxes, format_summary, log  # noqa: F401


class DataError(ValueError):
    """Bad input data; the message names the file (or record) and the field."""


class MissingSplitError(DataError):
    """The dataset has no such split (no annotation file / split list / yaml entry for it): a
    training run then trains without evaluation, where bad data of a split that is there stops it."""


@dataclasses.dataclass
class Record:
    """One image of a dataset with its cleaned annotations.

    ``width``/``height`` are the size of the frame the boxes live in (the annotated size; for
    readers without stored sizes, the decoded, EXIF-transposed image size). ``ignore_boxes`` are
    regions not used for training but exported as ``iscrowd=1`` by ``to_coco_dict`` (COCO crowd
    boxes, VOC ``difficult`` objects with ``difficult="ignore"``).
    """

    image_id: int
    width: int
    height: int
    boxes: np.ndarray                      # (N, 4) float32 x1y1x2y2 px
    labels: np.ndarray                     # (N,) int32 0..C-1
    file: str | None = None                # image path (file readers)
    source_index: int | None = None        # index into a random-access source (TFDS)
    ignore_boxes: np.ndarray | None = None  # (M, 4) float32 x1y1x2y2 px
    ignore_labels: np.ndarray | None = None  # (M,) int32
    polygons: np.ndarray | None = None      # (P, 2) float32 px: the boxes' outlines, concatenated
    polygon_sizes: np.ndarray | None = None  # (N,) int32 points of each box's outline (0: none)

    @property
    def name(self) -> str:
        return self.file if self.file is not None else f"record #{self.source_index} (image_id {self.image_id})"

    def outlines(self) -> list | None:
        """Per box, its outline (K, 2) float32 px (all polygons of the object, concatenated) or
        None; None when no box has one (see :func:`pack_polygons`)."""
        if self.polygons is None or self.polygon_sizes is None:
            return None
        ends = np.cumsum(self.polygon_sizes)
        return [self.polygons[e - k:e] if k else None for k, e in zip(self.polygon_sizes, ends)]


def pack_polygons(outlines) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-box outlines ((K, 2) point arrays or None) -> (points (P, 2) float32, sizes (N,) int32)
    for :class:`Record`; (None, None) when no box has one. One flat array per image, not one
    object per box: COCO train holds ~860k outlines."""
    if not any(o is not None and len(o) for o in outlines):
        return None, None
    sizes = np.array([0 if o is None else len(o) for o in outlines], np.int32)
    points = np.concatenate([np.asarray(o, np.float32).reshape(-1, 2) for o in outlines
                             if o is not None and len(o)])
    return points, sizes


def check_inside(fname: str, where: str, field: str = "file_name", *, allow_outside_root: bool = False,
                 option: str = "allow_outside_root") -> str:
    """``fname`` if it names a file inside the image folder (relative, no climbing out with
    ``..``, no NUL), else :class:`DataError` naming ``where`` and ``field`` (``allow_outside_root``
    lifts the folder rule, not the NUL one). The check is lexical: symlinks are followed."""
    if not fname or "\x00" in fname:
        raise DataError(f"{where}: field {field!r} must be a non-empty path without NUL bytes, got {fname!r}")
    if allow_outside_root:
        return fname
    norm = os.path.normpath(fname)
    if os.path.isabs(fname) or norm == ".." or norm.startswith(".." + os.sep):
        raise DataError(f"{where}: field {field!r} = {fname!r} points outside the image folder "
                        f"(absolute or climbing out with '..'); pass {option}=True (data spec "
                        f"'...?{option}=1') if that is intended")
    return fname


def empty_boxes() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)


class DetectionDataset:
    """Random-access detection dataset over a list of :class:`Record` (see module docstring)."""

    def __init__(self, records: Sequence[Record], class_names: Sequence[str],
                 category_ids: Sequence[int], *, name: str, stats: collections.Counter | None = None):
        if len(class_names) != len(category_ids):
            raise DataError(f"{name}: {len(class_names)} class names but {len(category_ids)} category ids")
        self.records = list(records)
        self.class_names = tuple(str(c) for c in class_names)
        self.category_ids = tuple(int(c) for c in category_ids)
        self.name = name
        self.stats = stats if stats is not None else collections.Counter()
        self.stats["images_without_boxes"] = sum(len(r.labels) == 0 for r in self.records)
        self.indices_with_boxes = np.array(
            [i for i, r in enumerate(self.records) if len(r.labels) > 0], np.int64)
        # the reader's guess at why not one record has a box (where the labels were looked for),
        # for the error of a training run on such a split; None where there are boxes
        self.no_boxes_hint: str | None = None

    # -- sequence protocol ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range (len {len(self)})")
        rec = self.records[index]
        image = self.load_image(rec)
        sample = {
            "image": image,
            "boxes": rec.boxes.copy(),
            "labels": rec.labels.copy(),
            "image_id": int(rec.image_id),
            "orig_size": (int(rec.height), int(rec.width)),
        }
        outlines = rec.outlines()
        if outlines is not None:    # per box (K, 2) px or None: the random affine's boxes (§9.2)
            sample["segments"] = [None if o is None else o.copy() for o in outlines]
        return sample

    def load_image(self, rec: Record) -> np.ndarray:
        """(H, W, 3) uint8 RGB in the annotated frame (subclasses with other sources override)."""
        from damo_jax.data_pipelines.imageio import decode_image
        return decode_image(rec.file, annotated_size=(rec.width, rec.height), stats=self.stats)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {len(self)} images, "
                f"{self.num_classes} classes)")

    # -- evaluation boundary -------------------------------------------------------------------
    def to_coco_dict(self) -> dict[str, Any]:
        """COCO-format ground truth (xywh boxes, SOURCE category ids) for pycocotools."""
        images, annotations = [], []
        for rec in self.records:
            images.append({"id": int(rec.image_id), "width": int(rec.width), "height": int(rec.height),
                           "file_name": rec.file or f"{rec.image_id}.jpg"})
            groups = [(rec.boxes, rec.labels, 0)]
            if rec.ignore_boxes is not None and len(rec.ignore_boxes):
                groups.append((rec.ignore_boxes, rec.ignore_labels, 1))
            for boxes, labels, crowd in groups:
                for box, label in zip(boxes, labels):
                    w, h = float(box[2] - box[0]), float(box[3] - box[1])
                    annotations.append({
                        "id": len(annotations) + 1, "image_id": int(rec.image_id),
                        "category_id": self.category_ids[int(label)],
                        "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h,
                        "iscrowd": crowd})
        categories = [{"id": cid, "name": n} for cid, n in zip(self.category_ids, self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def fingerprint(self) -> str:
        """16 hex digits of a sha256 over what an evaluation on this set scores: the class names,
        and per record (in order) the image id, frame size, image file *name* (not its folder) or
        source index, boxes, labels and ignore regions. The same data read through another spec
        (``demo`` and ``coco:<its folder>``, a moved or copied folder) gives the same value; a
        changed box, image or class list another."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            import hashlib
            h = hashlib.sha256(repr((self.class_names, len(self.records))).encode())
            for rec in self.records:
                where = os.path.basename(rec.file) if rec.file is not None else rec.source_index
                h.update(repr((int(rec.image_id), int(rec.width), int(rec.height), where)).encode())
                for a, dtype in ((rec.boxes, np.float32), (rec.labels, np.int32),
                                 (rec.ignore_boxes, np.float32), (rec.ignore_labels, np.int32)):
                    h.update(b"-" if a is None or not len(a) else np.asarray(a, dtype).tobytes() + b"|")
            cached = self._fingerprint = h.hexdigest()[:16]
        return cached

    def summary(self, role: str = "data") -> str:
        """One line: images, images skipped, boxes used / dropped / clipped by reason (see
        ``data_pipelines.quality.format_summary``)."""
        return format_summary(self, role)
