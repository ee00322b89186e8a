"""SADA box-level augmentation (SPEC §9.3): probabilities, Gaussians, colour and geometric ops."""
from __future__ import annotations

import math

import numpy as np
import pytest

from data_helpers import CLASS_COLORS, rect_image
from damo_jax.data_pipelines.augment.sada import (BOX_PROB, COLOR_RATIOS, box_select_prob, color_op, gaussian_map,
                                         geometric_op, sada, scale_splits)


def test_scale_splits_and_selection_probabilities():
    np.testing.assert_allclose(scale_splits(640, 640), [1638.4, 8192, 40960])
    np.testing.assert_allclose(scale_splits(416, 500), [1064.96, 5324.8, 26624])
    boxes = np.array([[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 300, 300], [5, 5, 5, 9]], np.float32)
    p = box_select_prob(boxes, scale_splits(640, 640), COLOR_RATIOS)
    np.testing.assert_allclose(p, [BOX_PROB * 7 / 13, BOX_PROB * 5 / 13, BOX_PROB / 13, 0.0])
    np.testing.assert_allclose(box_select_prob(boxes[:3], scale_splits(640, 640), (3, 3, 3)), 0.1)


def test_gaussian_map_centre_and_sigma():
    h, w = 64, 80
    box = np.array([[10, 20, 31, 30]], np.float32)  # bw 21, bh 10 → centre (10 + 10, 20 + 5)
    g = gaussian_map(box, h, w, None)
    assert g.shape == (h, w) and g.argmax() == 25 * w + 20 and g.max() == pytest.approx(1.0)
    r = math.sqrt(h * w / (2 * math.pi))
    sx, sy = 21 / w * r, 10 / h * r
    assert g[25, 20 + 3] == pytest.approx(math.exp(-9 / (2 * sx * sx)), rel=1e-5)
    assert g[25 + 2, 20] == pytest.approx(math.exp(-4 / (2 * sy * sy)), rel=1e-5)
    splits = scale_splits(h, w)
    small = gaussian_map(np.array([[0, 0, 4, 4]], np.float32), h, w, splits)  # area 16 < split0
    k = 6.0 * splits[0] / 16
    r = math.sqrt(k * h * w / (2 * math.pi))
    assert small[2, 2 + 1] == pytest.approx(math.exp(-1 / (2 * (4 / w * r) ** 2)), rel=1e-5)


def test_colour_ops():
    x = np.random.default_rng(0).random((8, 9, 3)).astype(np.float32)
    f = 2 / 10 * 1.8 + 0.1
    grey = x @ np.array([0.2989, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(color_op(x, "color", 2), grey[..., None] + f * (x - grey[..., None]), atol=1e-6)
    np.testing.assert_allclose(color_op(x, "brightness", 4), x * (4 / 10 * 1.8 + 0.1), atol=1e-6)
    add = 2 / 10 * 0.4296875
    np.testing.assert_allclose(color_op(x, "solarize_add", 2), np.where(x < 0.5, np.minimum(x + add, 1), x))
    flat = np.full((6, 6, 3), 0.3, np.float32)
    np.testing.assert_allclose(color_op(flat, "sharpness", 2), flat, atol=1e-6)
    assert color_op(x, "color", 8).max() <= 1.0  # factor 1.54 → clipped


def test_translate_duplicates_the_box_and_pastes_the_object():
    boxes = np.array([[10, 20, 30, 36], [60, 8, 78, 20]], np.float32)
    labels = np.array([2, 4], np.int32)
    img = rect_image(64, 100, boxes, labels, background=90).astype(np.float32) / 255
    for sign_seed in range(6):
        out, b, l = geometric_op(img, boxes, labels, np.array([True, True]), "translate_x", 4,
                                 np.random.default_rng(sign_seed))
        assert len(b) == 4 and l.tolist() == [2, 4, 2, 4]
        np.testing.assert_array_equal(b[:2], boxes)
        for (x1, y1, x2, y2), c in zip(b[2:], l[2:]):
            assert 0 <= x1 and x2 <= 100 and y1 == boxes[list(l[2:]).index(c), 1]
            cy, cx = int(y1 + (y2 - y1) // 2), int(x1 + (x2 - x1) // 2)
            np.testing.assert_allclose(out[cy, cx] * 255, CLASS_COLORS[c], atol=1.0)  # weight 1 at centre
        np.testing.assert_allclose(out[28, 20] * 255, CLASS_COLORS[2], atol=1.0)      # original stays


def test_hflip_and_rotate_change_only_the_box_region():
    boxes = np.array([[20, 10, 44, 40]], np.float32)
    img = np.random.default_rng(1).random((64, 64, 3)).astype(np.float32)
    for name in ("hflip", "rotate", "shear_x"):
        out, b, l = geometric_op(img, boxes, np.array([1], np.int32), np.array([True]), name, 6,
                                 np.random.default_rng(0))
        np.testing.assert_array_equal(b, boxes)
        changed = np.abs(out - img).max(-1) > 1e-6
        ys, xs = np.nonzero(changed)
        assert changed.any() and xs.min() >= 20 and xs.max() < 44 and ys.min() >= 10 and ys.max() < 40


def test_sada_ramp_and_determinism():
    boxes = np.array([[10, 10, 40, 40], [50, 20, 90, 60], [5, 60, 20, 75]], np.float32)
    labels = np.array([0, 1, 2], np.int32)
    img = np.random.default_rng(2).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    for seed in range(20):
        out, b, l = sada(img, boxes, labels, np.random.default_rng(seed), progress=0.0)
        assert out is img and np.array_equal(b, boxes)
    changed = 0
    for seed in range(60):
        out, b, l = sada(img, boxes, labels, np.random.default_rng(seed), progress=1.0)
        again = sada(img, boxes, labels, np.random.default_rng(seed), progress=1.0)
        np.testing.assert_array_equal(out, again[0])
        assert out.dtype == np.uint8 and out.shape == img.shape
        np.testing.assert_array_equal(b[:3], boxes)
        assert len(b) == len(l) and set(l[3:].tolist()) <= {0, 1, 2}
        changed += int(not np.array_equal(out, img))
    assert 3 <= changed <= 45
