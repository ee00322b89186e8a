"""TFDS reader: ``tfds:coco/2017`` and any TFDS detection dataset with the same feature layout.

Features used: ``image`` (H, W, 3) uint8, ``image/id`` (optional; else the record index + 1),
``objects/bbox`` (n, 4) float normalised ``[ymin, xmin, ymax, xmax]``, ``objects/label``
(ClassLabel), optional ``objects/is_crowd``. Access is random (``tfds.data_source``, ArrayRecord);
nothing is downloaded (``download=False``; the data must already be prepared in the TFDS data dir).

Opening scans every record once for its annotations (image bytes are not decoded when the source
supports ``SkipDecoding``; otherwise the decoded array gives the size). Robustness (the TFDS mock
data is semantically random): an example whose ``objects/*`` sequences have different lengths
keeps only its first min-length objects (counted ``inconsistent_objects``); boxes with
max < min (inverted), non-finite, zero size or outside the image are dropped (counted by reason:
``inverted_boxes``, ``nonfinite_boxes``, ``zero_size_boxes``, ``outside_boxes``); labels outside
the ClassLabel range raise :class:`DataError`.

Category ids for ``to_coco_dict``: the official COCO ids for ``coco/*`` datasets with the 80 COCO
names, else 1..C. Split ``val`` maps to ``validation`` when the dataset has no ``val`` split.
"""
from __future__ import annotations

import collections
import contextlib
import io
import tempfile

import numpy as np

from damo_jax.data_pipelines.records import (DataError, DetectionDataset, DropAudit, Record, clean_boxes,
                                             empty_boxes, log)

COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)


class TfdsDataset(DetectionDataset):
    """Records index a random-access TFDS source; images are decoded on access."""

    def __init__(self, records, class_names, category_ids, *, name, stats, source):
        super().__init__(records, class_names, category_ids, name=name, stats=stats)
        self._source = source

    def load_image(self, rec: Record) -> np.ndarray:
        example = self._source[rec.source_index]
        image = example["image"]
        if isinstance(image, (bytes, bytearray)):
            from damo_jax.data_pipelines.imageio import decode_image
            return decode_image(bytes(image), annotated_size=(rec.width, rec.height),
                                stats=self.stats, name=rec.name)
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[:2] != (rec.height, rec.width):
            raise DataError(f"{self.name}: {rec.name}: field 'image' has shape {arr.shape}, "
                            f"expected ({rec.height}, {rec.width}, 3)")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def _split_name(builder, split: str) -> str:
    splits = set(builder.info.splits.keys()) if builder.info.splits else set()
    if split == "val" and "val" not in splits and ("validation" in splits or not splits):
        return "validation"
    return split


def _image_size(image) -> tuple[int, int]:
    """(width, height) from encoded bytes (header only) or a decoded array."""
    if isinstance(image, (bytes, bytearray)):
        from PIL import Image
        with Image.open(io.BytesIO(image)) as im:
            return im.size
    arr = np.asarray(image)
    return int(arr.shape[1]), int(arr.shape[0])


def _open_sources(name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds
    full = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    try:
        meta = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
        if len(meta):
            meta[0]
    except Exception:  # noqa: BLE001 - sources that cannot skip decoding fall back to the full one
        meta = full
    return full, meta


def _example_annotations(objects: dict, num_classes: int, where: str, stats: collections.Counter):
    bbox = np.asarray(objects.get("bbox", np.zeros((0, 4))), np.float64).reshape(-1, 4)
    label = np.asarray(objects.get("label", np.zeros((0,))), np.int64).reshape(-1)
    crowd = np.asarray(objects.get("is_crowd", np.zeros(len(label), bool)), bool).reshape(-1)
    n = min(len(bbox), len(label), len(crowd))
    if not len(bbox) == len(label) == len(crowd):
        stats["inconsistent_objects"] += max(len(bbox), len(label), len(crowd)) - n
    bbox, label, crowd = bbox[:n], label[:n], crowd[:n]
    bad = (label < 0) | (label >= num_classes)
    if bad.any():
        raise DataError(f"{where}: field 'objects/label' value {int(label[bad][0])} outside 0..{num_classes - 1}")
    inverted = (bbox[:, 2] < bbox[:, 0]) | (bbox[:, 3] < bbox[:, 1])
    stats["inverted_boxes"] += int(inverted.sum())
    keep = ~inverted
    stats["crowd_boxes"] += int((crowd & keep).sum())
    return bbox[keep], label[keep], crowd[keep]


def _is_prepared(builder) -> bool:
    try:
        return bool(builder.is_prepared())
    except Exception:  # noqa: BLE001 - a hint must never hide the real error
        return True


@contextlib.contextmanager
def _private_tempdir():
    """``tempfile``'s folder pointed at a private one, removed afterwards: for a dataset not
    prepared locally, every tfds builder (``tfds.builder``, ``tfds.data_source``) calls
    ``DatasetInfo.initialize_from_bucket``, which makes a ``/tmp/tmp*tfds`` folder and, with GCS
    disabled (tfds's default: nothing is downloaded), returns before using or removing it.
    Process-wide while it lasts (``tempfile.tempdir``)."""
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="damo_jax_tfds_") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = saved


