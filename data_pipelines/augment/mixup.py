"""MixUp, YOLOX copy-paste style (SPEC §9.2 step 3).

The copy image is letter-boxed (ratio r = min(H/h, W/w)) into the top-left of an H×W canvas of
114, rescaled by a jitter j ~ U(0.5, 1.5), flipped horizontally with probability 0.5, placed into
a zero canvas of size max(jittered, target) and a random H×W crop is taken; its boxes follow and are
clipped to the crop. Image = 0.5·target + 0.5·crop (float, truncated to uint8); labels concatenated.
"""
from __future__ import annotations

import cv2
import numpy as np

FILL = 114


def mixup(img, boxes, labels, cp_img, cp_boxes, cp_labels, rng, *, jitter=(0.5, 1.5)):
    """Blend (cp_img, cp_boxes, cp_labels) into (img, boxes, labels); returns the new triple."""
    th, tw = img.shape[:2]
    j = rng.uniform(*jitter)
    flip = rng.uniform(0, 1) > 0.5
    h0, w0 = cp_img.shape[:2]
    r = min(th / h0, tw / w0)
    rh, rw = int(h0 * r), int(w0 * r)
    letter = np.full((th, tw, 3), FILL, np.uint8)
    letter[:rh, :rw] = cv2.resize(cp_img, (rw, rh), interpolation=cv2.INTER_LINEAR)
    letter = cv2.resize(letter, (int(tw * j), int(th * j)), interpolation=cv2.INTER_LINEAR)
    r *= j
    if flip:
        letter = letter[:, ::-1]
    oh, ow = letter.shape[:2]
    padded = np.zeros((max(oh, th), max(ow, tw), 3), np.uint8)
    padded[:oh, :ow] = letter
    y_off = int(rng.integers(0, padded.shape[0] - th)) if padded.shape[0] > th else 0
    x_off = int(rng.integers(0, padded.shape[1] - tw)) if padded.shape[1] > tw else 0
    crop = padded[y_off:y_off + th, x_off:x_off + tw]
    b = np.asarray(cp_boxes, np.float32).reshape(-1, 4) * r
    b[:, 0::2] = np.clip(b[:, 0::2], 0, ow)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, oh)
    if flip:
        b[:, 0::2] = ow - b[:, [2, 0]]
    b[:, 0::2] = np.clip(b[:, 0::2] - x_off, 0, tw)
    b[:, 1::2] = np.clip(b[:, 1::2] - y_off, 0, th)
    # 0.5·a + 0.5·b truncated to uint8 == (a + b) >> 1, computed in integers
    out = ((img.astype(np.uint16) + crop) >> 1).astype(np.uint8)
    boxes = np.concatenate([np.asarray(boxes, np.float32).reshape(-1, 4), b])
    labels = np.concatenate([np.asarray(labels, np.int32).reshape(-1),
                             np.asarray(cp_labels, np.int32).reshape(-1)])
    return out, boxes, labels
