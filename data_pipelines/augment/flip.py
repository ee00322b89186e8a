"""Horizontal flip of image and boxes (SPEC §9.2 step 5, p = 0.5)."""
from __future__ import annotations

import cv2
import numpy as np


def hflip(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = img.shape[1]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    return cv2.flip(np.ascontiguousarray(img), 1), boxes


def random_hflip(img, boxes, rng: np.random.Generator, p: float = 0.5):
    if rng.random() < p:
        return hflip(img, boxes)
    return img, np.asarray(boxes, np.float32).reshape(-1, 4)
