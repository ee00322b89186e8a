"""The per-sample training transform (SPEC §9.2–9.3), composed from the augment modules.

While mosaic is on (``step < no_aug_start_step``; each sample with probability ``mosaic_prob``):
mosaic (the sample + 3 uniformly random images) → random affine (to ``mosaic_size``; boxes from
the objects' polygons when every object of the mosaic has one, as the official code) → mixup
(probability ``mixup_prob``, only when boxes remain; copy image drawn among images with ≥ 1 box)
→ drop boxes with area ≤ 4 px². Then always: stretch resize to ``image_size`` → horizontal flip
(``flip_prob``) → SADA (``progress`` = step / total_steps). In the no-augmentation tail the sample
goes straight to resize → flip → SADA.

Images that fail to decode (:class:`DataError`) are replaced by the next index (deterministic),
counted in ``stats["skipped_samples"]`` and noted in ``stats`` for the loader to log once per run
(:data:`NOTE_PREFIX`); after ``MAX_BAD_IN_A_ROW`` failures in a row the error is raised.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Mapping

import numpy as np

from damo_jax.data_pipelines.augment.affine import random_affine
from damo_jax.data_pipelines.augment.flip import random_hflip
from damo_jax.data_pipelines.augment.mixup import mixup
from damo_jax.data_pipelines.augment.mosaic import mosaic
from damo_jax.data_pipelines.augment.resize import drop_small, stretch_resize
from damo_jax.data_pipelines.augment.sada import sada
from damo_jax.data_pipelines.records import DataError

MAX_BAD_IN_A_ROW = 10


def as_hw(size) -> tuple[int, int]:
    """``640`` or ``(H, W)`` → (H, W) ints."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


@dataclasses.dataclass(frozen=True)
class AugParams:
    """The augmentation recipe (from the config's ``data`` section; defaults = official S)."""

    image_size: tuple[int, int] = (640, 640)
    mosaic_size: tuple[int, int] = (640, 640)
    mosaic_prob: float = 1.0
    mosaic_scale: tuple[float, float] = (0.1, 2.0)
    mixup_prob: float = 0.15
    mixup_scale: tuple[float, float] = (0.5, 1.5)
    degrees: float = 10.0
    translate: float = 0.2
    shear: float = 2.0
    flip_prob: float = 0.5
    sada: bool = True
    min_box_area: float = 4.0

    @classmethod
    def from_config(cls, data_cfg: Mapping[str, Any] | Any) -> "AugParams":
        def get(key, default):
            try:
                value = data_cfg[key]
            except (KeyError, TypeError, AttributeError):
                value = getattr(data_cfg, key, default)
            return default if value is None else value

        d = cls()
        return cls(
            image_size=as_hw(get("image_size", d.image_size)),
            mosaic_size=as_hw(get("mosaic_size", d.mosaic_size)),
            mosaic_prob=float(get("mosaic_prob", d.mosaic_prob)),
            mosaic_scale=tuple(float(v) for v in get("mosaic_scale", d.mosaic_scale)),
            mixup_prob=float(get("mixup_prob", d.mixup_prob)),
            mixup_scale=tuple(float(v) for v in get("mixup_scale", d.mixup_scale)),
            degrees=float(get("degrees", d.degrees)),
            translate=float(get("translate", d.translate)),
            shear=float(get("shear", d.shear)),
            flip_prob=float(get("flip_prob", d.flip_prob)),
            sada=bool(get("sada", d.sada)),
            min_box_area=float(get("min_box_area", d.min_box_area)),
        )


#: ``stats`` keys that start with this carry a one-time message: a loader in another process can
#: only pass counters back, so the worker notes the message there and the loader logs each distinct
#: note once per run (``TrainLoader._account``), whichever worker met it and however often.
NOTE_PREFIX = "note:"


def load_sample(ds, index: int, stats: collections.Counter) -> dict:
    """``ds[index]``, replacing undecodable images by the following index (every replacement
    counted in ``stats["skipped_samples"]``, and noted once per image for the loader's log)."""
    n = len(ds)
    for attempt in range(MAX_BAD_IN_A_ROW):
        try:
            return ds[(index + attempt) % n]
        except DataError as e:
            stats["skipped_samples"] += 1
            stats[f"{NOTE_PREFIX}skipping sample {(index + attempt) % n} (replaced by the next one "
                  f"each time it is drawn; warned once): {e}"] = 1
            last = e
    raise DataError(f"{MAX_BAD_IN_A_ROW} unreadable samples in a row from index {index}: {last}")


def _mosaic_branch(ds, first: dict, rng, p: AugParams, stats):
    n = len(ds)
    others = [load_sample(ds, int(rng.integers(0, n)), stats) for _ in range(3)]
    parts = [(s["image"], s["boxes"], s["labels"], s.get("segments")) for s in [first] + others]
    img, boxes, labels, outlines = mosaic(parts, p.mosaic_size, rng)
    img, boxes, labels = random_affine(img, boxes, labels, rng, out_hw=p.mosaic_size, degrees=p.degrees,
                                       translate=p.translate, scale=p.mosaic_scale, shear=p.shear,
                                       outlines=outlines)
    with_boxes = getattr(ds, "indices_with_boxes", None)
    if len(boxes) and rng.random() < p.mixup_prob and with_boxes is not None and len(with_boxes):
        cp = load_sample(ds, int(with_boxes[rng.integers(len(with_boxes))]), stats)
        img, boxes, labels = mixup(img, boxes, labels, cp["image"], cp["boxes"], cp["labels"], rng,
                                   jitter=p.mixup_scale)
    boxes, labels = drop_small(boxes, labels, p.min_box_area)
    return img, boxes, labels


def train_sample(ds, index: int, rng: np.random.Generator, params: AugParams, *, mosaic_on: bool,
                 progress: float, stats: collections.Counter | None = None) -> dict:
    """One augmented training sample: ``image`` (H, W, 3) uint8 at ``image_size``, ``boxes``
    (N, 4) float32 x1y1x2y2, ``labels`` (N,) int32, ``image_id``, ``orig_size``."""
    stats = stats if stats is not None else collections.Counter()
    first = load_sample(ds, index, stats)
    if mosaic_on and rng.random() < params.mosaic_prob:
        img, boxes, labels = _mosaic_branch(ds, first, rng, params, stats)
    else:
        img, boxes, labels = first["image"], first["boxes"], first["labels"]
    img, boxes = stretch_resize(img, boxes, params.image_size)
    img, boxes = random_hflip(img, boxes, rng, params.flip_prob)
    if params.sada:
        img, boxes, labels = sada(img, boxes, labels, rng, progress)
    return {"image": img, "boxes": boxes, "labels": labels, "image_id": first["image_id"],
            "orig_size": first["orig_size"]}
