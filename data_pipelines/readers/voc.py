"""Pascal VOC XML reader.

Layouts (``voc:/path``):

* **devkit**: ``path/Annotations/*.xml`` + ``path/JPEGImages/``; the split's stems come from
  ``path/ImageSets/Main/{split}.txt`` (without an ``ImageSets/Main`` folder every XML is used, with
  a warning). The image of ``Annotations/X.xml`` is ``JPEGImages/X.<ext>`` (paired by stem and
  folder), falling back to the XML's ``<filename>`` inside ``JPEGImages``.
* **pairs**: a folder (``path/{split}/`` if it exists, else ``path/``) holding images and XML
  files with the same stem side by side. Without a ``{split}/`` folder and without XML files in
  ``path/`` itself (e.g. ``train/`` but no ``val/``) the split is missing
  (:class:`MissingSplitError`: training runs without evaluation).

A layout without splits (a flat pairs folder, a devkit without ``ImageSets/Main``) gives its
images for every split, except with ``require_split=True`` (``open_dataset``: training's
validation split when ``data.val`` is not given), where the split is missing.

Class names: the ``class_names`` argument, else ``classes.txt`` / ``labels.txt`` in ``path``
(one per line), else the sorted set of ``<name>`` values over **all** XML files under ``path``
(so train and val agree). With a given list, an unknown name raises :class:`DataError` naming
the file and value. Category ids (for ``to_coco_dict``) are 1..C.

Coordinates: VOC pixel indices are 1-based and inclusive; boxes become
``[xmin - 1, ymin - 1, xmax, ymax]`` (the detectron2 convention), clipped to the image.

``difficult`` objects (``difficult="ignore"``, the default) are not trained on and exported as
``iscrowd=1`` regions by ``to_coco_dict`` (so detections on them are neither TP nor FP, as in the
VOC protocol); ``"keep"`` treats them as normal objects, ``"drop"`` removes them entirely.
The stored ``<size>`` is the annotated frame; when missing or zero the image header is read
(counted ``size_from_image``); an image that cannot be read then is skipped and logged (counted
``skipped_images``), as YOLO does.
A ``<filename>`` fallback that leaves the image folder (absolute, ``..``) is a :class:`DataError`
unless ``allow_outside_root=True``. Unusable boxes are dropped, counted by reason and warned
about per XML file (``data_pipelines.quality``).
"""
from __future__ import annotations

import collections
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Sequence

from damo_jax.data_pipelines.imageio import displayed_size
from damo_jax.data_pipelines.quality import dropped, hint_by_reason
from damo_jax.data_pipelines.records import (DataError, DetectionDataset, DropAudit,
                                             MissingSplitError, Record, check_inside, clean_boxes,
                                             empty_boxes, log)

DIFFICULT_MODES = ("ignore", "keep", "drop")


