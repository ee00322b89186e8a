"""Evaluation reports (damo_jax.evaluation.reports) against pycocotools itself.

Per-class AP / AP50 are checked against independent pycocotools runs restricted to ONE category
(``params.catIds = [c]``: its stats[0] / stats[1] are that class's AP / AP50), on a small synthetic
ground truth with jittered, missed and false detections. The confusion matrix is checked on a
hand-built case whose counts are worked out in the test.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from damo_jax.evaluation.reports import (coco_eval_details, confusion_matrix, per_class_ap,
                                         write_eval_reports)

CATS = [3, 7, 11]  # non-contiguous source ids on purpose


def synthetic_set(seed=0, images=6):
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": f"c{c}"} for c in CATS]}
    dets = []
    for i in range(1, images + 1):
        gt["images"].append({"id": i, "width": 320, "height": 240})
        for _ in range(rng.integers(2, 6)):
            cat = int(rng.choice(CATS[:2] if i % 3 else CATS))
            x, y = rng.uniform(0, 220), rng.uniform(0, 160)
            w, h = rng.uniform(10, 90), rng.uniform(10, 70)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i,
                                      "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                                      "iscrowd": 0})
            if rng.random() < 0.8:  # found, with a jittered box
                j = rng.normal(0, 4, 4)
                dets.append({"image_id": i, "category_id": cat,
                             "bbox": [x + j[0], y + j[1], max(w + j[2], 2), max(h + j[3], 2)],
                             "score": float(rng.uniform(0.2, 1))})
        for _ in range(rng.integers(0, 3)):  # false positives, any class
            dets.append({"image_id": i, "category_id": int(rng.choice(CATS)),
                         "bbox": [float(rng.uniform(0, 250)), float(rng.uniform(0, 180)), 30, 30],
                         "score": float(rng.uniform(0, 0.7))})
    return gt, dets


def pycocotools_one_class(gt, dets, cat):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = json.loads(json.dumps(gt))
        api.createIndex()
        res = api.loadRes(json.loads(json.dumps(dets)))
        ev = COCOeval(api, res, "bbox")
        ev.params.catIds = [cat]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.stats[1]


@pytest.mark.parametrize("use_fast", [False, True])
def test_per_class_ap_matches_pycocotools_single_class_runs(use_fast):
    gt, dets = synthetic_set()
    details = coco_eval_details(gt, dets, use_fast=use_fast)
    rows = per_class_ap(details)
    assert [r["category_id"] for r in rows] == CATS
    for row in rows:
        ap, ap50 = pycocotools_one_class(gt, dets, row["category_id"])
        assert row["AP"] == pytest.approx(ap, abs=1e-12)
        assert row["AP50"] == pytest.approx(ap50, abs=1e-12)
    assert 0 < rows[0]["AP"] < 1  # a non-trivial case
    # the overall AP is the mean of the defined per-class APs
    assert details["stats"]["AP"] == pytest.approx(np.mean([r["AP"] for r in rows]), abs=1e-12)


def test_class_without_gt_is_undefined():
    gt, dets = synthetic_set()
    gt["categories"].append({"id": 20, "name": "unused"})
    rows = per_class_ap(coco_eval_details(gt, dets, use_fast=False))
    assert rows[-1]["category_id"] == 20 and rows[-1]["AP"] == -1 and rows[-1]["AP50"] == -1


def test_confusion_matrix_hand_counted():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [
              {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},    # found as a
              {"image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20]},  # found as a (confused)
              {"image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20]},    # missed (low score)
              {"image_id": 2, "category_id": 1, "bbox": [60, 0, 10, 10]},   # missed (IoU too low)
              {"image_id": 2, "category_id": 1, "bbox": [0, 60, 10, 10], "iscrowd": 1}]}  # ignored
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [51, 50, 20, 20], "score": 0.8},
            {"image_id": 1, "category_id": 2, "bbox": [0, 0, 10, 9], "score": 0.7},  # duplicate -> FP
            {"image_id": 2, "category_id": 2, "bbox": [0, 0, 20, 20], "score": 0.1},  # below conf
            {"image_id": 2, "category_id": 1, "bbox": [65, 0, 10, 10], "score": 0.9},  # IoU 1/3 -> FP
            {"image_id": 2, "category_id": 2, "bbox": [0, 60, 10, 10], "score": 0.9}]  # on crowd: FP
    matrix, cats = confusion_matrix(gt, dets, conf=0.25, iou=0.5)
    assert cats == [1, 2]
    expected = np.array([[1, 0, 1],    # true a: 1 as a, 1 missed
                         [1, 0, 1],    # true b: 1 as a, 1 missed
                         [1, 2, 0]])   # background: predicted a once, b twice
    np.testing.assert_array_equal(matrix, expected)


def test_write_eval_reports_files(tmp_path):
    gt, dets = synthetic_set(seed=1)
    lines = []
    report = write_eval_reports(tmp_path, gt, dets, class_names=["x", "y", "z"], conf=0.3, iou=0.5,
                                printer=lines.append)
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"per_class.json", "per_class.md", "pr_curves.png", "confusion_matrix.png",
                     "confusion_matrix.json", "detections.json"}
    for png in ("pr_curves.png", "confusion_matrix.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "per_class.json").read_text())
    assert [c["name"] for c in saved["classes"]] == ["x", "y", "z"]
    assert sum(c["instances"] for c in saved["classes"]) == len(gt["annotations"])
    assert json.loads((tmp_path / "detections.json").read_text()) == dets
    conf = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert conf["conf"] == 0.3 and np.asarray(conf["matrix"]).shape == (4, 4)
    # every GT object is counted exactly once in the rows of the real classes
    assert np.asarray(conf["matrix"])[:3].sum() == len(gt["annotations"])
    assert "| x |" in lines[0] and report["stats"]["AP"] > 0


def test_reports_name_classes_by_category_id_when_ids_are_not_listed_sorted(tmp_path):
    """A COCO file lists its categories as 90 square, 3 circle, 7 unused (the dataset keeps that
    order; class_names follow it) while COCOeval orders classes by id (3, 7, 90): the reports named
    the rows by position ("square: 0 instances" was circle's row). Expected values by hand."""
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "categories": [{"id": 90, "name": "square"}, {"id": 3, "name": "circle"},
                         {"id": 7, "name": "unused"}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 90, "bbox": [10, 10, 20, 20], "iscrowd": 0},
              {"id": 2, "image_id": 1, "category_id": 90, "bbox": [50, 50, 20, 20], "iscrowd": 0},
              {"id": 3, "image_id": 1, "category_id": 3, "bbox": [10, 60, 20, 20], "iscrowd": 0}]}
    dets = [{"image_id": 1, "category_id": 90, "bbox": [10, 10, 20, 20], "score": 0.9},
            {"image_id": 1, "category_id": 90, "bbox": [50, 50, 20, 20], "score": 0.8},
            {"image_id": 1, "category_id": 90, "bbox": [10, 60, 20, 20], "score": 0.7}]  # the circle
    lines = []
    report = write_eval_reports(tmp_path, gt, dets, class_names=["square", "circle", "unused"],
                                conf=0.25, iou=0.5, save_json=False, printer=lines.append)
    got = [{k: r[k] for k in ("category_id", "name", "instances", "detections", "AP", "AP50")}
           for r in report["per_class"]]
    assert got == [  # square: 2 TP above its only FP -> precision 1 at every recall
        {"category_id": 3, "name": "circle", "instances": 1, "detections": 0, "AP": 0.0, "AP50": 0.0},
        {"category_id": 7, "name": "unused", "instances": 0, "detections": 0, "AP": -1.0, "AP50": -1.0},
        {"category_id": 90, "name": "square", "instances": 2, "detections": 3, "AP": 1.0, "AP50": 1.0}]
    saved = json.loads((tmp_path / "per_class.json").read_text())["classes"]
    assert [(c["category_id"], c["name"]) for c in saved] == [(3, "circle"), (7, "unused"), (90, "square")]
    assert lines[0].splitlines()[2:] == ["| circle | 1 | 0 | 0.000 | 0.000 |", "| unused | 0 | 0 | - | - |",
                                         "| square | 2 | 3 | 1.000 | 1.000 |"]
    cm = json.loads((tmp_path / "confusion_matrix.json").read_text())
    assert cm["labels"] == ["circle", "unused", "square", "background"]
    assert cm["category_ids"] == [3, 7, 90]
    assert cm["matrix"] == [[0, 0, 1, 0],   # the circle, predicted square
                            [0, 0, 0, 0],
                            [0, 0, 2, 0],   # both squares found
                            [0, 0, 0, 0]]


def test_reports_refuse_a_class_name_count_that_is_not_the_category_count(tmp_path):
    gt, dets = synthetic_set()
    with pytest.raises(ValueError, match="2 class names for 3 categories"):
        write_eval_reports(tmp_path, gt, dets, class_names=["x", "y"], printer=lambda _: None)
