"""AlignOTA label assignment (SPEC §6), batched, static-shape and jit-able.

One dense pass per image over (A priors × G padded ground truths), ``vmap``-ed over the batch:

1. candidate priors: prior point strictly inside any valid GT box OR strictly inside any valid GT's
   centre square of half-size ``center_radius · s`` (s = the prior's stride);
   ``strict[a, t]`` = inside GT t's box AND its centre square;
2. IoU(predicted box, GT) with the union clamped at 1e-6;
3. cost = (cls_cost·cls_weight + (−ln(IoU + 1e-7))·iou_weight) + 1e8·[not strict], in float32 in
   this order (so the penalised values round to the same multiples of 8 as the official code).
   cls_cost is the quality-focal cost summed over ALL classes (BCE on probabilities, logs clamped
   at −100); it is evaluated as Σ_{c≠label} negative terms + the label term, with the exclusive sum
   built from prefix/suffix sums, so no (A, G, C) tensor is ever formed;
4. dynamic k_t = max(1, int(Σ top-min(10, #candidates) IoUs of column t over candidates));
5. each GT takes its k_t lowest-cost candidates (``lax.top_k`` on −cost with k = candidate_topk,
   then rank < k_t; ties resolve lowest prior index first);
6. a prior taken by several GTs keeps the GT with the smallest cost in its row over all valid GT
   columns (first index on equal costs).

Invalid priors and padded GTs (``gt_valid`` False) are excluded everywhere. Images without valid
GTs or without candidates come out all negative. ``method="sinkhorn"`` replaces steps 5–6 by the
original OTA transport problem (see :mod:`damo_jax.sinkhorn_ota`).

Layouts: priors (A, 4) = (x, y, s, s) with x = col·s, y = row·s; boxes x1y1x2y2 in input pixels.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from damo_jax import sinkhorn_ota

PENALTY = 1e8
IOU_EPS = 1e-6
LOG_CLAMP = -100.0


def rounded(*arrays):
    """Keep products rounded on their own before they are added.

    XLA:CPU contracts ``a·b + c`` into one FMA inside a fusion, whose single rounding differs by an
    ulp from PyTorch's separately rounded ops (seen as 2e-7 IoU differences, amplified by −3·ln near
    IoU = 1). An identity select (``x`` if ``x == x`` else NaN) sits between the multiply and the add
    and blocks the contraction at negligible cost (an optimization_barrier is removed by XLA).
    """
    out = tuple(jnp.where(x == x, x, jnp.nan) for x in arrays)
    return out[0] if len(arrays) == 1 else out


def pairwise_iou(boxes_a: jax.Array, boxes_b: jax.Array, eps: float = IOU_EPS) -> jax.Array:
    """IoU between every box of (N, 4) and every box of (M, 4) (x1y1x2y2) -> (N, M); union ≥ eps."""
    area_a = (boxes_a[:, 2] - boxes_a[:, 0]) * (boxes_a[:, 3] - boxes_a[:, 1])
    area_b = (boxes_b[:, 2] - boxes_b[:, 0]) * (boxes_b[:, 3] - boxes_b[:, 1])
    lt = jnp.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    rb = jnp.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    wh = jnp.maximum(rb - lt, 0.0)
    area_a, area_b, overlap = rounded(area_a, area_b, wh[..., 0] * wh[..., 1])
    union = jnp.maximum(area_a[:, None] + area_b[None, :] - overlap, eps)
    return overlap / union


def clamped_log_terms(probs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max(ln p, −100), max(ln(1 − p), −100)), PyTorch ``binary_cross_entropy``'s clamped logs."""
    log_p = jnp.maximum(jnp.log(probs), LOG_CLAMP)
    log_1mp = jnp.maximum(jnp.log1p(-probs), LOG_CLAMP)
    return log_p, log_1mp


def inside_masks(priors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array,
                 center_radius: float) -> tuple[jax.Array, jax.Array]:
    """Strict in-box and in-centre-square tests, both (A, G) bool, False for padded GTs."""
    x, y, s = priors[:, 0:1], priors[:, 1:2], priors[:, 2:3]
    x1, y1, x2, y2 = (gt_boxes[None, :, i] for i in range(4))
    box_deltas = jnp.stack([x - x1, y - y1, x2 - x, y2 - y], axis=-1)
    in_box = jnp.min(box_deltas, axis=-1) > 0
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    half = rounded(center_radius * s)
    ctr_deltas = jnp.stack([x - (cx - half), y - (cy - half), (cx + half) - x, (cy + half) - y],
                           axis=-1)
    in_center = jnp.min(ctr_deltas, axis=-1) > 0
    return in_box & gt_valid[None, :], in_center & gt_valid[None, :]