def read_tfds(name: str, split: str, *, data_dir: str | None = None) -> TfdsDataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"tfds:{name}: tensorflow-datasets is not installed (pip install damo_jax[tf])") from e
    builder = None
    try:
        with _private_tempdir():           # tfds.builder and tfds.data_source each make a builder
            builder = tfds.builder(name, data_dir=data_dir)
            split = _split_name(builder, split)
            source, meta = _open_sources(name, split, data_dir)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - tfds raises many types for unprepared / unknown data
        how = (f"random access needs the dataset prepared offline in ArrayRecord format, e.g. "
               f"`tfds build {name} --file_format=array_record` (nothing is downloaded here)")
        if builder is not None and not _is_prepared(builder):   # tfds's own text misleads here
            raise DataError(f"tfds:{name}: not prepared in {builder.data_dir} (no dataset_info.json "
                            f"there; data_dir {data_dir or 'default: ~/tensorflow_datasets'}); "
                            f"{how}") from e
        raise DataError(f"tfds:{name}: cannot open split {split!r} ({type(e).__name__}: {e}); "
                        f"{how}") from e
    label_feature = builder.info.features["objects"]["label"]
    class_names = list(label_feature.names)
    is_coco = name.split("/")[0] == "coco" and len(class_names) == len(COCO_CATEGORY_IDS)
    category_ids = list(COCO_CATEGORY_IDS) if is_coco else list(range(1, len(class_names) + 1))
    stats: collections.Counter = collections.Counter()
    audit = DropAudit(f"tfds:{name}:{split}")
    records = []
    for i in range(len(meta)):
        ex = meta[i]
        where = f"tfds:{name}:{split}[{i}]"
        width, height = _image_size(ex["image"])
        inverted_before = stats["inverted_boxes"]
        bbox, label, crowd = _example_annotations(ex.get("objects", {}), len(class_names), where, stats)
        n_inverted = stats["inverted_boxes"] - inverted_before
        if n_inverted:
            audit.add(f"tfds:{name}:{split}", n_inverted, collections.Counter(inverted_boxes=n_inverted))
        px = np.stack([bbox[:, 1] * width, bbox[:, 0] * height, bbox[:, 3] * width, bbox[:, 2] * height], 1)
        b, l = (clean_boxes(px[~crowd], label[~crowd], width, height, stats, audit, f"tfds:{name}:{split}")
                if (~crowd).any() else empty_boxes())
        cb, cl = (clean_boxes(px[crowd], label[crowd], width, height, collections.Counter())
                  if crowd.any() else empty_boxes())
        image_id = int(np.asarray(ex.get("image/id", i + 1)))
        records.append(Record(image_id=image_id, width=width, height=height, boxes=b, labels=l,
                              source_index=i, ignore_boxes=cb, ignore_labels=cl))
    ids = [r.image_id for r in records]
    if len(set(ids)) != len(ids):
        stats["duplicate_image_ids"] += len(ids) - len(set(ids))
        log.warning("tfds:%s:%s: duplicate image ids; renumbering 1..N", name, split)
        for k, r in enumerate(records):
            r.image_id = k + 1
    audit.warn()
    return TfdsDataset(records, class_names, category_ids, name=f"tfds:{name}:{split}", stats=stats,
                       source=source)
