"""Static-shape, jit-able multi-class NMS (the official eval post-processing, SPEC §2.14).

Official semantics (``damo/utils/boxes.py``: ``multiclass_nms`` + torchvision ``batched_nms``):

1. every (anchor, class) pair whose score is **strictly greater** than ``conf_thre`` is a candidate
   with that anchor's box (multi-label: one anchor may give several classes);
2. candidates are ordered by descending score, ties by their row-major (anchor, class) index
   (``lax.top_k`` puts the lower index first, checked on CPU). torchvision's own order of
   equal scores is implementation-defined: its coordinate-offset path (up to 1000 candidates on
   CPU) sorts stably, its per-class path (more candidates) ends with an unstable sort, so when
   more than ``max_dets`` rows survive with scores tied at the cut, which of them fill the last
   places may differ from the official run (the set of survivors before the cut is the same);
3. greedy class-aware NMS: a candidate is dropped when its IoU with a higher-ranked **kept**
   candidate of the same class is ``> iou_thre``; IoU uses torchvision's formula (no +1, areas
   ``(x2-x1)*(y2-y1)``, ``inter / (area_a + area_b - inter)``, so a 0/0 IoU of degenerate boxes is NaN
   and never suppresses);
4. the first ``max_dets`` kept candidates (already in descending score order) are the output.

The only deviation, needed for static shapes: before NMS only the ``pre_nms_topk`` highest-scored
candidates of each image are considered (official: all of them). It can only change the result when
more than ``pre_nms_topk`` (anchor, class) pairs exceed ``conf_thre`` and fewer than ``max_dets``
of the top ``pre_nms_topk`` survive NMS; pass ``pre_nms_topk >= A*C`` for the exact official
behaviour. The default (``damo_jax.config.PRE_NMS_TOPK``, 4000) was 1000 until 2026-12-07: the
trained README demo model has more than 1000 candidates on 86 of its 100 val images (up to 3494
at conf 0.03; its AP did not change at 3 digits), and a random-weight T lost 55 of 500
detections on one image against the official output;
4000 instead of 1000 costs 33 ms more per batch of 8 images at 8400 anchors x 80 classes on a
2-core CPU (Intel Xeon, AVX-512). (Official runs on GPU use torchvision's
coordinate-offset trick for small candidate sets, whose float32 rounding of offset coordinates can
flip IoU comparisons that are equal to ``iou_thre`` within ~1e-5; here IoU is computed on the
original coordinates.)

Greedy NMS is computed blockwise (tiles of ``tile_size`` sorted candidates): a tile is first
suppressed by the kept boxes of earlier tiles, then resolved internally by iterating
``keep[j] = cand[j] & ~any_{i<j}(keep[i] & overlap[i, j])`` to its unique fixed point, which is
exactly the sequential greedy result. Tiles past the last valid candidate are skipped.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from damo_jax.config import PRE_NMS_TOPK
from damo_jax.ops.boxes import pairwise_iou


def box_iou(boxes_a: jax.Array, boxes_b: jax.Array) -> jax.Array:
    """Pairwise IoU (torchvision formula, no eps) of x1y1x2y2 boxes: (N,4), (M,4) -> (N,M)."""
    return pairwise_iou(boxes_a, boxes_b)


def _overlaps(boxes_a, labels_a, boxes_b, labels_b, iou_thre):
    """(N,M) bool: same class and IoU > iou_thre (NaN IoU -> False)."""
    same_class = labels_a[:, None] == labels_b[None, :]
    return same_class & (box_iou(boxes_a, boxes_b) > iou_thre)


def _resolve_tile(candidates: jax.Array, overlap: jax.Array) -> jax.Array:
    """Greedy NMS inside one tile of sorted candidates.

    candidates: (T,) bool (valid and not suppressed by earlier tiles); overlap: (T,T) bool, only
    the strict upper triangle (i < j) is used. Returns the (T,) keep mask.
    """
    size = candidates.shape[0]
    upper = jnp.arange(size)[:, None] < jnp.arange(size)[None, :]
    suppressor = overlap & upper

    def step(keep):
        return candidates & ~jnp.any(keep[:, None] & suppressor, axis=0)

    def cond(state):
        keep, previous = state
        return jnp.any(keep != previous)

    def body(state):
        keep, _ = state
        return step(keep), keep

    keep, _ = jax.lax.while_loop(cond, body, (step(candidates), candidates))
    return keep


def greedy_nms_sorted(boxes, labels, valid, iou_thre, tile_size: int = 128) -> jax.Array:
    """Class-aware greedy NMS of ONE image's candidates, already sorted by descending score.

    boxes (N,4) x1y1x2y2, labels (N,) int, valid (N,) bool with the valid entries a prefix.
    N must be a multiple of ``tile_size``. Returns keep (N,) bool.
    """
    num = boxes.shape[0]
    if num % tile_size:
        raise ValueError(f"nms: candidate count {num} is not a multiple of tile_size {tile_size}")
    num_valid = jnp.sum(valid.astype(jnp.int32))
    num_tiles = (num_valid + tile_size - 1) // tile_size

    def body(state):
        tile, keep = state
        start = tile * tile_size
        tile_boxes = jax.lax.dynamic_slice_in_dim(boxes, start, tile_size)
        tile_labels = jax.lax.dynamic_slice_in_dim(labels, start, tile_size)
        tile_valid = jax.lax.dynamic_slice_in_dim(valid, start, tile_size)
        # ``keep`` is still False for this and later tiles, so this only sees earlier kept boxes.
        from_earlier = _overlaps(boxes, labels, tile_boxes, tile_labels, iou_thre) & keep[:, None]
        candidates = tile_valid & ~jnp.any(from_earlier, axis=0)
        inner = _overlaps(tile_boxes, tile_labels, tile_boxes, tile_labels, iou_thre)
        tile_keep = _resolve_tile(candidates, inner)
        return tile + 1, jax.lax.dynamic_update_slice_in_dim(keep, tile_keep, start, axis=0)

    _, keep = jax.lax.while_loop(
        lambda state: state[0] < num_tiles, body, (jnp.int32(0), jnp.zeros((num,), bool)))
    return keep


def _compact(keep, boxes, scores, labels, max_dets):
    """Move the kept rows (already score-sorted) to the front of a (max_dets,) output."""
    position = jnp.cumsum(keep.astype(jnp.int32)) - 1
    target = jnp.where(keep & (position < max_dets), position, max_dets)  # max_dets = dropped
    out_boxes = jnp.zeros((max_dets + 1, 4), boxes.dtype).at[target].set(boxes)[:max_dets]
    out_scores = jnp.zeros((max_dets + 1,), scores.dtype).at[target].set(scores)[:max_dets]
    out_labels = jnp.full((max_dets + 1,), -1, jnp.int32).at[target].set(labels)[:max_dets]
    num_dets = jnp.minimum(jnp.sum(keep.astype(jnp.int32)), max_dets)
    return out_boxes, out_scores, out_labels, num_dets


def _nms_one_image(scores, boxes, conf_thre, iou_thre, max_dets, pre_nms_topk, tile_size):
    num_anchors, num_classes = scores.shape
    flat_scores = scores.reshape(-1)
    topk = min(pre_nms_topk, flat_scores.shape[0])
    # lax.top_k is stable: equal scores keep ascending (anchor*C + class) order.
    top_scores, top_index = jax.lax.top_k(flat_scores, topk)
    padded = -(-topk // tile_size) * tile_size
    pad = padded - topk
    top_scores = jnp.pad(top_scores, (0, pad), constant_values=-jnp.inf)
    top_index = jnp.pad(top_index, (0, pad))
    cand_boxes = boxes[top_index // num_classes]
    cand_labels = (top_index % num_classes).astype(jnp.int32)
    valid = top_scores > conf_thre
    keep = greedy_nms_sorted(cand_boxes, cand_labels, valid, iou_thre, tile_size)
    top_scores = jnp.where(valid, top_scores, 0.0)
    return _compact(keep, cand_boxes, top_scores, cand_labels, max_dets)


def iou_threshold_f32(iou_thre):
    """float32 threshold t32 with ``iou > t32`` == ``iou > iou_thre`` evaluated in double.

    torchvision compares the float32 IoU with a C++ ``double`` threshold; when the threshold's
    float32 rounding goes up, the next float32 below it gives the same strict comparison.
    Array (possibly traced) thresholds are used as they are.
    """
    if not isinstance(iou_thre, (int, float, np.integer, np.floating)):
        return iou_thre
    value = float(iou_thre)
    t32 = np.float32(value)
    if float(t32) > value:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return t32


def multiclass_nms(scores, boxes, *, conf_thre, iou_thre, max_dets: int = 500,
                   pre_nms_topk: int = PRE_NMS_TOPK, tile_size: int = 128) -> dict:
    """Batched multi-label, class-aware NMS with static output shapes (jit-able).

    Args:
      scores: (B, A, C) class probabilities (sigmoid already applied).
      boxes: (B, A, 4) x1y1x2y2 boxes (any pixel frame; returned unchanged).
      conf_thre: candidates need ``score > conf_thre`` (strict, in float32 like PyTorch).
      iou_thre: same-class suppression when ``IoU > iou_thre``.
      max_dets: K, the static number of output rows per image (official 500).
      pre_nms_topk: static cap on candidates per image before NMS (see module docstring).
      tile_size: block size of the blockwise greedy NMS (performance only, result unchanged).
    Thresholds may be Python floats or traced scalars (changing them does not recompile).

    Returns a dict: ``boxes`` (B,K,4), ``scores`` (B,K), ``labels`` (B,K) int32 (0-based class),
    ``num_dets`` (B,) int32, ``num_candidates`` (B,) int32 (the (anchor, class) scores above
    ``conf_thre``: above ``pre_nms_topk`` the lowest of them were dropped before NMS). Rows are
    sorted by descending score; rows ``>= num_dets`` are padding (boxes 0, score 0, label -1).
    """
    if scores.ndim != 3 or boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"multiclass_nms: expected scores (B,A,C) and boxes (B,A,4), got "
                         f"{scores.shape} and {boxes.shape}")
    if scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"multiclass_nms: scores {scores.shape} and boxes {boxes.shape} "
                         "disagree on (B,A)")
    if min(max_dets, pre_nms_topk, tile_size) < 1:
        raise ValueError("multiclass_nms: max_dets, pre_nms_topk and tile_size must be >= 1")
    num_candidates = min(pre_nms_topk, scores.shape[1] * scores.shape[2])
    tile_size = min(tile_size, -(-num_candidates // 8) * 8)
    return _multiclass_nms_jit(scores, boxes, jnp.asarray(conf_thre, jnp.float32),
                               jnp.asarray(iou_threshold_f32(iou_thre), jnp.float32),
                               max_dets=max_dets, pre_nms_topk=pre_nms_topk, tile_size=tile_size)


@functools.partial(jax.jit, static_argnames=("max_dets", "pre_nms_topk", "tile_size"))
def _multiclass_nms_jit(scores, boxes, conf_thre, iou_thre, *, max_dets, pre_nms_topk, tile_size):
    one_image = functools.partial(
        _nms_one_image, conf_thre=conf_thre, iou_thre=iou_thre,
        max_dets=max_dets, pre_nms_topk=pre_nms_topk, tile_size=tile_size)
    scores = scores.astype(jnp.float32)
    out_boxes, out_scores, out_labels, num_dets = jax.vmap(one_image)(scores, boxes.astype(jnp.float32))
    num_candidates = jnp.sum(scores > conf_thre, axis=(1, 2), dtype=jnp.int32)
    return {"boxes": out_boxes, "scores": out_scores, "labels": out_labels, "num_dets": num_dets,
            "num_candidates": num_candidates}