def background_cost(scores: jax.Array) -> jax.Array:
    """Σ_c BCE(p_c, 0)·p_c² -> (A,): the class cost of a prior against an all-background target."""
    _, log_1mp = clamped_log_terms(scores)
    return jnp.sum(-log_1mp * jnp.square(scores), axis=-1)


def classification_cost(scores: jax.Array, ious: jax.Array, gt_labels: jax.Array) -> jax.Array:
    """Σ_c BCE(p_c, y_c)·|y_c − p_c|² with y = IoU one-hot at the GT label -> (A, G).

    scores (A, C) probabilities, ious (A, G), gt_labels (G,) (clipped into range; padded columns are
    masked by the caller). The negative terms of the other classes come from prefix + suffix sums
    (no cancellation), the label term is evaluated per (prior, GT).
    """
    num_classes = scores.shape[-1]
    log_p, log_1mp = clamped_log_terms(scores)
    neg = rounded(-log_1mp * jnp.square(scores))                     # (A, C): BCE(p, 0)·p²
    zero = jnp.zeros_like(neg[:, :1])
    prefix = jnp.concatenate([zero, jnp.cumsum(neg, axis=1)], axis=1)          # Σ_{c<i}
    suffix = jnp.concatenate([jnp.cumsum(neg[:, ::-1], axis=1)[:, ::-1], zero], axis=1)  # Σ_{c≥i}
    labels = jnp.clip(gt_labels, 0, num_classes - 1)
    others = prefix[:, labels] + suffix[:, labels + 1]               # (A, G): Σ_{c≠label}
    p_label = scores[:, labels]
    lp_label, l1mp_label = log_p[:, labels], log_1mp[:, labels]
    bce_label = jnp.subtract(*rounded((ious - 1.0) * l1mp_label, ious * lp_label))
    return others + rounded(bce_label * jnp.square(ious - p_label))


def base_cost(scores, ious, gt_labels, *, iou_weight, cls_weight):
    """cls_cost·cls_weight + (−ln(IoU + 1e-7))·iou_weight -> (A, G), without the 1e8 penalty."""
    cls_cost = classification_cost(scores, ious, gt_labels)
    iou_cost = -jnp.log(ious + 1e-7)
    return jnp.add(*rounded(cls_cost * cls_weight, iou_cost * iou_weight))


def penalised_cost(base, strict, candidate, gt_valid, penalty=PENALTY):
    """base + penalty·[not strict] (float32, official order); +inf on non-candidate rows / padded GTs."""
    cost = base + jnp.where(strict, 0.0, penalty).astype(base.dtype)
    usable = candidate[:, None] & gt_valid[None, :]
    return jnp.where(usable, cost, jnp.inf)


def dynamic_ks(ious: jax.Array, candidate: jax.Array, gt_valid: jax.Array,
               candidate_topk: int) -> jax.Array:
    """k_t = max(1, int(Σ top-k IoUs of column t over candidate rows)) -> (G,) int32, 0 if padded."""
    k = min(candidate_topk, ious.shape[0])
    masked = jnp.where(candidate[:, None], ious, 0.0)
    top, _ = jax.lax.top_k(masked.T, k)                              # (G, k), descending
    total = top[:, 0]
    for j in range(1, k):                                            # sequential, descending order
        total = total + top[:, j]
    ks = jnp.maximum(total.astype(jnp.int32), 1)
    return jnp.where(gt_valid, ks, 0)


def select_lowest_cost(cost: jax.Array, ks: jax.Array, max_k: int) -> jax.Array:
    """For every GT column t pick its ks[t] lowest finite costs -> (A, G) bool (ties: lowest index)."""
    num_priors, num_gt = cost.shape
    k = min(max_k, num_priors)
    neg_top, idx = jax.lax.top_k(-cost.T, k)                         # (G, k)
    take = (jnp.arange(k)[None, :] < ks[:, None]) & jnp.isfinite(neg_top)
    picked = jnp.zeros((num_gt, num_priors), bool)
    picked = picked.at[jnp.arange(num_gt)[:, None], idx].set(take)
    return picked.T


