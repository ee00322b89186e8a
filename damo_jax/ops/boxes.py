"""Box operations shared by assignment, losses, NMS and the inference path.

Boxes are float arrays whose last axis holds 4 numbers in pixels:

* ``xyxy``   — x1, y1, x2, y2 (the library's layout everywhere);
* ``cxcywh`` — centre x, centre y, width, height;
* ``xywh``   — x1, y1, width, height (the COCO results layout).

The IoU functions work on jax or numpy inputs (``jnp`` ops); :func:`check_image_size` is the one
multiple-of-32 check of network input sizes (models, configs, CLIs, the detector).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

STRIDE = 32  # the coarsest feature stride: every network input side is a multiple of it


def check_image_size(size, what: str = "image size") -> tuple[int, int]:
    """(H, W) of an int or an (H, W) pair; :class:`~damo_jax.errors.ConfigError` naming ``what``
    unless both are positive multiples of 32."""
    from damo_jax.errors import ConfigError
    values = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) for v in values):
        raise ConfigError(f"{what} {size!r}: expected one integer or two (H W)")
    h, w = int(values[0]), int(values[1])
    if h <= 0 or w <= 0 or h % STRIDE or w % STRIDE:
        raise ConfigError(f"{what} {h}x{w}: height and width must be positive multiples of "
                          f"{STRIDE} (e.g. {max(STRIDE, round(h / STRIDE) * STRIDE)})")
    return h, w


# ------------------------------------------------------------------------------ conversions
def xyxy_to_cxcywh(boxes):
    """(..., 4) x1y1x2y2 -> (..., 4) cx, cy, w, h."""
    xp = _xp(boxes)
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    return xp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes):
    """(..., 4) cx, cy, w, h -> (..., 4) x1y1x2y2."""
    xp = _xp(boxes)
    cx, cy, w, h = (boxes[..., i] for i in range(4))
    return xp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_xywh(boxes):
    """(..., 4) x1y1x2y2 -> (..., 4) x1, y1, w, h (COCO)."""
    xp = _xp(boxes)
    return xp.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)


def xywh_to_xyxy(boxes):
    """(..., 4) x1, y1, w, h (COCO) -> (..., 4) x1y1x2y2."""
    xp = _xp(boxes)
    return xp.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


def scale_boxes(boxes, from_hw: Sequence[float], to_hw: Sequence[float]):
    """(..., 4) xyxy boxes of an image of size ``from_hw`` -> pixels of ``to_hw`` (independent x / y
    factors: the inverse of the stretch resize). numpy, float64 factors."""
    fx = float(to_hw[1]) / float(from_hw[1])
    fy = float(to_hw[0]) / float(from_hw[0])
    return np.asarray(boxes, np.float64) * np.array([fx, fy, fx, fy])


def clip_boxes(boxes, hw: Sequence[float]):
    """(N, 4) xyxy pixel boxes clipped to an image of size ``hw`` = (H, W): x to [0, W], y to [0, H].
    numpy; returns a new array of the input's float dtype (float64 for other inputs)."""
    boxes = np.asarray(boxes)
    out = np.array(boxes, boxes.dtype if boxes.dtype.kind == "f" else np.float64).reshape(-1, 4)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, hw[1])
    out[:, 1::2] = np.clip(out[:, 1::2], 0, hw[0])
    return out


def _xp(x):
    return np if isinstance(x, np.ndarray) else __import__("jax.numpy", fromlist=["numpy"])


# ------------------------------------------------------------------------------------- IoU
def box_area(boxes):
    """(..., 4) xyxy -> (...,) area ``(x2-x1)*(y2-y1)`` (no +1, may be negative for inverted)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_intersection(boxes_a, boxes_b):
    """(N, 4), (M, 4) xyxy -> (area_a (N,), area_b (M,), intersection (N, M))."""
    xp = _xp(boxes_a)
    top_left = xp.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = xp.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    wh = xp.maximum(bottom_right - top_left, 0.0)
    return box_area(boxes_a), box_area(boxes_b), wh[..., 0] * wh[..., 1]


def pairwise_iou(boxes_a, boxes_b, *, eps: float | None = None,
                 round_terms: Callable | None = None):
    """IoU of every box of (N, 4) with every box of (M, 4), xyxy -> (N, M).

    ``eps=None``: torchvision's formula ``inter / (area_a + area_b - inter)`` (a 0/0 IoU of
    degenerate boxes is NaN; NMS relies on that); ``eps``: the union is clamped at ``>= eps``.
    ``round_terms(area_a, area_b, inter)`` may re-round the terms before the union (assignment's
    FMA barrier, :func:`damo_jax.assign.cost.rounded`).
    """
    xp = _xp(boxes_a)
    area_a, area_b, inter = pairwise_intersection(boxes_a, boxes_b)
    if round_terms is not None:
        area_a, area_b, inter = round_terms(area_a, area_b, inter)
    union = area_a[:, None] + area_b[None, :] - inter
    if eps is not None:
        union = xp.maximum(union, eps)
    if xp is np:
        with np.errstate(invalid="ignore", divide="ignore"):     # 0/0 -> NaN is the contract
            return inter / union
    return inter / union


def aligned_giou(pred, target, eps: float = 1e-6):
    """GIoU of matching rows (..., 4) xyxy: IoU − (enclose − union) / enclose, with the union and
    the enclosing area clamped ``>= eps``."""
    xp = _xp(pred)
    wh = xp.maximum(xp.minimum(pred[..., 2:], target[..., 2:])
                    - xp.maximum(pred[..., :2], target[..., :2]), 0.0)
    overlap = wh[..., 0] * wh[..., 1]
    union = xp.maximum(box_area(pred) + box_area(target) - overlap, eps)
    enclose_wh = xp.maximum(xp.maximum(pred[..., 2:], target[..., 2:])
                            - xp.minimum(pred[..., :2], target[..., :2]), 0.0)
    enclose = xp.maximum(enclose_wh[..., 0] * enclose_wh[..., 1], eps)
    return overlap / union - (enclose - union) / enclose
