"""damo_jax.ops.boxes against plain-Python references (loops over box pairs, no shared code)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from damo_jax.errors import ConfigError
from damo_jax.ops import boxes


def random_boxes(rng, n):
    xy = rng.uniform(0, 50, (n, 2))
    wh = rng.uniform(0, 30, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def iou_loop(a, b, eps=None):
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / (max(union, eps) if eps else union)
    return out


def giou_loop(p, q, eps):
    iw = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
    ih = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
    inter = iw * ih
    union = max((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter, eps)
    enclose = max((max(p[2], q[2]) - min(p[0], q[0])) * (max(p[3], q[3]) - min(p[1], q[1])), eps)
    return inter / union - (enclose - union) / enclose


def test_pairwise_iou_numpy_and_jax_match_the_loop():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    np.testing.assert_allclose(boxes.pairwise_iou(a, b), iou_loop(a, b), rtol=1e-12)
    np.testing.assert_allclose(boxes.pairwise_iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)),
                               iou_loop(a, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(boxes.pairwise_iou(a, b, eps=1e-6), iou_loop(a, b, eps=1e-6), rtol=1e-12)
    degenerate = np.array([[3.0, 3.0, 3.0, 3.0]])
    assert np.isnan(boxes.pairwise_iou(degenerate, degenerate)[0, 0])     # torchvision: 0/0
    assert boxes.pairwise_iou(degenerate, degenerate, eps=1e-6)[0, 0] == 0.0


def test_aligned_giou_matches_the_loop():
    rng = np.random.default_rng(1)
    p, q = random_boxes(rng, 9), random_boxes(rng, 9)
    expected = [giou_loop(x, y, 1e-6) for x, y in zip(p, q)]
    np.testing.assert_allclose(boxes.aligned_giou(p, q), expected, rtol=1e-12)
    np.testing.assert_allclose(boxes.aligned_giou(p, p), 1.0)


def test_format_conversions_round_trip():
    xyxy = np.array([[10.0, 20.0, 40.0, 60.0]])
    np.testing.assert_array_equal(boxes.xyxy_to_cxcywh(xyxy), [[25.0, 40.0, 30.0, 40.0]])
    np.testing.assert_array_equal(boxes.xyxy_to_xywh(xyxy), [[10.0, 20.0, 30.0, 40.0]])
    np.testing.assert_array_equal(boxes.cxcywh_to_xyxy(boxes.xyxy_to_cxcywh(xyxy)), xyxy)
    np.testing.assert_array_equal(boxes.xywh_to_xyxy(boxes.xyxy_to_xywh(xyxy)), xyxy)
    np.testing.assert_allclose(boxes.scale_boxes(xyxy, (100, 200), (50, 400)), [[20, 10, 80, 30]])


@pytest.mark.parametrize("size,expected", [(640, (640, 640)), ((320, 480), (320, 480))])
def test_check_image_size_accepts_multiples_of_32(size, expected):
    assert boxes.check_image_size(size) == expected


@pytest.mark.parametrize("size", [100, (64, 100), 0, (32,), (32, 32, 32), (32.0, 32.0)])
def test_check_image_size_names_the_value(size):
    with pytest.raises(ConfigError, match="--img-size"):
        boxes.check_image_size(size, "--img-size")


def test_clip_boxes_against_a_loop():
    rng = np.random.default_rng(3)
    raw = rng.uniform(-40, 120, (50, 4)).astype(np.float32)
    out = boxes.clip_boxes(raw, (60, 90))          # (H, W)
    for got, box in zip(out, raw):
        x1, y1, x2, y2 = (float(v) for v in box)
        assert list(got) == [min(max(x1, 0), 90), min(max(y1, 0), 60),
                             min(max(x2, 0), 90), min(max(y2, 0), 60)]
    assert out.dtype == np.float32 and raw.min() < 0      # a new array, the input untouched
    assert boxes.clip_boxes([[1, 2, 3, 4]], (2, 2)).dtype == np.float64
    assert boxes.clip_boxes(np.zeros((0, 4)), (5, 5)).shape == (0, 4)
