"""Random affine (SPEC §9.2 step 2), YOLOX/DAMO style, on numpy HWC uint8 with cv2.

``M = T · Sh · R · C``: C moves the input centre to the origin; R rotates by a ~ U(-degrees,
degrees) with isotropic scale s ~ U(scale); Sh has x/y shear tan(U(-shear°, shear°)); T translates
by U(0.5 - translate, 0.5 + translate) · output size. The image is warped with cv2 bilinear,
border 114. Boxes: when every box has an outline (the object's polygons, :func:`outline_boxes`):
each outline resampled to 1000 points along its vertex list, transformed, and the tight box of the
points inside the output taken; otherwise (box-only data, or a box of the image without one) the
4 transformed corners' axis-aligned hull, clipped to the output — the official ``random_affine``'s
rule. A box is kept iff w > 2, h > 2, new area / (old area · s²) > 0.1 and max(w/h, h/w) < 20.
Labels are filtered with their boxes.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from damo_jax.ops.boxes import clip_boxes

FILL = 114


def affine_matrix(in_hw, out_hw, rng, *, degrees, translate, scale, shear) -> tuple[np.ndarray, float]:
    """(3x3 matrix, scale s) mapping input pixels to output pixels."""
    C = np.eye(3)
    C[0, 2], C[1, 2] = -in_hw[1] / 2, -in_hw[0] / 2
    angle = rng.uniform(-degrees, degrees)
    s = rng.uniform(scale[0], scale[1])
    R = np.eye(3)
    R[:2] = cv2.getRotationMatrix2D(angle=angle, center=(0, 0), scale=s)
    S = np.eye(3)
    S[0, 1] = math.tan(math.radians(rng.uniform(-shear, shear)))
    S[1, 0] = math.tan(math.radians(rng.uniform(-shear, shear)))
    T = np.eye(3)
    T[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_hw[1]
    T[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_hw[0]
    return T @ S @ R @ C, float(s)


def transform_boxes(boxes: np.ndarray, M: np.ndarray, out_hw) -> np.ndarray:
    """Axis-aligned hull of the 4 transformed corners of each box, clipped to the output."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    corners = boxes[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 2)  # (4N, 2)
    pts = corners @ M[:2, :2].T + M[:2, 2]
    if M.shape[0] == 3 and not np.allclose(M[2], [0, 0, 1]):
        pts = pts / (corners @ M[2, :2] + M[2, 2])[:, None]
    pts = pts.reshape(-1, 4, 2)
    return clip_boxes(np.concatenate([pts.min(1), pts.max(1)], 1), out_hw).astype(np.float32)


RESAMPLE_POINTS = 1000


def outline_boxes(outlines, M: np.ndarray, out_hw) -> np.ndarray:
    """(N, 4) float32 boxes of transformed outlines, as the official ``resample_segments`` +
    ``segment2box``: each (K, 2) outline linearly resampled to 1000 points by vertex index (not
    closed), mapped by ``M``, and the min/max of the points with 0 <= x <= W and 0 <= y <= H;
    all zeros (a box the candidate rule drops) where no point with x != 0 is inside."""
    h, w = float(out_hw[0]), float(out_hw[1])
    new = np.zeros((len(outlines), 4), np.float64)
    t = np.linspace(0.0, 1.0, RESAMPLE_POINTS)
    for i, o in enumerate(outlines):
        o = np.asarray(o, np.float64).reshape(-1, 2)
        pos = t * (len(o) - 1)
        xp = np.arange(len(o))
        pts = np.stack([np.interp(pos, xp, o[:, 0]), np.interp(pos, xp, o[:, 1])], 1)
        pts = pts @ M[:2, :2].T + M[:2, 2]
        x, y = pts[:, 0], pts[:, 1]
        inside = (x >= 0) & (y >= 0) & (x <= w) & (y <= h)
        x, y = x[inside], y[inside]
        if np.any(x):
            new[i] = x.min(), y.min(), x.max(), y.max()
    return new.astype(np.float32)


def box_candidates(old: np.ndarray, new: np.ndarray, s: float, *, wh_thr=2.0, ar_thr=20.0,
                   area_thr=0.1, eps=1e-16) -> np.ndarray:
    """Keep mask of the affine keep-box rules (see module docstring)."""
    w1, h1 = old[:, 2] - old[:, 0], old[:, 3] - old[:, 1]
    w2, h2 = new[:, 2] - new[:, 0], new[:, 3] - new[:, 1]
    ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 * s * s + eps) > area_thr) & (ar < ar_thr)


def random_affine(img, boxes, labels, rng, *, out_hw, degrees, translate, scale, shear, outlines=None):
    """Warp ``img`` to ``out_hw`` (H, W) and transform/filter ``boxes``/``labels``; ``outlines``:
    per box a (K, 2) px polygon or None (see the module docstring), or None."""
    M, s = affine_matrix(img.shape[:2], out_hw, rng, degrees=degrees, translate=translate,
                         scale=scale, shear=shear)
    out = cv2.warpAffine(img, M[:2], dsize=(int(out_hw[1]), int(out_hw[0])), flags=cv2.INTER_LINEAR,
                         borderValue=(FILL, FILL, FILL))
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int32).reshape(-1)
    if len(boxes) == 0:
        return out, boxes, labels
    if outlines is not None and len(outlines) != len(boxes):
        raise ValueError(f"random_affine: {len(outlines)} outlines for {len(boxes)} boxes")
    if outlines is not None and all(o is not None and len(o) for o in outlines):
        new = outline_boxes(outlines, M, out_hw)
    else:
        new = transform_boxes(boxes, M, out_hw)
    keep = box_candidates(boxes, new, s)
    return out, new[keep], labels[keep]
