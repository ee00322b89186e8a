"""damo_jax.ops.nms against an independent numpy port of the official post-processing.

Reference = DAMO-YOLO ``multiclass_nms`` + torchvision ``batched_nms`` semantics: candidates
``score > conf`` in row-major (anchor, class) order, stable descending sort, per-class greedy NMS
with the torchvision IoU formula (double-precision threshold comparison), top ``max_dets``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from damo_jax.ops.nms import box_iou, multiclass_nms


def iou_one_vs_many_numpy(box, boxes):
    """torchvision nms_kernel.cpp: no +1, areas from x2-x1, inter / (a + b - inter)."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    w = np.maximum(np.float32(0), np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]))
    h = np.maximum(np.float32(0), np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]))
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        return (inter / (area + areas - inter)).astype(np.float32)


def nms_numpy(scores, boxes, conf_thre, iou_thre, max_dets, pre_nms_topk=None):
    """One image: scores (A,C), boxes (A,4) float32 -> (boxes (k,4), scores (k,), labels (k,))."""
    anchor_idx, class_idx = np.nonzero(scores > np.float32(conf_thre))  # row-major order
    cand_scores = scores[anchor_idx, class_idx]
    order = np.argsort(-cand_scores, kind="stable")
    if pre_nms_topk is not None:
        order = order[:pre_nms_topk]
    cand_boxes = boxes[anchor_idx[order]]
    cand_labels = class_idx[order]
    cand_scores = cand_scores[order]
    suppressed = np.zeros(len(order), bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = np.arange(i + 1, len(order))
        same = rest[cand_labels[rest] == cand_labels[i]]
        ious = iou_one_vs_many_numpy(cand_boxes[i], cand_boxes[same])
        suppressed[same[ious.astype(np.float64) > float(iou_thre)]] = True
    keep = np.array(keep[:max_dets], dtype=np.int64)
    return cand_boxes[keep], cand_scores[keep], cand_labels[keep]


def assert_matches_reference(out, scores, boxes, conf, iou, max_dets, pre_nms_topk=None):
    out = jax.tree.map(np.asarray, out)
    for b in range(scores.shape[0]):
        ref_boxes, ref_scores, ref_labels = nms_numpy(scores[b], boxes[b], conf, iou, max_dets, pre_nms_topk)
        n = len(ref_scores)
        assert out["num_dets"][b] == n, f"image {b}: {out['num_dets'][b]} dets vs reference {n}"
        np.testing.assert_array_equal(out["labels"][b, :n], ref_labels)
        np.testing.assert_array_equal(out["scores"][b, :n], ref_scores)
        np.testing.assert_array_equal(out["boxes"][b, :n], ref_boxes)
        assert np.all(out["labels"][b, n:] == -1)
        assert np.all(out["scores"][b, n:] == 0) and np.all(out["boxes"][b, n:] == 0)


def random_case(rng, batch, anchors, classes, *, quantize_scores=False, clustered=True):
    """Boxes clustered around a few centres (so many overlaps), some degenerate / identical."""
    centres = rng.uniform(0, 100, size=(batch, 6, 2))
    pick = rng.integers(0, 6, size=(batch, anchors))
    ctr = np.take_along_axis(centres, pick[..., None], axis=1) if clustered else rng.uniform(0, 100, (batch, anchors, 2))
    ctr = ctr + rng.normal(0, 3, size=(batch, anchors, 2))
    wh = rng.uniform(2, 30, size=(batch, anchors, 2))
    boxes = np.concatenate([ctr - wh / 2, ctr + wh / 2], -1)
    boxes[:, ::7] = boxes[:, 1:2]                        # identical boxes
    boxes[:, ::11, 2] = boxes[:, ::11, 0]                # zero width
    boxes[:, ::13, 2:] = boxes[:, ::13, :2]              # zero area points (identical corners)
    scores = rng.uniform(0, 1, size=(batch, anchors, classes))
    if quantize_scores:
        scores = np.round(scores * 8) / 8                # many exact ties
    return scores.astype(np.float32), boxes.astype(np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_reference(seed):
    rng = np.random.default_rng(seed)
    scores, boxes = random_case(rng, batch=3, anchors=60, classes=3, quantize_scores=seed % 2 == 0)
    conf, iou = [(0.05, 0.7), (0.3, 0.5), (0.6, 0.3)][seed % 3]
    out = multiclass_nms(jnp.asarray(scores), jnp.asarray(boxes), conf_thre=conf, iou_thre=iou,
                         max_dets=500, pre_nms_topk=1000, tile_size=16)
    assert out["boxes"].shape == (3, 500, 4) and out["labels"].dtype == jnp.int32
    assert_matches_reference(out, scores, boxes, conf, iou, 500)


def test_more_candidates_than_max_dets_and_topk_cap():
    rng = np.random.default_rng(7)
    scores, boxes = random_case(rng, batch=2, anchors=120, classes=4, clustered=False)
    out = multiclass_nms(scores, boxes, conf_thre=0.05, iou_thre=0.9, max_dets=20,
                         pre_nms_topk=1000, tile_size=32)
    assert out["boxes"].shape == (2, 20, 4)
    assert np.all(np.asarray(out["num_dets"]) == 20)
    assert_matches_reference(out, scores, boxes, 0.05, 0.9, 20)
    # the static cap: identical to the reference restricted to the 50 best candidates
    capped = multiclass_nms(scores, boxes, conf_thre=0.05, iou_thre=0.5, max_dets=100,
                            pre_nms_topk=50, tile_size=16)
    assert_matches_reference(capped, scores, boxes, 0.05, 0.5, 100, pre_nms_topk=50)


def test_no_candidates_and_all_equal_scores():
    scores = np.full((2, 10, 3), 0.05, np.float32)       # equal to conf: strict '>' gives none
    boxes = np.tile(np.array([0, 0, 10, 10], np.float32), (2, 10, 1))
    out = multiclass_nms(scores, boxes, conf_thre=0.05, iou_thre=0.7, max_dets=5)
    assert np.all(np.asarray(out["num_dets"]) == 0)
    assert np.all(np.asarray(out["labels"]) == -1)
    scores[:] = 0.5                                      # ties: lowest (anchor, class) index first
    out = multiclass_nms(scores, boxes, conf_thre=0.05, iou_thre=0.7, max_dets=5)
    np.testing.assert_array_equal(np.asarray(out["num_dets"]), [3, 3])
    np.testing.assert_array_equal(np.asarray(out["labels"])[0], [0, 1, 2, -1, -1])


def test_hand_made_class_awareness_and_threshold():
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60], [0, 0, 10, 10]]], np.float32)
    scores = np.array([[[0.9, 0.0], [0.8, 0.0], [0.7, 0.0], [0.0, 0.6]]], np.float32)
    # box1 vs box0: IoU 0.9 -> suppressed at 0.7; box3 same box as box0 but another class: kept
    out = multiclass_nms(scores, boxes, conf_thre=0.05, iou_thre=0.7, max_dets=10)
    np.testing.assert_array_equal(np.asarray(out["labels"])[0, :4], [0, 0, 1, -1])
    np.testing.assert_allclose(np.asarray(out["scores"])[0, :3], [0.9, 0.7, 0.6])
    # IoU exactly 0.9 is not > 0.9: kept (double-precision comparison like torchvision)
    out = multiclass_nms(scores, boxes, conf_thre=0.05, iou_thre=0.9, max_dets=10)
    assert int(out["num_dets"][0]) == 4


