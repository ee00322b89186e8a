"""Detection losses of ZeroHead (SPEC §7): QFL + GIoU + DFL, and feature distillation (§8).

Choices for parity with the official code:

* QFL works on **probabilities** (the model's ``scores``) with PyTorch's ``binary_cross_entropy``
  semantics: both log terms clamped at ≥ −100 and PyTorch's backward ``(p − y) / max(p(1 − p),
  1e-12)``, via a ``custom_vjp``. A logit formulation (log-sigmoid) differs from the official loss
  wherever float32 sigmoid saturates to exactly 1 (logits ≳ 17: −ln(1 − p) is clamped at 100 by the
  official code but would be the true value, ~17, on logits), so probabilities are used; this also
  keeps values and gradients finite at p = 0 and p = 1.
* GIoU uses eps = 1e-6 for both the union and the enclosing area; DFL is cross entropy on the
  pre-softmax reg logits with linear interpolation between the two neighbouring bins.
* Normalisers are over the whole batch the function sees (global under a sharded jit), floored at
  1 and stop-gradient. With ``axis_name`` (inside ``shard_map``/``pmap``) they are ``pmean``-ed like
  the official ``reduce_mean`` and the caller averages gradients across devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from damo_jax.ops import boxes as box_ops

GIOU_EPS = 1e-6
LOG_CLAMP = -100.0
QFL_WEIGHT, GIOU_WEIGHT, DFL_WEIGHT = 1.0, 2.0, 0.25
_SAFE_BOX = (0.0, 0.0, 1.0, 1.0)     # stand-in GT box of negatives (their loss weight is 0)


@jax.custom_vjp
def bce_probs(p: jax.Array, y: jax.Array) -> jax.Array:
    """Elementwise −[y·max(ln p, −100) + (1 − y)·max(ln(1 − p), −100)], as PyTorch's BCE."""
    log_p = jnp.maximum(jnp.log(p), LOG_CLAMP)
    log_1mp = jnp.maximum(jnp.log1p(-p), LOG_CLAMP)
    return (y - 1.0) * log_1mp - y * log_p


def _bce_fwd(p, y):
    return bce_probs(p, y), (p, y)


def _bce_bwd(res, g):
    p, y = res
    grad_p = g * (p - y) / jnp.maximum((1.0 - p) * p, 1e-12)
    log_p = jnp.maximum(jnp.log(p), LOG_CLAMP)
    log_1mp = jnp.maximum(jnp.log1p(-p), LOG_CLAMP)
    return grad_p, g * (log_1mp - log_p)


bce_probs.defvjp(_bce_fwd, _bce_bwd)


def quality_focal_loss(pred, labels, label_scores, *, beta=2.0, use_sigmoid=False):
    """QFL per sample, summed over classes -> (...,).

    pred (..., C): probabilities (``use_sigmoid=False``, as the head uses it) or logits; labels
    (...,) int in 0..C−1 for positives, anything else (e.g. C) for background; label_scores (...,)
    soft targets (IoU). Negative entries: BCE(p, 0)·p^β; the positive's label entry:
    BCE(p, q)·|q − p|^β.
    """
    pred = jnp.asarray(pred, jnp.float32)
    num_classes = pred.shape[-1]
    onehot = jnp.asarray(labels)[..., None] == jnp.arange(num_classes)
    target = jnp.where(onehot, jnp.asarray(label_scores, jnp.float32)[..., None], 0.0)
    if use_sigmoid:
        prob = jax.nn.sigmoid(pred)
        bce = (1.0 - target) * pred - jax.nn.log_sigmoid(pred)
    else:
        prob = pred
        bce = bce_probs(pred, target)
    return jnp.sum(bce * jnp.abs(target - prob) ** beta, axis=-1)


