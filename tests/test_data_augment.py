"""Augmentations keep boxes on their objects: each object is a rectangle filled with its class
colour, so after every transform the box must equal the bounding box of that colour's pixels."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from data_helpers import CLASS_COLORS, color_components, make_coco_dataset, random_scene
from damo_jax.data_pipelines.augment import (AugParams, box_candidates, drop_small, hflip, mixup, mosaic,
                                    random_affine, stretch_resize, train_sample, transform_boxes)


def assert_boxes_on_objects(img, boxes, labels, tol=2.0, min_match=1.0):
    """Every box matches (within tol px) the bbox of a connected region of its class colour."""
    matched = 0
    for box, label in zip(boxes, labels):
        comps = color_components(img, int(label))
        errs = [np.abs(np.asarray(c[:4], float) - box).max() for c in comps]
        if errs and min(errs) <= tol:
            matched += 1
    assert matched >= min_match * len(boxes), (matched, len(boxes), boxes, labels)


def test_stretch_resize_and_flip_move_boxes_with_pixels():
    rng = np.random.default_rng(0)
    img, boxes, labels = random_scene(rng, 60, 100)
    out, b = stretch_resize(img, boxes, (120, 80))
    assert out.shape == (120, 80, 3)
    assert_boxes_on_objects(out, b, labels, tol=1.5)
    f, fb = hflip(out, b)
    assert_boxes_on_objects(f, fb, labels, tol=1.5)
    np.testing.assert_allclose(hflip(*hflip(out, b))[1], b)


def test_drop_small_filters_labels_with_boxes():
    boxes = np.array([[0, 0, 2, 2], [0, 0, 3, 2], [0, 0, 0, 10]], np.float32)  # area 4, 6, 0
    b, l = drop_small(boxes, np.array([7, 8, 9]))
    np.testing.assert_array_equal(l, [8])
    np.testing.assert_allclose(b, boxes[1:2])


def test_mosaic_places_four_stretched_images_around_the_centre():
    rng = np.random.default_rng(1)
    parts = [random_scene(rng, 40 + 10 * k, 70 - 10 * k) for k in range(4)]
    for seed in range(5):
        canvas, boxes, labels = mosaic(parts, (64, 64), np.random.default_rng(seed))
        assert canvas.shape == (128, 128, 3) and len(boxes) == len(labels) == sum(len(p[2]) for p in parts)
        assert boxes.min() >= 0 and boxes.max() <= 128
        visible = (boxes[:, 2] - boxes[:, 0] > 1) & (boxes[:, 3] - boxes[:, 1] > 1)
        assert_boxes_on_objects(canvas, boxes[visible], labels[visible], tol=1.5)
        assert (canvas == 114).all(-1).any()  # the fill


def test_transform_boxes_is_the_hull_of_the_corners():
    M = np.array([[0.0, -1.0, 50.0], [1.0, 0.0, 0.0], [0, 0, 1]])  # rotate 90° + shift
    np.testing.assert_allclose(transform_boxes(np.array([[10, 20, 30, 25]]), M, (100, 100)), [[25, 10, 30, 30]])
    old = np.array([[0, 0, 10, 10]] * 4, np.float32)
    new = np.array([[0, 0, 10, 10], [0, 0, 2, 10], [0, 0, 9, 0.4], [0, 0, 100, 4]], np.float32)
    np.testing.assert_array_equal(box_candidates(old, new, 1.0), [True, False, False, False])
    assert not box_candidates(old[:1], np.array([[0, 0, 3, 3]], np.float32), 1.0)[0]  # area ratio 0.09


@pytest.mark.parametrize("seed", range(4))
def test_random_affine_keeps_boxes_on_objects(seed):
    rng = np.random.default_rng(seed)
    img, boxes, labels = random_scene(rng, 128, 128, max_objects=4)
    out, b, l = random_affine(img, boxes, labels, np.random.default_rng(seed), out_hw=(96, 112),
                              degrees=10.0, translate=0.1, scale=(0.6, 1.2), shear=2.0)
    assert out.shape == (96, 112, 3) and len(b) == len(l) and len(b) >= 1
    # a rotated filled rectangle's bbox is exactly the hull of its transformed corners
    assert_boxes_on_objects(out, b, l, tol=2.0)


def test_mixup_blends_and_concatenates_boxes():
    rng = np.random.default_rng(3)
    target, tb, tl = random_scene(rng, 64, 64, max_objects=1)
    cp, cb, cl = random_scene(rng, 40, 90, max_objects=2)
    cl = (cl + 1) % len(CLASS_COLORS)
    cp = np.zeros_like(cp)
    for (x1, y1, x2, y2), c in zip(cb.astype(int), cl):
        cp[y1:y2, x1:x2] = CLASS_COLORS[c]
    checked = 0
    for seed in range(4):
        out, b, l = mixup(target, tb, tl, cp, cb, cl, np.random.default_rng(seed))
        assert out.shape == target.shape and len(b) == len(l) == len(tb) + len(cb)
        np.testing.assert_array_equal(l, np.concatenate([tl, cl]))
        # every copied box with some area covers pixels that carry half of its class colour
        for box, c in zip(b[len(tb):], cl):
            x1, y1, x2, y2 = np.round(box).astype(int)
            if x2 - x1 < 3 or y2 - y1 < 3:
                continue
            patch = out[y1 + 1:y2 - 1, x1 + 1:x2 - 1].astype(int)
            base = target[y1 + 1:y2 - 1, x1 + 1:x2 - 1].astype(int)
            half = CLASS_COLORS[c].astype(int) // 2
            assert np.abs((patch - base // 2) - half).max() <= 2
            checked += 1
    assert checked >= 4


def test_full_training_sample_keeps_boxes_on_objects():
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        ds, _ = make_coco_dataset(Path(d), n=6, size=(96, 128), max_objects=3)
        params = AugParams(image_size=(64, 64), mosaic_size=(96, 96), mixup_prob=0.0, sada=False,
                           mosaic_scale=(0.5, 1.5), shear=2.0)
        total = 0
        for k in range(12):
            stats = collections.Counter()
            s = train_sample(ds, k % len(ds), np.random.default_rng(k), params, mosaic_on=k < 8,
                             progress=0.5, stats=stats)
            assert s["image"].shape == (64, 64, 3) and s["image"].dtype == np.uint8
            assert s["boxes"].shape == (len(s["labels"]), 4) and s["labels"].dtype == np.int32
            assert np.all(s["boxes"][:, 2] > s["boxes"][:, 0]) and np.all(s["boxes"][:, 3] > s["boxes"][:, 1])
            assert_boxes_on_objects(s["image"], s["boxes"], s["labels"], tol=2.0, min_match=1.0)
            total += len(s["boxes"])
        assert total > 10
