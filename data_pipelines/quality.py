"""Box cleaning by reason, warnings that guess why boxes are dropped, and the dataset summary.

Every reader passes its raw boxes (x1y1x2y2 pixels of the annotated frame, unclipped) through
:func:`clean_boxes`, which keeps, clips or drops each box and counts drops BY REASON in the
dataset's ``stats`` (a ``collections.Counter``):

===================  ============================================================================
``nonfinite_boxes``  a coordinate is NaN or ±inf
``inverted_boxes``   x2 < x1 or y2 < y1 (negative width / height)
``zero_size_boxes``  x2 == x1 or y2 == y1 (a line or a point)
``outside_boxes``    nothing of the box is left after clipping it to the image
``clipped_boxes``    kept, but clipped to the image (not a drop)
===================  ============================================================================

A reader also feeds a :class:`DropAudit` with the boxes of each source unit (a label file, an
XML file, an annotation JSON) and a *guess* of the cause in the words of its format (e.g. "YOLO
labels must be normalised, these look like pixels"). :meth:`DropAudit.warn` logs one warning per
unit whose dropped share exceeds :data:`DROP_WARN_SHARE` (the first :data:`MAX_FILE_WARNINGS`
units, then a count) and one for the whole dataset. :func:`format_summary` is the summary that
``train`` and ``eval`` print at start.
"""
from __future__ import annotations

import collections
import logging
from typing import Callable

import numpy as np

from damo_jax.ops.boxes import clip_boxes

log = logging.getLogger("data_pipelines")

#: stats key of each drop reason, in the order a box is classified (the first that applies)
DROP_KEYS = ("nonfinite_boxes", "inverted_boxes", "zero_size_boxes", "outside_boxes")
DROP_WORDS = {"nonfinite_boxes": "non-finite (NaN/inf)", "inverted_boxes": "inverted (x2 < x1 or y2 < y1)",
              "zero_size_boxes": "zero width or height", "outside_boxes": "outside the image"}
#: counters of images left out (at open time; ``skipped_samples`` is the train loader's)
IMAGE_SKIP_KEYS = ("skipped_images", "skipped_samples")
#: a source file (or the whole dataset) losing more than this share of its boxes gets a warning
DROP_WARN_SHARE = 0.2
MAX_FILE_WARNINGS = 5