def distribution_focal_loss(pred_logits, target):
    """DFL per (sample, side): pred_logits (..., R+1) pre-softmax, target (...) in [0, R − 0.1].

    CE(logits, ⌊t⌋)·(⌊t⌋ + 1 − t) + CE(logits, ⌊t⌋ + 1)·(t − ⌊t⌋) -> (...).
    """
    pred_logits = jnp.asarray(pred_logits, jnp.float32)
    target = jnp.asarray(target, jnp.float32)
    reg_max = pred_logits.shape[-1] - 1
    left = jnp.clip(jnp.floor(target), 0, reg_max - 1).astype(jnp.int32)
    weight_left = (left + 1).astype(jnp.float32) - target
    weight_right = target - left.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(pred_logits, axis=-1)
    ce_left = -jnp.take_along_axis(log_probs, left[..., None], axis=-1)[..., 0]
    ce_right = -jnp.take_along_axis(log_probs, left[..., None] + 1, axis=-1)[..., 0]
    return ce_left * weight_left + ce_right * weight_right


def pairwise_iou(boxes_a, boxes_b, eps=GIOU_EPS):
    """Plain IoU between every box of (N, 4) and every box of (M, 4), x1y1x2y2 -> (N, M)."""
    return box_ops.pairwise_iou(boxes_a, boxes_b, eps=eps)


def aligned_giou(pred, target, eps=GIOU_EPS):
    """GIoU of matching rows (..., 4) x1y1x2y2 (:func:`damo_jax.ops.boxes.aligned_giou`)."""
    return box_ops.aligned_giou(pred, target, eps=eps)


def giou_loss(pred, target, eps=GIOU_EPS):
    """1 − GIoU per row (...,)."""
    return 1.0 - aligned_giou(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), eps)


def _normaliser(value, axis_name):
    value = jax.lax.stop_gradient(value)
    if axis_name is not None:
        value = jax.lax.pmean(value, axis_name)
    return jnp.maximum(value, 1.0)


def detection_loss(head_outputs, targets, *, reg_max, axis_name=None):
    """Total detection loss (SPEC §7) -> (total, metrics).

    head_outputs: the model output dict — ``scores`` (B, A, C) probabilities, ``boxes`` (B, A, 4)
    decoded x1y1x2y2, ``reg_logits_flat`` (B, A, 4, R+1) pre-softmax after Scale.
    targets: from :func:`damo_jax.assign.ota.build_targets` — ``labels`` (B, A) (C = background),
    ``label_scores``, ``bbox_targets`` (B, A, 4), ``dfl_targets`` (B, A, 4), ``fg_mask`` (B, A).

    loss_cls = Σ QFL / max(#pos, 1); w = detached max class score of each positive;
    loss_bbox = 2 Σ w (1 − GIoU) / max(Σw, 1); loss_dfl = 0.25 Σ w ΣDFL_sides / (4 max(Σw, 1)).
    metrics: ``total_loss``, ``loss_cls``, ``loss_bbox``, ``loss_dfl``, ``num_pos``,
    ``weight_sum`` (the two normalisers before flooring).
    """
    scores = jnp.asarray(head_outputs["scores"], jnp.float32)
    boxes = jnp.asarray(head_outputs["boxes"], jnp.float32)
    reg_logits = jnp.asarray(head_outputs["reg_logits_flat"], jnp.float32)
    if reg_logits.shape[-1] != reg_max + 1:
        raise ValueError(f"damo_jax.losses.detection_loss: reg_logits_flat has "
                         f"{reg_logits.shape[-1]} bins, expected reg_max + 1 = {reg_max + 1}")
    fg = jnp.asarray(targets["fg_mask"], bool)
    num_pos = jnp.sum(fg).astype(jnp.float32)
    weights = jnp.where(fg, jax.lax.stop_gradient(jnp.max(scores, axis=-1)), 0.0)
    weight_sum = jnp.sum(weights)
    pos_norm, box_norm = _normaliser(num_pos, axis_name), _normaliser(weight_sum, axis_name)

    soft_targets = jax.lax.stop_gradient(targets["label_scores"])
    qfl = quality_focal_loss(scores, targets["labels"], soft_targets)
    loss_cls = QFL_WEIGHT * jnp.sum(qfl) / pos_norm
    safe_targets = jnp.where(fg[..., None], targets["bbox_targets"], jnp.asarray(_SAFE_BOX))
    giou = giou_loss(boxes, jax.lax.stop_gradient(safe_targets))
    loss_bbox = GIOU_WEIGHT * jnp.sum(weights * giou) / box_norm
    dfl = distribution_focal_loss(reg_logits, jax.lax.stop_gradient(targets["dfl_targets"]))
    loss_dfl = DFL_WEIGHT * jnp.sum(weights[..., None] * dfl) / (4.0 * box_norm)
    total = loss_cls + loss_bbox + loss_dfl
    metrics = dict(total_loss=total, loss_cls=loss_cls, loss_bbox=loss_bbox, loss_dfl=loss_dfl,
                   num_pos=num_pos, weight_sum=weight_sum)
    return total, metrics