def resolve_conflicts(selected: jax.Array, cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Selection matrix (A, G) -> (fg_mask (A,), gt_index (A,) int32, −1 for background).

    Priors picked by several GTs go to the argmin of their cost row over all GT columns (padded
    columns must carry +inf); jnp.argmin returns the first index on equal costs.
    """
    count = jnp.sum(selected, axis=1)
    fg = count > 0
    row_argmin = jnp.argmin(cost, axis=1).astype(jnp.int32)
    only_pick = jnp.argmax(selected, axis=1).astype(jnp.int32)
    gt_index = jnp.where(count > 1, row_argmin, only_pick)
    return fg, jnp.where(fg, gt_index, -1)


def _assign_one_image(scores, priors, pred_boxes, gt_boxes, gt_labels, gt_valid, *, center_radius,
                      candidate_topk, iou_weight, cls_weight, method, sinkhorn_cfg):
    in_box, in_center = inside_masks(priors, gt_boxes, gt_valid, center_radius)
    candidate = jnp.any(in_box, axis=1) | jnp.any(in_center, axis=1)
    strict = in_box & in_center
    ious = pairwise_iou(pred_boxes, gt_boxes)
    base = base_cost(scores, ious, gt_labels, iou_weight=iou_weight, cls_weight=cls_weight)
    cost = penalised_cost(base, strict, candidate, gt_valid)
    ks = dynamic_ks(ious, candidate, gt_valid, candidate_topk)
    extra = {}
    if method == "dynamic_k":
        selected = select_lowest_cost(cost, ks, candidate_topk)
        fg, gt_index = resolve_conflicts(selected, cost)
    else:
        ot_cost = penalised_cost(base, strict, candidate, gt_valid, sinkhorn_cfg["penalty"])
        bg_cost = background_cost(scores) * cls_weight
        plan = sinkhorn_ota.transport_plan(ot_cost, bg_cost, ks, candidate, gt_valid,
                                           epsilon=sinkhorn_cfg["epsilon"],
                                           iters=sinkhorn_cfg["iters"])
        fg, gt_index = sinkhorn_ota.plan_to_assignment(plan, candidate)
        selected = jax.nn.one_hot(gt_index, cost.shape[1], dtype=bool) & fg[:, None]
        extra["transport_plan"] = plan
    fg = fg & candidate
    safe_index = jnp.maximum(gt_index, 0)
    iou = jnp.where(fg, jnp.take_along_axis(ious, safe_index[:, None], axis=1)[:, 0], 0.0)
    out = dict(fg_mask=fg, gt_index=gt_index, iou=iou, num_pos=jnp.sum(fg).astype(jnp.int32),
               candidate_mask=candidate, dynamic_ks=ks)
    inter = dict(in_box_and_center=strict, pairwise_ious=ious, cost_matrix=cost,
                 topk_selected=selected, **extra)
    return out, inter


def align_ota(scores, priors, pred_boxes, gt_boxes, gt_labels, gt_valid, *, center_radius=2.5,
              candidate_topk=10, iou_weight=3.0, cls_weight=1.0, method="dynamic_k",
              return_intermediates=False, sinkhorn_epsilon=0.1, sinkhorn_iters=50,
              sinkhorn_penalty=1e3) -> dict[str, Any]:
    """Batched AlignOTA assignment (SPEC §6). All inputs are wrapped in ``stop_gradient``.

    Args:
      scores: (B, A, C) predicted class probabilities (after sigmoid).
      priors: (A, 4) prior points (x, y, s, s).
      pred_boxes: (B, A, 4) decoded predicted boxes, x1y1x2y2 input pixels.
      gt_boxes: (B, G, 4) ground truths x1y1x2y2 (padded to G); gt_labels (B, G) int in 0..C−1;
        gt_valid (B, G) bool, False for padding rows.
      method: "dynamic_k" (official) or "sinkhorn" (entropic OT, :mod:`damo_jax.sinkhorn_ota`; uses
        ``sinkhorn_epsilon``, ``sinkhorn_iters`` and ``sinkhorn_penalty`` in place of the 1e8
        penalty, which float32 Sinkhorn cannot resolve).
      return_intermediates: also return ``in_box_and_center``, ``pairwise_ious``, ``cost_matrix``
        (+inf for non-candidate rows / padded GTs), ``topk_selected`` (all (B, A, G)) and, for
        Sinkhorn, ``transport_plan`` (B, A, G + 1) (last column = background).

    Returns dict: ``fg_mask`` (B, A) bool, ``gt_index`` (B, A) int32 (−1 = background), ``iou``
    (B, A) float32 (IoU(pred, assigned GT), the QFL soft target; 0 for background), ``num_pos``
    (B,) int32, ``candidate_mask`` (B, A) bool, ``dynamic_ks`` (B, G) int32 (0 for padding).
    """
    if method not in ("dynamic_k", "sinkhorn"):
        raise ValueError(f"damo_jax.assign.align_ota: method must be 'dynamic_k' or 'sinkhorn', "
                         f"got {method!r}")
    sg = jax.lax.stop_gradient
    scores, pred_boxes, gt_boxes = (sg(jnp.asarray(v, jnp.float32))
                                    for v in (scores, pred_boxes, gt_boxes))
    priors = sg(jnp.asarray(priors, jnp.float32))
    gt_labels, gt_valid = jnp.asarray(gt_labels, jnp.int32), jnp.asarray(gt_valid, bool)
    _check_shapes(scores, priors, pred_boxes, gt_boxes, gt_labels, gt_valid)
    sinkhorn_cfg = dict(epsilon=sinkhorn_epsilon, iters=sinkhorn_iters, penalty=sinkhorn_penalty)

    def one(s, p, g, l, v):
        return _assign_one_image(s, priors, p, g, l, v, center_radius=center_radius,
                                 candidate_topk=candidate_topk, iou_weight=iou_weight,
                                 cls_weight=cls_weight, method=method, sinkhorn_cfg=sinkhorn_cfg)

    out, inter = jax.vmap(one)(scores, pred_boxes, gt_boxes, gt_labels, gt_valid)
    if return_intermediates:
        out.update(inter)
    return out


def _check_shapes(scores, priors, pred_boxes, gt_boxes, gt_labels, gt_valid):
    b, a, _ = scores.shape
    g = gt_boxes.shape[1]
    expected = dict(priors=(a, 4), pred_boxes=(b, a, 4), gt_boxes=(b, g, 4), gt_labels=(b, g),
                    gt_valid=(b, g))
    got = dict(priors=priors.shape, pred_boxes=pred_boxes.shape, gt_boxes=gt_boxes.shape,
               gt_labels=gt_labels.shape, gt_valid=gt_valid.shape)
    for name, shape in expected.items():
        if tuple(got[name]) != shape:
            raise ValueError(f"damo_jax.assign.align_ota: {name} has shape {tuple(got[name])}, "
                             f"expected {shape} (scores are {tuple(scores.shape)})")


def build_targets(assignment, priors, gt_boxes, gt_labels, *, num_classes, reg_max):
    """Per-prior training targets from an assignment (SPEC §6 table).

    Returns ``labels`` (B, A) int32 (num_classes = background), ``label_scores`` (B, A) (IoU soft
    target, 0 for background), ``bbox_targets`` (B, A, 4) (assigned GT box, 0 otherwise),
    ``dfl_targets`` (B, A, 4) ((x−x1)/s, (y−y1)/s, (x2−x)/s, (y2−y)/s) clamped to [0, R − 0.1],
    ``fg_mask`` (B, A) bool and ``num_pos`` (scalar int32 over the whole batch).
    """
    fg = assignment["fg_mask"]
    index = jnp.maximum(assignment["gt_index"], 0)
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    priors = jnp.asarray(priors, jnp.float32)
    boxes = jnp.take_along_axis(gt_boxes, index[..., None], axis=1)                 # (B, A, 4)
    labels = jnp.take_along_axis(jnp.asarray(gt_labels, jnp.int32), index, axis=1)
    stride = priors[:, 2:3]
    points = priors[:, :2] / stride                                                # (A, 2)
    scaled = boxes / stride
    dist = jnp.concatenate([points - scaled[..., :2], scaled[..., 2:] - points], axis=-1)
    dist = jnp.clip(dist, 0.0, reg_max - 0.1)
    return dict(
        labels=jnp.where(fg, labels, num_classes).astype(jnp.int32),
        label_scores=jnp.where(fg, assignment["iou"], 0.0),
        bbox_targets=jnp.where(fg[..., None], boxes, 0.0),
        dfl_targets=jnp.where(fg[..., None], dist, 0.0),
        fg_mask=fg,
        num_pos=jnp.sum(fg).astype(jnp.int32),
    )