def classify_boxes(boxes, width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """(clipped (N, 4) float64, reason (N,) int: -1 kept, else an index into :data:`DROP_KEYS`)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    reason = np.full(len(boxes), -1, np.int64)
    with np.errstate(invalid="ignore"):
        tests = (~np.isfinite(boxes).all(axis=1),
                 (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]),
                 (boxes[:, 2] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 1]))
        clipped = clip_boxes(boxes, (height, width))
        outside = ~((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1]))
    for k, hit in enumerate(tests + (outside,)):
        reason[(reason < 0) & hit] = k
    return clipped, reason


def clean_boxes(boxes_xyxy, labels, width: int, height: int, stats: collections.Counter,
                audit: "DropAudit | None" = None, source: str | None = None,
                guess: "Callable[[collections.Counter], str | None] | None" = None,
                with_keep: bool = False) -> tuple:
    """Clip boxes to the image, drop the unusable ones (counted by reason in ``stats``).

    Returns float32 (N, 4) boxes and int32 (N,) labels, filtered together (``with_keep``: and the
    keep mask over the input, to filter what rides along, e.g. outlines). With ``audit``, the
    counts of this call are also recorded for ``source`` with the reader's ``guess(counts)``.
    """
    labels = np.asarray(labels, np.int64).reshape(-1)
    raw = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
    clipped, reason = classify_boxes(raw, width, height)
    keep = reason < 0
    counts: collections.Counter = collections.Counter(
        {key: int((reason == k).sum()) for k, key in enumerate(DROP_KEYS) if (reason == k).any()})
    was_clipped = (np.abs(clipped - raw).max(axis=1, initial=0) > 0) & keep
    counts["clipped_boxes"] = int(was_clipped.sum())
    stats.update(+counts)
    if audit is not None:
        audit.add(source or "?", len(raw), counts, guess)
    out = clipped[keep].astype(np.float32), labels[keep].astype(np.int32)
    return (*out, keep) if with_keep else out


def dropped(counts) -> int:
    return sum(int(counts.get(k, 0)) for k in DROP_KEYS)


class DropAudit:
    """Per-source box counts of one dataset being read; see the module docstring."""

    def __init__(self, dataset: str, share: float = DROP_WARN_SHARE):
        self.dataset, self.share = dataset, share
        self.units: dict[str, list] = {}      # source -> [total, Counter, guess function]

    def add(self, source: str, total: int, counts: collections.Counter, guess=None) -> None:
        unit = self.units.setdefault(source, [0, collections.Counter(), guess])
        unit[0] += total
        unit[1].update(counts)

    def messages(self) -> list[str]:
        """The warnings :meth:`warn` logs (file-level ones first, then the dataset-level one)."""
        out, over = [], []
        total_all, counts_all = 0, collections.Counter()
        for source, (total, counts, guess) in self.units.items():
            total_all += total
            counts_all.update(counts)
            if total and dropped(counts) / total > self.share:
                over.append(_message(source, total, counts, guess))
        out += over[:MAX_FILE_WARNINGS]
        if len(over) > MAX_FILE_WARNINGS:
            out.append(f"{self.dataset}: ... and {len(over) - MAX_FILE_WARNINGS} more files lose more "
                       f"than {self.share:.0%} of their boxes")
        if len(self.units) > 1 and total_all and dropped(counts_all) / total_all > self.share:
            guesses = {g for _, _, g in self.units.values()}
            guess = guesses.pop() if len(guesses) == 1 else None
            out.append(_message(self.dataset, total_all, counts_all, guess))
        return out

    def warn(self) -> list[str]:
        msgs = self.messages()
        for m in msgs:
            log.warning("%s", m)
        return msgs


def _message(source: str, total: int, counts, guess) -> str:
    n = dropped(counts)
    reasons = ", ".join(f"{counts[k]} {DROP_WORDS[k]}" for k in DROP_KEYS if counts.get(k))
    head = f"all {total} boxes" if n == total else f"{n} of {total} boxes"
    hint = guess(counts) if guess is not None else None
    return f"{source}: {head} dropped ({reasons})" + (f": {hint}" if hint else "")


def dominant_reason(counts) -> str | None:
    """The drop key with the largest count (None when nothing was dropped)."""
    best = max(DROP_KEYS, key=lambda k: counts.get(k, 0))
    return best if counts.get(best, 0) else None


def hint_by_reason(hints: dict[str, str]) -> Callable[[collections.Counter], str | None]:
    """A reader's ``guess(counts)``: the hint of the most frequent drop reason (a
    :data:`DROP_KEYS` key -> text in the words of the format), None without one."""
    return lambda counts: hints.get(dominant_reason(counts) or "")


def format_summary(ds, role: str = "data") -> str:
    """One line per dataset for ``train`` / ``eval`` start-up: images, images skipped, boxes kept,
    dropped and clipped by reason, ignored regions, and other non-zero counters."""
    stats = collections.Counter(getattr(ds, "stats", {}) or {})
    records = getattr(ds, "records", [])
    kept = sum(len(r.labels) for r in records)
    skipped = sum(stats.get(k, 0) for k in IMAGE_SKIP_KEYS)
    missing = stats.get("image_files_not_found", 0)   # counted at open, skipped when read
    parts = [f"{role} {getattr(ds, 'name', ds)}: {len(ds)} images ({skipped} skipped"
             + (f"; {missing} listed with no image file, skipped when read" if missing else "")
             + f"), {getattr(ds, 'num_classes', '?')} classes, {kept} boxes used"]
    drops = ", ".join(f"{DROP_WORDS[k]} {stats[k]}" for k in DROP_KEYS if stats.get(k))
    parts.append(f"dropped {dropped(stats)}" + (f" ({drops})" if drops else ""))
    parts.append(f"clipped {stats.get('clipped_boxes', 0)}")
    shown = set(DROP_KEYS) | {"clipped_boxes", "image_files_not_found"} | set(IMAGE_SKIP_KEYS)
    rest = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(stats.items()) if v and k not in shown)
    if dropped(stats) and getattr(ds, "scores_source_annotations", False) and not role.startswith("train"):
        parts.append("the dropped boxes stay in the COCO evaluation's ground truth (the annotation "
                     "file is scored as it is, as by pycocotools and the official code)")
    return "; ".join(parts) + (f"; {rest}" if rest else "")
