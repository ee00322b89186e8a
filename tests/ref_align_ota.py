"""Independent NumPy reference of AlignOTA (SPEC §6) and the head's targets: a plain per-image loop.

Written from the specification, not from damo_jax.assign.ota: candidate rows are subset explicitly,
the class cost is the literal (candidates, G, C) quality-focal sum, selection uses a stable sort
per GT column (lowest prior index first on equal costs) and conflicts take the first argmin.
Everything is float32 like the official code. Used by the golden, property and benchmark checks.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32


def bce_prob(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """PyTorch binary_cross_entropy on probabilities, each log clamped at >= -100 (float32)."""
    with np.errstate(divide="ignore"):
        log_p = np.maximum(np.log(p), F32(-100.0))
        log_1mp = np.maximum(np.log1p(-p), F32(-100.0))
    return ((y - F32(1.0)) * log_1mp - y * log_p).astype(F32)


def iou_matrix(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Plain IoU (N, M) between boxes a (N, 4) and b (M, 4), x1y1x2y2; union clamped at eps."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = np.maximum(area_a[:, None] + area_b[None, :] - inter, F32(eps))
    return (inter / union).astype(F32)


def assign_image(priors, scores, pred_boxes, gt_boxes, gt_labels, *, center_radius=2.5,
                 candidate_topk=10, iou_weight=3.0, cls_weight=1.0, selected=None):
    """AlignOTA for ONE image (no padding: gt_boxes (g, 4), gt_labels (g,)).

    ``selected`` (n_cand, g) bool: use this per-GT selection instead of computing it (to check the
    conflict resolution on the official top-k picks). Returns a dict with ``fg_mask`` (A,),
    ``gt_index`` (A,) (-1 = background), ``iou`` (A,) and the intermediates ``candidate_mask``,
    ``in_box_and_center``, ``pairwise_ious``, ``cost_matrix``, ``dynamic_ks``, ``topk_selected``
    (matrices over the candidate rows in increasing prior index).
    """
    priors, scores, pred_boxes, gt_boxes = (np.asarray(v, F32) for v in
                                            (priors, scores, pred_boxes, gt_boxes))
    gt_labels = np.asarray(gt_labels, np.int64)
    num_priors, num_gt = priors.shape[0], gt_boxes.shape[0]
    out = dict(fg_mask=np.zeros(num_priors, bool), gt_index=np.full(num_priors, -1, np.int64),
               iou=np.zeros(num_priors, F32), candidate_mask=np.zeros(num_priors, bool),
               dynamic_ks=np.zeros(num_gt, np.int64))
    if num_gt == 0:
        return out
    x, y, s = priors[:, 0:1], priors[:, 1:2], priors[:, 2:3]
    in_box = np.ones((num_priors, num_gt), bool)
    in_center = np.ones((num_priors, num_gt), bool)
    cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / F32(2.0)
    cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / F32(2.0)
    radius = F32(center_radius) * s
    for delta in (x - gt_boxes[:, 0], y - gt_boxes[:, 1], gt_boxes[:, 2] - x, gt_boxes[:, 3] - y):
        in_box &= delta > 0
    for delta in (x - (cx - radius), y - (cy - radius), (cx + radius) - x, (cy + radius) - y):
        in_center &= delta > 0
    candidate = in_box.any(1) | in_center.any(1)
    out["candidate_mask"] = candidate
    rows = np.nonzero(candidate)[0]
    if rows.size == 0:
        return out
    strict = in_box[rows] & in_center[rows]
    ious = iou_matrix(pred_boxes[rows], gt_boxes)
    cost = _cost(scores[rows], ious, gt_labels, strict, iou_weight, cls_weight)
    ks = _dynamic_ks(ious, candidate_topk)
    if selected is None:
        selected = np.zeros_like(strict)
        for t in range(num_gt):
            order = np.argsort(cost[:, t], kind="stable")
            selected[order[:ks[t]], t] = True
    matched = np.zeros(rows.size, np.int64)
    for r in range(rows.size):
        picks = np.nonzero(selected[r])[0]
        matched[r] = picks[0] if picks.size == 1 else int(np.argmin(cost[r]))
    fg_rows = selected.any(1)
    out["fg_mask"][rows[fg_rows]] = True
    out["gt_index"][rows[fg_rows]] = matched[fg_rows]
    out["iou"][rows[fg_rows]] = ious[fg_rows, matched[fg_rows]]
    out.update(in_box_and_center=strict, pairwise_ious=ious, cost_matrix=cost, dynamic_ks=ks,
               topk_selected=selected)
    return out


def _cost(scores, ious, gt_labels, strict, iou_weight, cls_weight):
    num_classes = scores.shape[1]
    onehot = np.eye(num_classes, dtype=F32)[gt_labels]                      # (g, C)
    soft = onehot[None, :, :] * ious[:, :, None]                             # (n, g, C)
    probs = np.broadcast_to(scores[:, None, :], soft.shape)
    cls_cost = (bce_prob(probs, soft) * np.abs(soft - probs) ** 2).sum(-1, dtype=F32)
    iou_cost = -np.log(ious + F32(1e-7))
    cost = cls_cost * F32(cls_weight) + iou_cost * F32(iou_weight)
    return (cost + F32(1e8) * (~strict).astype(F32)).astype(F32)


def _dynamic_ks(ious, candidate_topk):
    k = min(candidate_topk, ious.shape[0])
    top = -np.sort(-ious, axis=0)[:k]
    total = top[0].copy()
    for j in range(1, k):
        total = (total + top[j]).astype(F32)
    return np.maximum(total.astype(np.int64), 1)


def targets_image(assignment, priors, gt_boxes, gt_labels, num_classes, reg_max):
    """Head targets for one image: labels, label_scores, bbox_targets, dfl_targets."""
    priors = np.asarray(priors, F32)
    fg, idx = assignment["fg_mask"], assignment["gt_index"]
    num_priors = priors.shape[0]
    labels = np.full(num_priors, num_classes, np.int64)
    scores = np.zeros(num_priors, F32)
    boxes = np.zeros((num_priors, 4), F32)
    dfl = np.zeros((num_priors, 4), F32)
    for a in np.nonzero(fg)[0]:
        box = np.asarray(gt_boxes[idx[a]], F32)
        s = priors[a, 2]
        px, py = priors[a, 0] / s, priors[a, 1] / s
        b = box / s
        dist = np.array([px - b[0], py - b[1], b[2] - px, b[3] - py], F32)
        labels[a] = gt_labels[idx[a]]
        scores[a] = assignment["iou"][a]
        boxes[a] = box
        dfl[a] = np.clip(dist, F32(0.0), F32(reg_max - 0.1))
    return dict(labels=labels, label_scores=scores, bbox_targets=boxes, dfl_targets=dfl)