# --------------------------------------------------------------------------- distillation (§8)
def init_align_params(key, student_channels, teacher_channels):
    """Per-level 1x1 align convs (with bias), PyTorch Conv2d default init: U(±1/√C_s) for both.

    Returns a list of {"kernel": (C_s, C_t), "bias": (C_t,)} (student -> teacher channels).
    """
    params = []
    for key_l, cs, ct in zip(jax.random.split(key, len(student_channels)), student_channels,
                             teacher_channels):
        k_w, k_b = jax.random.split(key_l)
        bound = 1.0 / float(cs) ** 0.5
        params.append(dict(kernel=jax.random.uniform(k_w, (cs, ct), jnp.float32, -bound, bound),
                           bias=jax.random.uniform(k_b, (ct,), jnp.float32, -bound, bound)))
    return params


def _batch_channel_norm(x, eps=1e-5):
    """Affine-free BatchNorm in training mode: per channel over (N, H, W), biased variance."""
    mean = jnp.mean(x, axis=(0, 1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2), keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


def distill_loss(student_feats, teacher_feats, align_params, *, method="cwd", tau=1.0,
                 loss_weight=1.0):
    """Feature distillation loss of the official FeatureLoss (SPEC §8), summed over levels.

    student_feats / teacher_feats: sequences of NHWC maps (N, H_l, W_l, C_s/t) of equal spatial
    size; align_params: per level {"kernel": (C_s, C_t) (or (1, 1, C_s, C_t)), "bias": (C_t,)}.
    Per level: 1x1 align conv on the student, both maps normalised per channel with the current
    batch's statistics (eps 1e-5), then
    ``cwd``: Σ_{n,c} KL(softmax_hw(t/τ) ‖ softmax_hw(s/τ))·τ² / (N·C) (channel-wise distillation);
    ``mimic``: mean squared error. The teacher is treated as a constant (stop_gradient). The
    trainer's cosine weight schedule (1.0 -> 0.1) is not included.
    """
    if method not in ("cwd", "mimic"):
        raise ValueError(f"damo_jax.losses.distill_loss: method must be 'cwd' or 'mimic', "
                         f"got {method!r}")
    total = jnp.float32(0.0)
    for level, (s, t, p) in enumerate(zip(student_feats, teacher_feats, align_params)):
        s, t = jnp.asarray(s, jnp.float32), jax.lax.stop_gradient(jnp.asarray(t, jnp.float32))
        kernel = jnp.asarray(p["kernel"], jnp.float32)
        kernel = kernel.reshape(kernel.shape[-2:])
        if s.shape[:3] != t.shape[:3] or kernel.shape != (s.shape[-1], t.shape[-1]):
            raise ValueError(f"distill_loss level {level}: student {s.shape}, teacher {t.shape}, "
                             f"align kernel {kernel.shape} do not fit")
        s = _batch_channel_norm(jnp.einsum("nhwc,cd->nhwd", s, kernel,
                                           precision=jax.lax.Precision.HIGHEST) + p["bias"])
        t = _batch_channel_norm(t)
        if method == "mimic":
            total = total + jnp.mean(jnp.square(s - t))
            continue
        n, h, w, c = s.shape
        log_ps = jax.nn.log_softmax(s.reshape(n, h * w, c) / tau, axis=1)
        log_pt = jax.nn.log_softmax(t.reshape(n, h * w, c) / tau, axis=1)
        kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps)) * tau ** 2
        total = total + kl / (n * c)
    return loss_weight * total
