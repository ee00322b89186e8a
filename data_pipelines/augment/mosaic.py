"""Mosaic (SPEC §9.2 step 1): four images stretched to ``mosaic_size`` around a random centre.

The canvas is twice the mosaic size, filled with 114; the centre ``(xc, yc)`` is
``int(U(0.5, 1.5) · size)`` per axis; image k goes into the top-left / top-right / bottom-left /
bottom-right quadrant around the centre, cropped where it leaves the canvas. Each image is
stretched (no aspect ratio kept, cv2 bilinear) to exactly the mosaic size, its boxes scaled per
axis, shifted, and clipped to the canvas. Boxes and labels stay paired (SPEC §12 item 27).
Object outlines (polygons, where the samples carry them) are scaled and shifted the same way and
their points clipped to the canvas, for the random affine's boxes (SPEC §9.2 step 1).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from damo_jax.ops.boxes import clip_boxes

FILL = 114


def quadrant(k: int, xc: int, yc: int, w: int, h: int, canvas_w: int, canvas_h: int):
    """(canvas x1, y1, x2, y2), (source x1, y1, x2, y2) of image ``k`` (0..3) of size w×h."""
    if k == 0:
        x1, y1, x2, y2 = max(xc - w, 0), max(yc - h, 0), xc, yc
        src = (w - (x2 - x1), h - (y2 - y1), w, h)
    elif k == 1:
        x1, y1, x2, y2 = xc, max(yc - h, 0), min(xc + w, canvas_w), yc
        src = (0, h - (y2 - y1), min(w, x2 - x1), h)
    elif k == 2:
        x1, y1, x2, y2 = max(xc - w, 0), yc, xc, min(canvas_h, yc + h)
        src = (w - (x2 - x1), 0, w, min(y2 - y1, h))
    else:
        x1, y1, x2, y2 = xc, yc, min(xc + w, canvas_w), min(canvas_h, yc + h)
        src = (0, 0, min(w, x2 - x1), min(y2 - y1, h))
    return (x1, y1, x2, y2), src


def mosaic(samples: Sequence[tuple], mosaic_hw: tuple[int, int], rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list | None]:
    """Combine 4 (image uint8 HWC, boxes (N,4) xyxy px, labels (N,)[, outlines]) into one (2H, 2W)
    canvas: (canvas, boxes, labels, outlines). ``outlines`` (optional 4th item of a sample): per
    box a (K, 2) px polygon or None; the result has one entry per box (None where a box has
    none), or is None when no sample carries outlines."""
    if len(samples) != 4:
        raise ValueError(f"mosaic needs 4 samples, got {len(samples)}")
    mh, mw = int(mosaic_hw[0]), int(mosaic_hw[1])
    ch, cw = 2 * mh, 2 * mw
    yc = int(rng.uniform(0.5 * mh, 1.5 * mh))
    xc = int(rng.uniform(0.5 * mw, 1.5 * mw))
    canvas = np.full((ch, cw, 3), FILL, np.uint8)
    all_boxes, all_labels, all_outlines = [], [], []
    carried = any(len(sample) > 3 and sample[3] is not None for sample in samples)
    for k, (img, boxes, labels, *rest) in enumerate(samples):
        h0, w0 = img.shape[:2]
        if (h0, w0) != (mh, mw):
            img = cv2.resize(img, (mw, mh), interpolation=cv2.INTER_LINEAR)
        (x1, y1, x2, y2), (sx1, sy1, sx2, sy2) = quadrant(k, xc, yc, mw, mh, cw, ch)
        canvas[y1:y2, x1:x2] = img[sy1:sy2, sx1:sx2]
        padw, padh = x1 - sx1, y1 - sy1
        b = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
        b[:, 0::2] = b[:, 0::2] * (mw / w0) + padw
        b[:, 1::2] = b[:, 1::2] * (mh / h0) + padh
        all_boxes.append(b)
        all_labels.append(np.asarray(labels, np.int32).reshape(-1))
        outlines = rest[0] if rest and rest[0] is not None else [None] * len(b)
        if len(outlines) != len(b):
            raise ValueError(f"mosaic sample {k}: {len(outlines)} outlines for {len(b)} boxes")
        for o in outlines:
            if o is not None:
                o = np.asarray(o, np.float64).reshape(-1, 2) * (mw / w0, mh / h0) + (padw, padh)
                o = np.clip(o, 0, (cw, ch))
            all_outlines.append(o)
    boxes = clip_boxes(np.concatenate(all_boxes), (ch, cw))
    return canvas, boxes, np.concatenate(all_labels), (all_outlines if carried else None)
