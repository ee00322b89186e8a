"""Static-shape batches: ground truth padded to G = ``data.max_boxes`` with a ``gt_valid`` mask.

When an image has more than G boxes the G largest (by area) are kept (original order preserved);
the caller counts and warns (``TrainLoader`` warns once and counts ``truncated_images`` /
``truncated_boxes`` in its ``stats``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pad_targets(boxes, labels, max_boxes: int):
    """(gt_boxes (G, 4) float32, gt_labels (G,) int32, gt_valid (G,) bool, num_dropped)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int32).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"pad_targets: {len(boxes)} boxes but {len(labels)} labels")
    dropped = max(0, len(boxes) - max_boxes)
    if dropped:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.sort(np.argsort(-area, kind="stable")[:max_boxes])
        boxes, labels = boxes[keep], labels[keep]
    n = len(boxes)
    out_boxes = np.zeros((max_boxes, 4), np.float32)
    out_labels = np.zeros((max_boxes,), np.int32)
    valid = np.zeros((max_boxes,), bool)
    out_boxes[:n], out_labels[:n], valid[:n] = boxes, labels, True
    return out_boxes, out_labels, valid, dropped


def collate_train(samples: Sequence[dict], max_boxes: int) -> tuple[dict, int, int]:
    """Stack samples (same image size) → (batch dict, images truncated, boxes dropped)."""
    padded = [pad_targets(s["boxes"], s["labels"], max_boxes) for s in samples]
    batch = {
        "images": np.stack([s["image"] for s in samples]).astype(np.uint8, copy=False),
        "gt_boxes": np.stack([p[0] for p in padded]),
        "gt_labels": np.stack([p[1] for p in padded]),
        "gt_valid": np.stack([p[2] for p in padded]),
        "image_ids": np.asarray([s["image_id"] for s in samples], np.int64),
        "orig_sizes": np.asarray([s["orig_size"] for s in samples], np.int32).reshape(-1, 2),
    }
    dropped = [p[3] for p in padded]
    return batch, sum(d > 0 for d in dropped), sum(dropped)
