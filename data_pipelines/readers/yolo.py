"""YOLO txt reader (Ultralytics layout described by a data YAML).

``data.yaml`` keys: ``path`` (dataset root; ``~`` expanded; relative paths are resolved against
the YAML's own folder; default: that folder), ``train`` / ``val`` / ``test`` (each a folder of
images, a .txt file listing image paths, or a list of those; relative to ``path``), ``names`` (list,
or dict ``{class_index: name}``, keys may be quoted; the indices may have gaps), optional ``nc``
(checked; alone, without ``names``, it names the classes ``class_0 …``), optional ``kpt_shape``
``[K, D]`` (a pose dataset: each line is ``class cx cy w h`` followed by K·D keypoint values, which
are not used).

Labels live beside the images with ``/images/`` replaced by ``/labels/`` (last occurrence) and the
suffix ``.txt``. A line is ``class cx cy w h`` (normalised) or a polygon ``class x1 y1 x2 y2 ...``
(normalised; its tight box is used, and the polygon rides along for the random affine of
training, SPEC §9.2). Lines that repeat a box of the same file exactly are
removed and counted (``duplicate_boxes_removed``), as Ultralytics does. Boxes are in the displayed (EXIF-transposed) image frame, so
the image size read at open time is the EXIF-transposed header size. A missing label file means a
negative image (counted ``missing_label_files``); unreadable images are skipped at open time
(counted ``skipped_images``); malformed lines and unknown class indices raise :class:`DataError`
naming the file, line and value. Boxes that cannot be used (NaN, negative or zero width/height,
outside the image — e.g. pixel instead of normalised coordinates) are dropped and counted by
reason (``data_pipelines.quality``); a label file (or the split) losing more than
``DROP_WARN_SHARE`` of its boxes gets a warning that guesses the cause.

Image ids are the file names' numbers when every file name (stem) of the split is a distinct
ASCII integer below 2**63 (COCO-style ``000000139.jpg``), else 1..N in file order.
"""
from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np

from damo_jax.data_pipelines.imageio import displayed_size
from damo_jax.data_pipelines.quality import dominant_reason, hint_by_reason
from damo_jax.data_pipelines.records import (DataError, DetectionDataset, DropAudit,
                                             MissingSplitError, Record, clean_boxes, empty_boxes,
                                             log, pack_polygons)

from damo_jax.inference.images import IMAGE_SUFFIXES  # noqa: E402 - the one suffix set


