"""COCO evaluation: faster-coco-eval == pycocotools, conversion of NMS output, edge cases."""
from __future__ import annotations

import numpy as np
import pytest

from damo_jax.evaluation.coco import (STAT_NAMES, coco_evaluate, detections_to_coco,
                                format_coco_table)

CATEGORY_IDS = (1, 3, 7)  # non-contiguous source ids, like COCO


def synthetic_gt(rng, num_images=30):
    """Images with small / medium / large boxes, a few crowd boxes, category 7 never annotated."""
    images, anns = [], []
    for i in range(num_images):
        h, w = int(rng.integers(200, 500)), int(rng.integers(200, 500))
        images.append({"id": 100 + i, "height": h, "width": w, "file_name": f"{i}.jpg"})
        for _ in range(int(rng.integers(0, 6))):
            size = float(rng.choice([12.0, 50.0, 150.0])) * rng.uniform(0.8, 1.2)
            x, y = rng.uniform(0, w - size), rng.uniform(0, h - size)
            bw, bh = size, size * rng.uniform(0.6, 1.4)
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": int(rng.choice([1, 3])),
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": int(rng.uniform() < 0.05)})
    cats = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": anns, "categories": cats}


def noisy_detections(rng, gt):
    dets = []
    for ann in gt["annotations"]:
        if rng.uniform() < 0.15:
            continue  # missed
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, 4) * np.array([w, h, w, h])
        cat = ann["category_id"] if rng.uniform() > 0.1 else 3 if ann["category_id"] == 1 else 1
        dets.append({"image_id": ann["image_id"], "category_id": cat,
                     "bbox": (np.array([x, y, w, h]) + jitter).tolist(), "score": float(rng.uniform(0.3, 1))})
    for im in gt["images"]:  # false positives
        for _ in range(int(rng.integers(0, 3))):
            dets.append({"image_id": im["id"], "category_id": int(rng.choice(CATEGORY_IDS)),
                         "bbox": [float(rng.uniform(0, 100)), float(rng.uniform(0, 100)), 30.0, 20.0],
                         "score": float(rng.uniform(0, 0.6))})
    return dets


def test_fast_and_pycocotools_identical():
    rng = np.random.default_rng(0)
    gt = synthetic_gt(rng)
    dets = noisy_detections(rng, gt)
    fast = coco_evaluate(gt, dets, use_fast=True)
    ref = coco_evaluate(gt, dets, use_fast=False)
    assert list(fast) == list(STAT_NAMES)
    for name in STAT_NAMES:
        assert fast[name] == pytest.approx(ref[name], abs=1e-12), name
    assert 0.2 < fast["AP"] < 0.95 and fast["AP50"] >= fast["AP75"]


def test_perfect_detections_give_ap_one_and_inputs_untouched():
    rng = np.random.default_rng(1)
    gt = synthetic_gt(rng, num_images=8)
    for ann in gt["annotations"]:
        ann["iscrowd"] = 0
    snapshot = repr(gt)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    for use_fast in (True, False):
        stats = coco_evaluate(gt, dets, use_fast=use_fast)
        assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)
    assert repr(gt) == snapshot  # GT dict not mutated


def test_zero_detections_and_missing_optional_fields():
    gt = {"images": [{"id": 1, "height": 100, "width": 100}],
          "annotations": [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50]}],  # no id/area/iscrowd
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "empty"}]}
    for use_fast in (True, False):
        stats = coco_evaluate(gt, [], use_fast=use_fast)
        assert stats["AP"] == 0.0 and stats["AR100"] == 0.0
        assert stats["APs"] == -1.0  # no small GT: undefined, COCO convention
    one = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.5}]
    assert coco_evaluate(gt, one)["AP"] == pytest.approx(1.0)


def test_unknown_image_or_category_raise():
    gt = {"images": [{"id": 1, "height": 10, "width": 10}], "annotations": [],
          "categories": [{"id": 1, "name": "a"}]}
    with pytest.raises(ValueError, match="image_id 5"):
        coco_evaluate(gt, [{"image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="category_id 9"):
        coco_evaluate(gt, [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(KeyError, match="categories"):
        coco_evaluate({"images": [], "annotations": []}, [])


def test_detections_to_coco_independent_axes_and_ids():
    nms_out = {
        "boxes": np.array([[[64, 32, 128, 96], [0, 0, 0, 0]], [[10, 20, 30, 40], [1, 2, 3, 4]]], np.float32),
        "scores": np.array([[0.9, 0.0], [0.8, 0.7]], np.float32),
        "labels": np.array([[2, -1], [0, 1]], np.int32),
        "num_dets": np.array([1, 2], np.int32),
    }
    # image 0: orig (h=320, w=1280) from a 128x256 (H,W) input -> x factor 5, y factor 2.5
    out = detections_to_coco(nms_out, image_ids=[11, 12], orig_sizes=[[320, 1280], [128, 256]],
                             input_hw=(128, 256), category_ids=CATEGORY_IDS, valid=[True, False])
    assert len(out) == 1
    assert out[0]["image_id"] == 11 and out[0]["category_id"] == 7
    np.testing.assert_allclose(out[0]["bbox"], [320, 80, 320, 160])
    assert out[0]["score"] == pytest.approx(0.9)
    both = detections_to_coco(nms_out, [11, 12], [[320, 1280], [128, 256]], (128, 256), CATEGORY_IDS)
    assert [d["category_id"] for d in both] == [7, 1, 3]
    np.testing.assert_allclose(both[2]["bbox"], [1, 2, 2, 2])
    bad = dict(nms_out, labels=np.array([[5, -1], [0, 1]], np.int32))
    with pytest.raises(ValueError, match="label 5"):
        detections_to_coco(bad, [11, 12], [[1, 1], [1, 1]], (1, 1), CATEGORY_IDS)


def test_table_layout_matches_pycocotools_summary():
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    rng = np.random.default_rng(2)
    gt = synthetic_gt(rng, num_images=10)
    dets = noisy_detections(rng, gt)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        gt_api = COCO()
        gt_api.dataset = gt
        gt_api.createIndex()
        evaluator = COCOeval(gt_api, gt_api.loadRes(dets), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    reference = [line for line in printed.getvalue().splitlines() if line.startswith(" Average")]
    ours = format_coco_table(coco_evaluate(gt, dets)).splitlines()
    assert len(ours) == 12 and ours == reference
