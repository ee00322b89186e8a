"""SADA: scale-aware box-level augmentation (SPEC §9.3).

Per image one of 5 sub-policies (colour op, geometric op) is chosen; each op fires with
probability ``p · progress``. ``progress`` is passed in explicitly (global step / total steps,
deterministic) — this replaces the official per-worker estimate from the number of samples a
loader worker has processed.

* Colour op: computed on the whole image, then mixed in through the clipped sum of anisotropic
  Gaussians of the selected boxes (selection probability 0.3 · scale ratio (7, 5, 1)/13 for
  small / medium / large boxes).
* Geometric op (selection probability 0.1 per box): hflip / rotate / shear of the box crop blended
  back through an isotropic Gaussian; translate pastes the unchanged crop at a shifted position
  and appends a duplicate box with the same label. The shift is limited so the whole crop stays
  inside the image, and the duplicate box is shifted by the same amount (the official code limits
  the box shift only at the far edge and pastes the crop with the unlimited shift; we keep image
  and box consistent).

Works on float [0, 1] internally; the result is rounded back to uint8 (the official pipeline keeps
the float tensor; the difference is ≤ 0.5/255).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

SUB_POLICIES = (
    (("color", 0.4, 2), ("translate_x", 0.4, 4)),
    (("brightness", 0.2, 4), ("rotate", 0.4, 2)),
    (("sharpness", 0.4, 2), ("shear_x", 0.2, 6)),
    (("solarize_add", 0.2, 2), ("hflip", 0.5, 1)),
    (("color", 0.0, 8), ("translate_y", 0.2, 8)),
)
BOX_PROB = 0.3
COLOR_RATIOS = (7, 5, 1)
GEOMETRIC_RATIOS = (3, 3, 3)
SCALE_SPLITS_800 = (2048.0, 10240.0, 51200.0)
GAUSSIAN_K = (6.0, 2.0, 0.4)            # small / medium / large Gaussian scale ratios
GEOMETRIC_FILL = (102, 115, 122)
MAX_LEVEL = 10.0


def scale_splits(h: int, w: int) -> np.ndarray:
    return np.asarray(SCALE_SPLITS_800) * min(h, w) / 800.0


def box_select_prob(boxes: np.ndarray, splits: np.ndarray, ratios) -> np.ndarray:
    """Per-box selection probability 0.3 · ratio(size bucket); 0 for empty boxes."""
    r = np.asarray(ratios, np.float64) / np.sum(ratios)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    bucket = np.where(area < splits[0], 0, np.where(area < splits[1], 1, 2))
    return np.where(area > 0, BOX_PROB * r[bucket], 0.0)


def gaussian_map(boxes: np.ndarray, h: int, w: int, splits: np.ndarray | None) -> np.ndarray:
    """Sum over boxes of the box Gaussians (not clipped); (H, W) float32.

    Centre (x1 + floor(bw/2), y1 + floor(bh/2)); σ_y = bh/H · r, σ_x = bw/W · r, r = sqrt(k·H·W/2π)
    with the scale-aware k (splits given) or k = 1.
    """
    rows, cols = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    total = np.zeros((h, w), np.float64)
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        bw, bh = x2 - x1, y2 - y1
        area = bw * bh
        if area <= 0:
            continue
        if splits is None:
            k = 1.0
        elif area < splits[0]:
            k = GAUSSIAN_K[0] * splits[0] / area
        elif area < splits[1]:
            k = GAUSSIAN_K[1] * (splits[0] + splits[1]) / 2.0 / area
        elif area < splits[2]:
            k = GAUSSIAN_K[2] * splits[2] / area
        else:
            k = GAUSSIAN_K[2]
        r = math.sqrt(k * h * w / (2 * math.pi))
        sy, sx = bh / h * r, bw / w * r
        gy = np.exp(-((rows - (y1 + bh // 2)) ** 2) / (2 * sy * sy))
        gx = np.exp(-((cols - (x1 + bw // 2)) ** 2) / (2 * sx * sx))
        total += np.outer(gy, gx)
    return total.astype(np.float32)


def _blend(a: np.ndarray, b: np.ndarray, f: float) -> np.ndarray:
    out = a + f * (b - a)
    return out if 0.0 < f < 1.0 else np.clip(out, 0.0, 1.0)


def color_op(x: np.ndarray, name: str, level: float) -> np.ndarray:
    """Whole-image colour op on float [0, 1] HWC RGB."""
    if name == "solarize_add":
        add = level / MAX_LEVEL * 0.4296875
        return np.where(x < 0.5, np.clip(x + add, 0.0, 1.0), x)
    f = level / MAX_LEVEL * 1.8 + 0.1
    if name == "color":
        grey = x @ np.asarray([0.2989, 0.587, 0.114], np.float32)
        return _blend(np.repeat(grey[..., None], 3, axis=2), x, f)
    if name == "brightness":
        return _blend(np.zeros_like(x), x, f)
    if name == "sharpness":
        kernel = np.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
        smooth = cv2.filter2D(x, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
        return _blend(smooth, x, f)
    raise ValueError(f"unknown SADA colour op {name!r}")


def _crop_transform(crop: np.ndarray, name: str, level: float, sign: float) -> np.ndarray:
    h, w = crop.shape[:2]
    if name == "hflip":
        return crop[:, ::-1]
    cx, cy = w * 0.5, h * 0.5
    if name == "rotate":
        M = cv2.getRotationMatrix2D((cx, cy), sign * level / MAX_LEVEL * 30.0, 1.0)
    elif name == "shear_x":
        t = math.tan(math.radians(sign * level / MAX_LEVEL * 15.0))
        M = np.asarray([[1.0, t, -t * cy], [0.0, 1.0, 0.0]])
    else:
        raise ValueError(f"unknown SADA geometric op {name!r}")
    fill = tuple(v / 255.0 for v in GEOMETRIC_FILL)
    return cv2.warpAffine(crop, M, (w, h), flags=cv2.INTER_LINEAR, borderValue=fill)


def geometric_op(x, boxes, labels, selected, name, level, rng):
    """Apply a geometric op to the selected boxes' regions; returns (image, boxes, labels)."""
    h, w = x.shape[:2]
    sign = -1.0 if rng.random() < 0.5 else 1.0
    shift = sign * level / MAX_LEVEL * 120.0
    y = x.copy()
    new_boxes, new_labels = [], []
    for box, label in zip(boxes[selected], labels[selected]):
        x1, y1 = int(max(box[0], 0)), int(max(box[1], 0))
        x2, y2 = int(min(box[2], w)), int(min(box[3], h))
        if x1 >= x2 or y1 >= y2:
            continue
        crop = x[y1:y2, x1:x2]
        dx = dy = 0
        if name in ("translate_x", "translate_y"):
            t = int(shift)
            if name == "translate_x":
                dx = int(np.clip(t, -x1, w - x2))
            else:
                dy = int(np.clip(t, -y1, h - y2))
            if dx == 0 and dy == 0:
                continue
            new_boxes.append(box + np.asarray([dx, dy, dx, dy], np.float32))
            new_labels.append(label)
        else:
            crop = _crop_transform(crop, name, level, sign)
        ch, cw = crop.shape[:2]
        g = gaussian_map(np.asarray([[0, 0, cw, ch]]), ch, cw, None)[..., None]
        region = y[y1 + dy:y2 + dy, x1 + dx:x2 + dx]
        y[y1 + dy:y2 + dy, x1 + dx:x2 + dx] = g * crop + (1 - g) * region
    if new_boxes:
        boxes = np.concatenate([boxes, np.asarray(new_boxes, np.float32)])
        labels = np.concatenate([labels, np.asarray(new_labels, np.int32)])
    return y, boxes, labels


