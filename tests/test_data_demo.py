"""The procedural demo dataset: exact visible-part boxes, determinism, atomic cache, COCO path."""
from __future__ import annotations

import numpy as np
import pytest

from damo_jax.data_pipelines import demo, open_dataset


def test_bundled_photos_load_offline_and_splits_use_disjoint_backgrounds():
    assert not set(demo.TRAIN_BACKGROUNDS) & set(demo.VAL_BACKGROUNDS)
    for name in set(demo.TRAIN_BACKGROUNDS + demo.VAL_BACKGROUNDS + demo.FILL_PHOTOS):
        photo = demo.load_photo(name)
        assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8 and min(photo.shape[:2]) >= 128


def test_boxes_are_tight_boxes_of_the_visible_pixels():
    sizes, n_boxes = [], 0
    for i in range(24):
        img, boxes, labels, areas, kept = demo.render_sample(np.random.default_rng((9, i)), 320,
                                                             demo.TRAIN_BACKGROUNDS)
        assert img.shape == (320, 320, 3) and img.dtype == np.uint8
        assert len(boxes) == len(labels) == len(areas) == kept.max()
        for k, (box, area) in enumerate(zip(boxes, areas), 1):
            ys, xs = np.nonzero(kept == k)
            assert area == len(xs)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            sizes.append(np.sqrt((box[2] - box[0]) * (box[3] - box[1])))
        assert set(labels.tolist()) <= set(range(len(demo.CLASS_NAMES)))
        n_boxes += len(boxes)
    assert n_boxes >= 24 and min(sizes) < 32 and max(sizes) > 96  # objects for all three strides


def test_shape_masks_differ_between_classes():
    rng = np.random.default_rng(0)
    masks = [demo.shape_mask(c, 40, rng) > 127 for c in range(len(demo.CLASS_NAMES))]
    fills = [m.mean() for m in masks]
    assert len({round(f, 2) for f in fills}) == len(fills)  # circle, square, ... cover different areas
    ring, circle = masks[demo.CLASS_NAMES.index("ring")], masks[demo.CLASS_NAMES.index("circle")]
    assert circle[21, 21] and not ring[21, 21]  # the ring has a hole


def test_generation_is_deterministic_atomic_and_cached(tmp_path):
    a = demo.ensure_demo(64, root=tmp_path / "a", num_train=4, num_val=2)
    b = demo.ensure_demo(64, root=tmp_path / "b", num_train=4, num_val=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4 + 2 + 2 + 1
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    stamp = (a / "meta.json").stat().st_mtime_ns
    assert demo.ensure_demo(64, root=a, num_train=4, num_val=2) == a
    assert (a / "meta.json").stat().st_mtime_ns == stamp  # not regenerated
    (a / "meta.json").write_text('{"fingerprint": "stale"}')  # knobs changed since: regenerate in place
    (a / "train2017" / "000000000001.jpg").write_bytes(b"old")
    assert demo.ensure_demo(64, root=a, num_train=4, num_val=2) == a
    assert (a / "train2017" / "000000000001.jpg").read_bytes() == (b / "train2017" / "000000000001.jpg").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_open_dataset_demo_reads_the_generated_coco_files(tmp_path, monkeypatch):
    monkeypatch.setenv("DAMO_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "NUM_TRAIN", 5)
    monkeypatch.setattr(demo, "NUM_VAL", 3)
    val = open_dataset("demo", "val")
    assert len(val) == 3 and val.class_names == demo.CLASS_NAMES
    assert (tmp_path / f"demo_v{demo.VERSION}" / "annotations" / "instances_val2017.json").is_file()
    s = val[0]
    assert s["image"].shape == (320, 320, 3) and s["orig_size"] == (320, 320)
    gt = val.to_coco_dict()
    assert {c["id"] for c in gt["categories"]} == set(range(1, 7))
    assert sum(len(val[i]["boxes"]) for i in range(3)) == len(gt["annotations"])
    small = open_dataset("demo:128", "train")
    assert len(small) == 5 and small[0]["image"].shape == (128, 128, 3)
    with pytest.raises(Exception, match="unknown split"):
        open_dataset("demo", "test")