def _load_yaml(path: Path) -> dict:
    import yaml
    if path.is_dir():
        found = sorted(q.name for q in path.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file())
        suggest = (f" (e.g. yolo:{path / ('data.yaml' if 'data.yaml' in found else found[0])}; "
                   f"YAML files there: {', '.join(found[:5])})" if found else
                   " (no .yaml file in that folder)")
        raise DataError(f"yolo:{path}: is a folder; pass its data YAML{suggest}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise DataError(f"{path}: data YAML not found") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid YAML ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the data YAML ({e.strerror or e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _parse_names(data: dict, file: Path) -> tuple[list[int], list[str]]:
    names = data.get("names")
    nc = data.get("nc")
    if names is None and isinstance(nc, int) and not isinstance(nc, bool) and nc > 0:
        log.warning("%s: no 'names', only 'nc' = %d: the classes are called class_0 … class_%d",
                    file, nc, nc - 1)
        names = [f"class_{i}" for i in range(nc)]
    if isinstance(names, list):
        pairs = list(enumerate(names))
    elif isinstance(names, dict):
        pairs = []
        for k, v in names.items():
            if isinstance(k, str) and k.strip().isdigit():       # '0': name (quoted keys)
                k = int(k)
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise DataError(f"{file}: field 'names': keys must be class indices >= 0, got {k!r}")
            pairs.append((k, v))
        pairs.sort()
    else:
        raise DataError(f"{file}: field 'names' must be a list or a dict, got {names!r}")
    if not pairs:
        raise DataError(f"{file}: field 'names' is empty")
    for k, v in pairs:
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise DataError(f"{file}: field 'names': class {k} has an invalid name {v!r}")
    first: dict[str, int] = {}
    for k, v in pairs:
        if str(v) in first:
            raise DataError(f"{file}: field 'names': classes {first[str(v)]} and {k} have the same name "
                            f"{str(v)!r} (class names must be unique)")
        first[str(v)] = k
    if nc is not None and nc != len(pairs):
        raise DataError(f"{file}: field 'nc' = {nc!r} but 'names' has {len(pairs)} entries")
    return [k for k, _ in pairs], [str(v) for _, v in pairs]


def _image_files(entry, root: Path, file: Path) -> list[Path]:
    if isinstance(entry, (list, tuple)):
        return [p for e in entry for p in _image_files(e, root, file)]
    if not isinstance(entry, str):
        raise DataError(f"{file}: split entry must be a path or a list of paths, got {entry!r}")
    p = Path(entry) if Path(entry).is_absolute() else root / entry
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
    if p.is_file() and p.suffix == ".txt":
        out = []
        for line in p.read_text(encoding="utf-8-sig", errors="replace").splitlines():
            line = line.strip()
            if line:
                q = Path(line)
                out.append(q if q.is_absolute() else (p.parent / q if line.startswith("./") else root / q))
        return out
    if not p.exists():
        raise DataError(f"{file}: split path {p} does not exist"
                        + (f" (relative paths are read from the 'path' folder {root})"
                           if not Path(entry).is_absolute() else ""))
    raise DataError(f"{file}: split path {p} is neither an image folder nor a .txt list")


def label_path(image: Path) -> Path:
    """``.../images/x/a.jpg`` → ``.../labels/x/a.txt`` (last ``images`` component)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _kpt_columns(data: dict, file: Path) -> int | None:
    """Values per line of a pose dataset (``kpt_shape: [K, D]`` → 5 + K·D), else None."""
    shape = data.get("kpt_shape")
    if shape is None:
        return None
    if (not isinstance(shape, (list, tuple)) or len(shape) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
            or shape[0] < 1 or shape[1] not in (2, 3)):
        raise DataError(f"{file}: field 'kpt_shape' must be [keypoints, 2 or 3], got {shape!r}")
    return 5 + shape[0] * shape[1]


def parse_label_file(path: Path, width: int, height: int, class_index: dict[int, int],
                     kpt_columns: int | None = None, stats: collections.Counter | None = None,
                     outlines: list | None = None) -> tuple[list[list[float]], list[int]]:
    """Boxes (x1y1x2y2 px, unclipped) and contiguous labels of one YOLO label file.

    ``kpt_columns``: the values per line of a pose dataset (its box is the first four after the
    class); else a line is a box or a polygon. Exact repeats of a line's class and box are removed
    and counted in ``stats["duplicate_boxes_removed"]``. ``outlines``: a list that gets, per box
    returned, its polygon ((K, 2) px, a polygon line) or None (a box line)."""
    boxes, labels, seen = [], [], set()
    text = path.read_text(encoding="utf-8-sig", errors="replace")   # -sig: a leading BOM is dropped
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{lineno}"
        try:
            values = [float(v) for v in parts]
        except ValueError as e:
            raise DataError(f"{where}: non-numeric value in {line.strip()!r}") from e
        if kpt_columns is not None and len(values) != kpt_columns:
            raise DataError(f"{where}: expected 'class cx cy w h' and the keypoints of kpt_shape: "
                            f"{kpt_columns} values, got {len(values)}")
        if kpt_columns is None and (len(values) < 5 or (len(values) > 5 and len(values) % 2 == 0)):
            raise DataError(f"{where}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 ...', "
                            f"got {len(values)} values")
        cls = values[0]
        if not np.isfinite(cls) or cls != int(cls) or int(cls) not in class_index:
            raise DataError(f"{where}: unknown class index {parts[0]!r} (known: {sorted(class_index)})")
        outline = None
        if len(values) == 5 or kpt_columns is not None:
            cx, cy, w, h = values[1:5]
            box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
        else:
            xy = np.asarray(values[1:], np.float64).reshape(-1, 2)
            box = [xy[:, 0].min() * width, xy[:, 1].min() * height, xy[:, 0].max() * width,
                   xy[:, 1].max() * height]
            outline = (xy * (width, height)).astype(np.float32) if np.isfinite(xy).all() else None
        key = (int(cls), *box)
        if key in seen:
            if stats is not None:
                stats["duplicate_boxes_removed"] += 1
            continue
        seen.add(key)
        boxes.append(box)
        labels.append(class_index[int(cls)])
        if outlines is not None:
            outlines.append(outline)
    return boxes, labels


def _guess(path: Path):
    """A ``guess(counts)`` for the drop warning of one label file (reads its values again only
    when a warning is due)."""
    def guess(counts) -> str | None:
        reason = dominant_reason(counts)
        if reason == "outside_boxes":
            values = []
            for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
                try:
                    values += [abs(float(v)) for v in line.split()[1:]]
                except ValueError:
                    pass
            top = max((v for v in values if np.isfinite(v)), default=0.0)
            if top > 1.5:
                return (f"values up to {top:g} fall outside [0, 1]: YOLO labels must be normalised "
                        f"by the image width/height, these look like pixels")
            return "box centres lie outside the image (YOLO lines are 'class cx cy w h', normalised)"
        return _HINTS(counts)
    return guess


_HINTS = hint_by_reason({
    "inverted_boxes": "negative width or height: YOLO lines are 'class cx cy w h' with w, h > 0",
    "zero_size_boxes": "width or height is 0",
    "nonfinite_boxes": "NaN/inf values in the label file"})


def _is_id(stem: str) -> bool:
    """An image file name usable as its image id: ASCII digits (``isdigit`` alone accepts ``²``,
    which ``int`` refuses) whose value fits the int64 the batches carry."""
    return stem.isascii() and stem.isdigit() and int(stem) < 2**63


def read_yolo(yaml_path: str | os.PathLike, split: str) -> DetectionDataset:
    file = Path(yaml_path).expanduser()
    data = _load_yaml(file)
    root = Path(str(data.get("path") or ".")).expanduser()
    root = root if root.is_absolute() else (file.parent / root)
    split_key = {"validation": "val"}.get(split, split)
    if split_key not in data or data[split_key] in (None, ""):
        raise MissingSplitError(f"{file}: no entry for split {split!r} (keys: {sorted(map(str, data))})")
    cat_ids, names = _parse_names(data, file)
    kpt_columns = _kpt_columns(data, file)
    class_index = {cid: i for i, cid in enumerate(cat_ids)}
    images = _image_files(data[split_key], root, file)
    stats: collections.Counter = collections.Counter()
    audit = DropAudit(f"yolo:{file}:{split}")
    records = []
    stems = [p.stem for p in images]
    numeric_ids = bool(stems) and all(_is_id(s) for s in stems) and len(set(map(int, stems))) == len(stems)
    for i, img in enumerate(images):
        try:
            width, height = displayed_size(img)
        except DataError as e:
            stats["skipped_images"] += 1
            log.warning("skipping image: %s", e)
            continue
        lbl = label_path(img)
        outlines: list = []
        if lbl.is_file():
            boxes, labels = parse_label_file(lbl, width, height, class_index, kpt_columns, stats,
                                             outlines)
        else:
            stats["missing_label_files"] += 1
            boxes, labels = [], []
        b, l, keep = (clean_boxes(boxes, labels, width, height, stats, audit, str(lbl), _guess(lbl),
                                  with_keep=True) if boxes else (*empty_boxes(), []))
        polygons, polygon_sizes = pack_polygons([o for o, k in zip(outlines, keep) if k])
        records.append(Record(image_id=int(img.stem) if numeric_ids else i + 1, width=width,
                              height=height, boxes=b, labels=l, file=str(img), polygons=polygons,
                              polygon_sizes=polygon_sizes))
    if not records:
        raise DataError(f"{file}: split {split!r} has no readable images under {data[split_key]!r}")
    audit.warn()
    if stats["duplicate_boxes_removed"]:
        log.warning("yolo:%s:%s: %d label lines repeat a box of the same file exactly; removed "
                    "(each copy would count as a missed object in evaluation)", file, split,
                    stats["duplicate_boxes_removed"])
    ds = DetectionDataset(records, names, cat_ids, name=f"yolo:{file}:{split}", stats=stats)
    if not len(ds.indices_with_boxes):
        ds.no_boxes_hint = no_boxes_hint(records)
    return ds


def no_boxes_hint(records) -> str:
    """Where the labels of a split without a single usable box were looked for (for the error of
    a training run on it)."""
    labels = [label_path(Path(r.file)) for r in records]
    missing = [p for p in labels if not p.is_file()]
    if len(missing) == len(labels):
        return (f"no label file found: the labels are expected beside the images with the last "
                f"'images' folder replaced by 'labels' and the suffix .txt, e.g. {records[0].file} -> "
                f"{labels[0]}")
    present = [p for p in labels if p.is_file()]
    head = f"{len(missing)} of {len(labels)} label files missing (e.g. {missing[0]}); " if missing else ""
    return f"{head}the label files found (e.g. {present[0]}) have no usable 'class cx cy w h' lines"