def test_iou_formula_matches_torchvision():
    a = np.array([[0, 0, 10, 10], [5, 5, 5, 5], [0, 0, 4, 2]], np.float32)
    b = np.array([[5, 0, 15, 10], [5, 5, 5, 5], [1, 1, 3, 2]], np.float32)
    iou = np.asarray(box_iou(jnp.asarray(a), jnp.asarray(b)))
    assert iou[0, 0] == pytest.approx(50 / 150)          # no +1 convention
    assert np.isnan(iou[1, 1])                           # 0 / 0 like torchvision
    assert iou[2, 2] == pytest.approx(2 / 8)
    for i in range(3):
        np.testing.assert_allclose(iou[i], iou_one_vs_many_numpy(a[i], b), rtol=1e-6)


def test_jit_and_vmap_and_traced_thresholds():
    rng = np.random.default_rng(3)
    scores, boxes = random_case(rng, batch=4, anchors=40, classes=2)
    fn = jax.jit(lambda s, b, c, t: multiclass_nms(s, b, conf_thre=c, iou_thre=t, max_dets=30,
                                                   tile_size=8))
    out = fn(scores, boxes, 0.2, 0.45)
    assert_matches_reference(out, scores, boxes, 0.2, 0.45, 30)
    # vmap over an outer axis (e.g. devices / crops): (2, 2, A, C)
    vm = jax.vmap(lambda s, b: multiclass_nms(s, b, conf_thre=0.2, iou_thre=0.45, max_dets=30))
    out_v = vm(scores.reshape(2, 2, 40, 2), boxes.reshape(2, 2, 40, 4))
    np.testing.assert_array_equal(np.asarray(out_v["labels"]).reshape(4, 30), np.asarray(out["labels"]))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="scores"):
        multiclass_nms(np.zeros((2, 5), np.float32), np.zeros((2, 5, 4), np.float32),
                       conf_thre=0.1, iou_thre=0.5)
    with pytest.raises(ValueError, match="disagree"):
        multiclass_nms(np.zeros((1, 5, 2), np.float32), np.zeros((1, 6, 4), np.float32),
                       conf_thre=0.1, iou_thre=0.5)