def sada(img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
         progress: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SADA on uint8 HWC RGB; ``progress`` in [0, 1] scales both op probabilities."""
    progress = float(np.clip(progress, 0.0, 1.0))
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int32).reshape(-1)
    (cname, cp, clevel), (gname, gp, glevel) = SUB_POLICIES[int(rng.integers(len(SUB_POLICIES)))]
    fire_color, fire_geom = rng.random() < cp * progress, rng.random() < gp * progress
    if len(boxes) == 0 or not (fire_color or fire_geom):
        return img, boxes, labels
    h, w = img.shape[:2]
    splits = scale_splits(h, w)
    x = img.astype(np.float32) / 255.0
    if fire_color:
        sel = rng.random(len(boxes)) < box_select_prob(boxes, splits, COLOR_RATIOS)
        if sel.any():
            g = np.clip(gaussian_map(boxes[sel], h, w, splits), 0.0, 1.0)[..., None]
            x = x * (1 - g) + color_op(x, cname, clevel) * g
    if fire_geom:
        sel = rng.random(len(boxes)) < box_select_prob(boxes, splits, GEOMETRIC_RATIOS)
        if sel.any():
            x, boxes, labels = geometric_op(x, boxes, labels, sel, gname, glevel, rng)
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8), boxes, labels
