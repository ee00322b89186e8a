"""Augmentations keep boxes on their objects: each object is a rectangle filled with its class
colour, so after every transform the box must equal the bounding box of that colour's pixels."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from data_helpers import (CLASS_COLORS, color_components, ellipse_scene, make_coco_dataset, random_scene,
                          write_coco)
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
        canvas, boxes, labels, outlines = mosaic(parts, (64, 64), np.random.default_rng(seed))
        assert outlines is None                 # box-only samples
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


def _box_errors(img, boxes, labels):
    """Per box, the largest coordinate error (px) to the nearest region of its class colour."""
    return [min((np.abs(np.asarray(c[:4], float) - box).max() for c in color_components(img, int(l))),
                default=np.inf) for box, l in zip(boxes, labels)]


@pytest.mark.parametrize("with_polygons", [True, False])
def test_boxes_after_the_affine_come_from_the_objects_polygons(tmp_path, with_polygons):
    """SPEC §9.2 step 2 (the official random_affine): with polygon segmentation the boxes after
    mosaic + affine are the tight boxes of the warped objects (here: filled ellipses, checked
    against their pixels), not the hull of the warped box corners, which is up to ~20 % wider for
    a rotated ellipse. Without polygons the corner hull stays (and misses the pixels)."""
    rng = np.random.default_rng(0)
    scenes = [ellipse_scene(rng, 96, 128) for _ in range(6)]
    write_coco(tmp_path, [sc[:3] for sc in scenes], polygons=[sc[3] for sc in scenes] if with_polygons else None)
    from damo_jax.data_pipelines import open_dataset
    ds = open_dataset(f"coco:{tmp_path}", "train")
    params = AugParams(image_size=(96, 96), mosaic_size=(96, 96), mixup_prob=0.0, sada=False,
                       mosaic_scale=(0.8, 1.3), degrees=35.0, shear=2.0, flip_prob=0.0)
    errors = []
    for k in range(10):
        s = train_sample(ds, k % len(ds), np.random.default_rng(k), params, mosaic_on=True, progress=0.5)
        errors += _box_errors(s["image"], s["boxes"], s["labels"])
    errors = np.asarray(errors)
    assert len(errors) > 15
    if with_polygons:
        assert errors.max() <= 2.0, np.sort(errors)[-5:]
    else:
        assert (errors > 3.0).mean() > 0.3, np.sort(errors)


def test_polygon_boxes_need_every_box_to_have_one_and_see_only_the_visible_part():
    """The official rule: outlines are used only when every box has one (else the corners for all);
    an object cut by the output border gets the box of its visible part."""
    from damo_jax.data_pipelines.augment.affine import outline_boxes
    # a diamond shifted by +60 px spans x 80..140 in a 100x100 output: its visible part x 80..100
    # is the triangle whose height at x = 100 is 50 ± 20
    diamond = np.array([[20, 50], [50, 20], [80, 50], [50, 80], [20, 50]], np.float64)
    M = np.array([[1.0, 0, 60], [0, 1.0, 0], [0, 0, 1]])
    np.testing.assert_allclose(outline_boxes([diamond], M, (100, 100))[0], [80, 30, 100, 70], atol=0.2)
    # entirely outside: all zeros (the candidate rule drops it)
    np.testing.assert_array_equal(outline_boxes([diamond + 300], M, (100, 100))[0], [0, 0, 0, 0])
    img = np.zeros((100, 100, 3), np.uint8)
    boxes = np.array([[20, 20, 80, 80], [5, 5, 15, 15]], np.float32)
    kw = dict(out_hw=(100, 100), degrees=30.0, translate=0.0, scale=(1.0, 1.0), shear=0.0)
    corners = random_affine(img, boxes, [0, 1], np.random.default_rng(3), **kw)[1]
    mixed = random_affine(img, boxes, [0, 1], np.random.default_rng(3), outlines=[diamond, None], **kw)[1]
    np.testing.assert_array_equal(mixed, corners)
    square = np.array([[5, 5], [15, 5], [15, 15], [5, 15], [5, 5]], np.float64)
    both = random_affine(img, boxes, [0, 1], np.random.default_rng(3), outlines=[diamond, square], **kw)[1]
    assert (both[0, 2] - both[0, 0]) < (corners[0, 2] - corners[0, 0]) - 5   # the diamond's tight box
