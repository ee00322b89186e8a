"""AlignOTA cost pieces for one image (SPEC §6 steps 2–4), GT-major: every matrix is (G, A).

GT-major keeps the per-GT top-k over priors on the contiguous last axis (no transposed copies of
the (B, G, A) tensors, which dominate the run time at B = 16, A = 8400, G = 50).

Float32 parity with the official code: the cost is formed in the official order
``(cls·1.0 + (−ln(IoU + 1e-7))·3.0) + 1e8·[not strict]`` and products are kept rounded on their
own (:func:`rounded`), so the penalised values land on the same multiples of 8 as PyTorch's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from damo_jax.ops import boxes as box_ops

PENALTY = 1e8
IOU_EPS = 1e-6
LOG_CLAMP = -100.0


def rounded(*arrays):
    """Keep products rounded on their own before they are added.

    XLA:CPU contracts ``a·b + c`` into one FMA inside a fusion, whose single rounding differs by an
    ulp from PyTorch's separately rounded ops (seen as 2e-7 IoU differences, amplified by −3·ln near
    IoU = 1). An identity select (``x`` if ``x == x`` else NaN) between the multiply and the add
    blocks the contraction at negligible cost (an optimization_barrier is dropped by XLA).
    """
    out = tuple(jnp.where(x == x, x, jnp.nan) for x in arrays)
    return out[0] if len(arrays) == 1 else out


def pairwise_iou(boxes_a: jax.Array, boxes_b: jax.Array, eps: float = IOU_EPS) -> jax.Array:
    """IoU between every box of (N, 4) and every box of (M, 4) (x1y1x2y2) -> (N, M); union ≥ eps;
    areas and overlap kept :func:`rounded` (:func:`damo_jax.ops.boxes.pairwise_iou`)."""
    return box_ops.pairwise_iou(boxes_a, boxes_b, eps=eps, round_terms=rounded)


def inside_masks(priors: jax.Array, gt_boxes: jax.Array, gt_valid: jax.Array,
                 center_radius: float) -> tuple[jax.Array, jax.Array]:
    """Strict in-box and in-centre-square tests of the prior points, both (G, A) bool, False for
    padded GTs. priors (A, 4) (x, y, s, s); gt_boxes (G, 4) x1y1x2y2; gt_valid (G,)."""
    x, y, s = priors[None, :, 0], priors[None, :, 1], priors[None, :, 2]
    x1, y1, x2, y2 = (gt_boxes[:, i:i + 1] for i in range(4))
    box_deltas = jnp.stack([x - x1, y - y1, x2 - x, y2 - y], axis=-1)
    in_box = jnp.min(box_deltas, axis=-1) > 0
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    half = rounded(center_radius * s)
    ctr_deltas = jnp.stack([x - (cx - half), y - (cy - half), (cx + half) - x, (cy + half) - y],
                           axis=-1)
    in_center = jnp.min(ctr_deltas, axis=-1) > 0
    return in_box & gt_valid[:, None], in_center & gt_valid[:, None]


def negative_terms(scores: jax.Array) -> jax.Array:
    """BCE(p, 0)·p² = −max(ln(1 − p), −100)·p² per (prior, class) -> (A, C)."""
    return rounded(-jnp.maximum(jnp.log1p(-scores), LOG_CLAMP) * jnp.square(scores))


def background_cost(scores: jax.Array) -> jax.Array:
    """Σ_c BCE(p_c, 0)·p_c² -> (A,): the class cost of a prior against an all-background target."""
    return jnp.sum(negative_terms(scores), axis=-1)


def classification_cost(scores: jax.Array, ious: jax.Array, gt_labels: jax.Array) -> jax.Array:
    """Σ_c BCE(p_c, y_c)·|y_c − p_c|² with y = IoU one-hot at the GT label -> (G, A).

    scores (A, C) probabilities, ious (G, A), gt_labels (G,) (clipped into range; padded GTs are
    masked by the caller). No (G, A, C) tensor is formed: Σ_{c≠label} BCE(p_c, 0)·p_c² is one
    (G, C) x (C, A) product with the label-excluding mask (a sum of exact terms, no cancellation),
    the label's probability is picked by a one-hot product (exact, and much faster than a gather
    on CPU), and the label term is evaluated per (GT, prior).
    """
    num_classes = scores.shape[-1]
    neg = negative_terms(scores)
    labels = jnp.clip(gt_labels, 0, num_classes - 1)
    onehot = (labels[:, None] == jnp.arange(num_classes)[None, :]).astype(scores.dtype)  # (G, C)

    def pick(mask, x):                                               # (G, C) x (A, C)ᵀ -> (G, A)
        return jax.lax.dot_general(mask, x, (((1,), (1,)), ((), ())),
                                   precision=jax.lax.Precision.HIGHEST)
    others, p_label = pick(1.0 - onehot, neg), pick(onehot, scores)
    lp_label = jnp.maximum(jnp.log(p_label), LOG_CLAMP)
    l1mp_label = jnp.maximum(jnp.log1p(-p_label), LOG_CLAMP)
    bce_label = jnp.subtract(*rounded((ious - 1.0) * l1mp_label, ious * lp_label))
    cost = others + rounded(bce_label * jnp.square(ious - p_label))
    # IoU 0: the target is all zeros whatever the label, so the official cost is the same number
    # for every such GT of the prior (exact ties -> first GT in the conflict argmin); keep it so
    return jnp.where(ious == 0, jnp.sum(neg, axis=1)[None, :], cost)


def base_cost(scores, ious, gt_labels, *, iou_weight, cls_weight):
    """cls_cost·cls_weight + (−ln(IoU + 1e-7))·iou_weight -> (G, A), without the 1e8 penalty."""
    cls_cost = classification_cost(scores, ious, gt_labels)
    iou_cost = -jnp.log(ious + 1e-7)
    return jnp.add(*rounded(cls_cost * cls_weight, iou_cost * iou_weight))


def penalised_cost(base, strict, candidate, gt_valid, penalty=PENALTY):
    """base + penalty·[not strict] (float32, official order) -> (G, A); +inf on non-candidate
    priors and padded GTs (never selectable)."""
    cost = base + jnp.where(strict, 0.0, penalty).astype(base.dtype)
    usable = gt_valid[:, None] & candidate[None, :]
    return jnp.where(usable, cost, jnp.inf)


def image_costs(scores, priors, pred_boxes, gt_boxes, gt_labels, gt_valid, *, center_radius,
                iou_weight, cls_weight):
    """One image: candidate (A,), strict / ious / base / cost (G, A)."""
    in_box, in_center = inside_masks(priors, gt_boxes, gt_valid, center_radius)
    candidate = jnp.any(in_box | in_center, axis=0)
    strict = in_box & in_center
    ious = pairwise_iou(gt_boxes, pred_boxes)
    base = base_cost(scores, ious, gt_labels, iou_weight=iou_weight, cls_weight=cls_weight)
    return dict(candidate=candidate, strict=strict, ious=ious, base=base,
                cost=penalised_cost(base, strict, candidate, gt_valid))