def test_candidates_above_conf_are_counted_and_a_capped_eval_warns(caplog, monkeypatch):
    """``num_candidates`` = the (anchor, class) scores above conf (a NumPy count); images above
    ``pre_nms_topk`` lost their lowest candidates before NMS (the official NMS keeps all), which
    the evaluation now says in one warning instead of silently."""
    import logging

    from damo_jax.evaluation.evaluator import over_candidate_cap, warn_candidate_cap
    from damo_jax.inference.pipeline import NmsParams
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 1, (3, 400, 5)).astype(np.float32)
    scores[1] *= 0.1                                  # image 1: few above 0.05
    boxes = np.tile(np.array([0, 0, 10, 10], np.float32), (3, 400, 1))
    out = multiclass_nms(jnp.asarray(scores), jnp.asarray(boxes), conf_thre=0.05, iou_thre=0.7,
                         max_dets=50, pre_nms_topk=1000)
    want = (scores > np.float32(0.05)).sum((1, 2))
    np.testing.assert_array_equal(np.asarray(out["num_candidates"]), want)
    assert want[0] > 1000 > want[1]
    params = NmsParams(conf=0.05, pre_nms_topk=1000)
    capped = over_candidate_cap(jax.device_get(out), np.array([True, True, False]), params)
    assert capped == [int(want[0])]                   # image 2 is a padding row: not counted
    monkeypatch.setattr("damo_jax.evaluation.evaluator._CAP_WARNED", set())
    with caplog.at_level(logging.INFO, logger="damo_jax.evaluation.evaluator"):
        warn_candidate_cap(capped, 3, params)
        warn_candidate_cap([], 3, params)
        warn_candidate_cap(capped, 3, params)         # a training run's next evaluation: INFO
        warn_candidate_cap(capped, 3, NmsParams(conf=0.1, pre_nms_topk=1000))   # another conf
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO, logging.WARNING]
    assert f"1 of 3 images had more than 1000 candidates" in caplog.text and "--pre-nms-topk" in caplog.text