def _parse_xml(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: not valid XML ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def _text(node: ET.Element | None, tag: str) -> str | None:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text is not None else None


def _number(node: ET.Element, tag: str, where: str) -> float:
    text = _text(node, tag)
    try:
        return float(text)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: field {tag!r} must be a number, got {text!r}") from e


def _objects(root: ET.Element, path: Path):
    """Yield (name, difficult, [x1, y1, x2, y2]) per <object>."""
    for k, obj in enumerate(root.findall("object")):
        where = f"{path}: object[{k}]"
        name = _text(obj, "name")
        if not name:
            raise DataError(f"{where}: missing field 'name'")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise DataError(f"{where}: missing field 'bndbox'")
        x1, y1, x2, y2 = (_number(bnd, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
        diff = _text(obj, "difficult")
        try:
            difficult = bool(int(float(diff))) if diff else False
        except (ValueError, OverflowError) as e:
            raise DataError(f"{where}: field 'difficult' must be 0 or 1, got {diff!r}") from e
        yield name, difficult, [x1 - 1.0, y1 - 1.0, x2, y2]


_guess = hint_by_reason({
    "inverted_boxes": "xmax < xmin or ymax < ymin in <bndbox>",
    "zero_size_boxes": "xmax == xmin or ymax == ymin in <bndbox>",
    "outside_boxes": "boxes lie outside <size> width/height: check <size> and that <bndbox> is in pixels "
                     "(1-based)",
    "nonfinite_boxes": "NaN/inf in <bndbox>"})


def _find_image(folder: Path, stem: str, fallback_name: str | None, where: str = "",
                allow_outside_root: bool = False) -> Path | None:
    for suffix in (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".JPG", ".JPEG", ".PNG"):
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    if fallback_name:
        check_inside(fallback_name, where, "filename", allow_outside_root=allow_outside_root)
        p = folder / fallback_name
        if p.is_file():
            return p
    return None


def _pairs(root: Path, split: str, require_split: bool = False) -> list[tuple[Path, Path | None]]:
    """(xml, image) pairs of the split for either layout. :class:`MissingSplitError` when the
    split is not there: no ``ImageSets/Main/{split}.txt``, no ``{split}/`` folder and no XML files
    directly in ``root``, or (``require_split``, see ``open_dataset``) a layout without splits
    (devkit without ``ImageSets/Main``, flat pairs folder), which is the data of every split."""
    ann_dir = root / "Annotations"
    if ann_dir.is_dir():
        sets = root / "ImageSets" / "Main"
        if sets.is_dir():
            split_file = sets / f"{split}.txt"
            if not split_file.is_file():
                have = sorted(p.stem for p in sets.glob("*.txt") if "_" not in p.stem)
                raise MissingSplitError(f"voc:{root}: no split file {split_file} (available: {have})")
            stems = [ln.split()[0] for ln in split_file.read_text().splitlines() if ln.strip()]
            xmls = [ann_dir / f"{s}.xml" for s in stems]
        else:
            if require_split:
                raise MissingSplitError(f"voc:{root}: no ImageSets/Main folder, so no split {split!r} "
                                        f"of its own (every XML of Annotations/ is in every split)")
            log.warning("voc:%s: no ImageSets/Main folder; using every XML for split %r", root, split)
            xmls = sorted(ann_dir.glob("*.xml"))
        img_dir = root / "JPEGImages"
        return [(x, _find_image(img_dir, x.stem, None)) for x in xmls]
    folder = root / split
    if not folder.is_dir():
        if not any(root.glob("*.xml")):
            raise MissingSplitError(f"voc:{root}: no split folder {folder} (and no XML files directly "
                                    f"in {root})")
        if require_split:
            raise MissingSplitError(f"voc:{root}: a flat folder of XML/image pairs has no split {split!r} "
                                    f"of its own (no {split}/ subfolder)")
        folder = root
    return [(x, _find_image(x.parent, x.stem, None)) for x in sorted(folder.glob("*.xml"))]


def _class_names(root: Path, given: Sequence[str] | None) -> tuple[list[str], bool]:
    if given is not None:
        return [str(c) for c in given], True
    for fname in ("classes.txt", "labels.txt"):
        if (root / fname).is_file():
            names = [ln.strip() for ln in (root / fname).read_text().splitlines() if ln.strip()]
            if names:
                return names, True
    names = set()
    for xml in root.rglob("*.xml"):
        names.update(n for n, _, _ in _objects(_parse_xml(xml), xml))
    if not names:
        raise DataError(f"voc:{root}: no <object><name> found in any XML file; pass class_names")
    return sorted(names), False


def _check_unique(names: list[str], root: Path, given) -> None:
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            where = "class_names" if given is not None else next(
                str(root / f) for f in ("classes.txt", "labels.txt") if (root / f).is_file())
            raise DataError(f"voc:{root}: {where}: classes {seen[n]} and {i} have the same name {n!r} "
                            f"(class names must be unique)")
        seen[n] = i


def no_boxes_hint(stats, root: Path) -> str:
    """Why a split has not a single usable box (for the error of a training run on it)."""
    if stats["difficult_boxes"] and not dropped(stats):
        return (f"all {stats['difficult_boxes']} objects are marked <difficult>1</difficult> (not trained "
                f"on; use voc:{root}?difficult=keep to train on them)")
    return f"the XML files of the split (under {root}) have no usable <object>"


def read_voc(path: str | os.PathLike, split: str, *, class_names: Sequence[str] | None = None,
             difficult: str = "ignore", allow_outside_root: bool = False,
             require_split: bool = False) -> DetectionDataset:
    root = Path(path).expanduser()
    if difficult not in DIFFICULT_MODES:
        raise DataError(f"voc:{root}: difficult must be one of {DIFFICULT_MODES}, got {difficult!r}")
    if not root.is_dir():
        raise DataError(f"voc:{root}: no such folder")
    names, _ = _class_names(root, class_names)
    _check_unique(names, root, class_names)
    label_of = {n: i for i, n in enumerate(names)}
    stats: collections.Counter = collections.Counter()
    audit = DropAudit(f"voc:{root}:{split}")
    records = []
    for i, (xml, image) in enumerate(_pairs(root, split, require_split)):
        if not xml.is_file():
            raise DataError(f"{xml}: annotation file listed in the split but missing")
        tree = _parse_xml(xml)
        if image is None:
            image = _find_image(xml.parent.parent / "JPEGImages" if xml.parent.name == "Annotations"
                                else xml.parent, xml.stem, _text(tree, "filename"), str(xml),
                                allow_outside_root)
        if image is None:
            stats["skipped_images"] += 1
            log.warning("%s: no image with stem %r (or <filename>) found; skipped", xml, xml.stem)
            continue
        size = tree.find("size")
        w, h = (_text(size, "width"), _text(size, "height"))
        try:
            width, height = int(float(w)), int(float(h))
        except (TypeError, ValueError, OverflowError):
            width = height = 0
        if not (0 < width < 2**31 and 0 < height < 2**31):
            try:
                width, height = displayed_size(image)
            except DataError as e:           # no usable <size> and an unreadable image: as YOLO
                stats["skipped_images"] += 1
                log.warning("%s: no <size> and the image cannot be read; skipped: %s", xml, e)
                continue
            stats["size_from_image"] += 1
        boxes, labels, ign_boxes, ign_labels = [], [], [], []
        for name, is_difficult, box in _objects(tree, xml):
            if name not in label_of:
                raise DataError(f"{xml}: unknown class name {name!r} (known: {names})")
            if is_difficult and difficult != "keep":
                stats["difficult_boxes"] += 1
                if difficult == "ignore":
                    ign_boxes.append(box)
                    ign_labels.append(label_of[name])
                continue
            boxes.append(box)
            labels.append(label_of[name])
        b, l = (clean_boxes(boxes, labels, width, height, stats, audit, str(xml), _guess)
                if boxes else empty_boxes())
        ib, il = (clean_boxes(ign_boxes, ign_labels, width, height, collections.Counter())
                  if ign_boxes else empty_boxes())
        records.append(Record(image_id=i + 1, width=width, height=height, boxes=b, labels=l,
                              file=str(image), ignore_boxes=ib, ignore_labels=il))
    if not records:
        raise DataError(f"voc:{root}: split {split!r} has no usable images")
    audit.warn()
    ds = DetectionDataset(records, names, list(range(1, len(names) + 1)),
                          name=f"voc:{root}:{split}", stats=stats)
    if not len(ds.indices_with_boxes):
        ds.no_boxes_hint = no_boxes_hint(stats, root)
    return ds
