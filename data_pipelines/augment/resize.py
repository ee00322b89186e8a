"""Stretch resize (no letterbox, SPEC §9.2 step 5) and the small-box filter (step 4)."""
from __future__ import annotations

import cv2
import numpy as np


def stretch_resize(img: np.ndarray, boxes: np.ndarray, out_hw) -> tuple[np.ndarray, np.ndarray]:
    """Resize to (H, W) with cv2 bilinear, scaling boxes per axis."""
    h0, w0 = img.shape[:2]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    if (h0, w0) == (oh, ow):
        return img, boxes
    out = cv2.resize(img, (ow, oh), interpolation=cv2.INTER_LINEAR)
    boxes[:, 0::2] *= ow / w0
    boxes[:, 1::2] *= oh / h0
    return out, boxes


def drop_small(boxes, labels, min_area: float = 4.0):
    """Keep boxes with area > ``min_area`` (px²); labels filtered with them."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep = area > min_area
    return boxes[keep], np.asarray(labels, np.int32).reshape(-1)[keep]
