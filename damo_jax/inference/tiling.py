"""Tiled (sliced) inference for images larger than the network input.

    det = Detector.load(...)
    result = det.tiled(image, tile=640, overlap=0.2, full_image=True)   # same dict as det(image)

Pipeline for one (h, w, 3) image:

1. :func:`tile_grid` cuts it into ``tile x tile`` windows (clipped to the image) whose starts step
   by ``round(tile * (1 - overlap))``; the last window of a row / column is aligned to the image
   edge, so every pixel is covered and no window sticks out of the image.
2. The windows are run as ONE list through the :class:`~damo_jax.inference.detector.Detector`
   (it batches them by its ``batch_size``, stretch-resizes each to the network size and runs its own
   NMS), and each window's boxes are shifted by its (x0, y0) into original-image pixels.
   With ``full_image=True`` the whole image is run once more (stretched to the network size), which
   finds objects larger than a tile.
3. :func:`merge_detections`:
   a. *cut boxes*: a window detection that touches a window edge lying inside the image (within
      ``edge_margin`` px) may be an object cut by the window. It is dropped when a not-cut
      detection of the same class (another window, or the full-image pass) covers at least
      ``cover_thre`` of its area -- the same object seen whole elsewhere. Cut boxes without such a
      cover (objects bigger than the overlap) are kept.
   b. class-aware greedy NMS at the detector's IoU threshold over everything left, with
      :func:`damo_jax.ops.nms.greedy_nms_sorted` (the library's one NMS), highest scores first;
   c. the first ``max_dets`` survivors.

Boxes everywhere are x1y1x2y2 float pixels of the ORIGINAL image; labels are 0-based class indices.
With ``overlap`` >= the largest object size (in pixels, as a fraction of the tile) every object lies
whole inside at least one window. An image that fits in one tile gives exactly one window (the
whole image), i.e. the same result as ``det(image)``.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from damo_jax.ops.boxes import pairwise_intersection
from damo_jax.ops.nms import greedy_nms_sorted, iou_threshold_f32

_NMS_BLOCK = 128


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Window starts along one axis: 0, stride, 2*stride, ... with the last one at length - tile."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tile_grid(height: int, width: int, tile: int, overlap: float) -> np.ndarray:
    """Windows covering an (height, width) image: (T, 4) int64 ``x0, y0, x1, y1`` (x1/y1 exclusive).

    Windows are ``min(tile, width) x min(tile, height)``; row-major order (y, then x).
    """
    tile, overlap = int(tile), float(overlap)
    if tile < 32:
        raise ValueError(f"tile size {tile} is too small (>= 32 pixels)")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap {overlap} must be in [0, 1)")
    stride = max(1, int(round(tile * (1.0 - overlap))))
    tw, th = min(tile, width), min(tile, height)
    windows = [(x0, y0, x0 + tw, y0 + th)
               for y0 in _starts(height, tile, stride) for x0 in _starts(width, tile, stride)]
    return np.asarray(windows, np.int64).reshape(-1, 4)


def cut_mask(boxes: np.ndarray, window, image_hw, edge_margin: float) -> np.ndarray:
    """(N,) bool: box (original pixels) within ``edge_margin`` of an edge of ``window`` that lies
    inside the image (an edge on the image border cuts nothing)."""
    x0, y0, x1, y1 = (float(v) for v in window)
    h, w = image_hw
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    cut = np.zeros(len(boxes), bool)
    if x0 > 0:
        cut |= boxes[:, 0] <= x0 + edge_margin
    if y0 > 0:
        cut |= boxes[:, 1] <= y0 + edge_margin
    if x1 < w:
        cut |= boxes[:, 2] >= x1 - edge_margin
    if y1 < h:
        cut |= boxes[:, 3] >= y1 - edge_margin
    return cut


def _covered(boxes, labels, cut, cover_thre: float) -> np.ndarray:
    """(N,) bool: cut boxes of which a same-class not-cut box covers >= cover_thre of the area."""
    drop = np.zeros(len(boxes), bool)
    whole = ~cut
    if not cut.any() or not whole.any():
        return drop
    area, _, inter = pairwise_intersection(boxes[cut], boxes[whole])
    area = np.maximum(area, 1e-9)
    same = labels[cut][:, None] == labels[whole][None, :]
    drop[np.flatnonzero(cut)] = np.any(same & (inter / area[:, None] >= cover_thre), axis=1)
    return drop


@functools.partial(jax.jit, static_argnames=("block",))
def _nms_keep(boxes, labels, valid, iou_thre, *, block):
    return greedy_nms_sorted(boxes, labels, valid, iou_thre, block)


def class_nms(boxes, scores, labels, iou_thre: float) -> np.ndarray:
    """Indices kept by class-aware greedy NMS, in descending score order (stable on ties).

    boxes (N,4) x1y1x2y2, scores (N,), labels (N,) int. Pads N to a power-of-two multiple of the
    NMS block so repeated calls reuse a few compiled shapes.
    """
    n = len(scores)
    if n == 0:
        return np.zeros((0,), np.int64)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    size = _NMS_BLOCK
    while size < n:
        size *= 2
    pad = size - n
    sorted_boxes = np.pad(np.asarray(boxes, np.float32)[order], ((0, pad), (0, 0)))
    sorted_labels = np.pad(np.asarray(labels, np.int32)[order], (0, pad), constant_values=-1)
    valid = np.arange(size) < n
    keep = np.asarray(_nms_keep(sorted_boxes, sorted_labels, valid,
                                np.float32(iou_threshold_f32(iou_thre)), block=_NMS_BLOCK))
    return order[keep[:n]]


def merge_detections(parts, *, iou_thre: float, max_dets: int, cover_thre: float = 0.6,
                     class_names=None) -> dict:
    """Merge per-window detections (already in original pixels) into one result dict.

    ``parts``: list of ``(result, cut)`` with ``result`` a Detector result dict (boxes, scores,
    labels) and ``cut`` its (N,) bool cut-box mask (all False for the full-image pass).
    Returns ``boxes`` (K,4) float32, ``scores`` (K,), ``labels`` (K,) int32 and ``class_names``
    (when ``class_names`` is given), sorted by descending score.
    """
    boxes = np.concatenate([np.asarray(r["boxes"], np.float32).reshape(-1, 4) for r, _ in parts])
    scores = np.concatenate([np.asarray(r["scores"], np.float32).reshape(-1) for r, _ in parts])
    labels = np.concatenate([np.asarray(r["labels"], np.int32).reshape(-1) for r, _ in parts])
    cut = np.concatenate([np.asarray(c, bool).reshape(-1) for _, c in parts])
    alive = np.flatnonzero(~_covered(boxes.astype(np.float64), labels, cut, cover_thre))
    keep = alive[class_nms(boxes[alive], scores[alive], labels[alive], iou_thre)][:max_dets]
    out = {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
    if class_names is not None:
        out["class_names"] = [class_names[c] if 0 <= c < len(class_names) else str(c)
                              for c in out["labels"].tolist()]
    return out


def detect_tiled(detector, image, *, tile: int, overlap: float = 0.2, full_image: bool = False,
                 edge_margin: float = 2.0, cover_thre: float = 0.6) -> dict:
    """Detections of one image (path / PIL / (H,W,3) array) by tiles; see the module docstring.

    ``detector``: a :class:`~damo_jax.inference.detector.Detector` (any backend). Returns the
    Detector's result dict (boxes in original-image pixels, sorted by descending score).
    """
    from damo_jax.inference.detector import to_rgb_array
    image = to_rgb_array(image)
    h, w = image.shape[:2]
    windows = tile_grid(h, w, tile, overlap)
    crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in windows.tolist()]
    results = detector(crops)      # padded: one shape per power of two, batch_size when longer
    parts = []
    for window, result in zip(windows, results):
        shifted = dict(result, boxes=np.asarray(result["boxes"], np.float32).reshape(-1, 4)
                       + np.asarray([window[0], window[1]] * 2, np.float32))
        parts.append((shifted, cut_mask(shifted["boxes"], window, (h, w), edge_margin)))
    if full_image and len(windows) > 1:
        whole = detector(image)
        parts.append((whole, np.zeros(len(whole["scores"]), bool)))
    return merge_detections(parts, iou_thre=detector.iou, max_dets=detector.params.max_dets,
                            cover_thre=cover_thre, class_names=detector.class_names)


# ------------------------------------------------------------------------------ CLI / evaluation

DEFAULT_OVERLAP = 0.2   # --overlap with --tile when not given


def add_tile_arguments(p) -> None:
    """``--tile SIZE --overlap FRAC [--tile-full-image]`` of ``damo-jax predict`` / ``eval``."""
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="tiled inference: cut each image into SIZE x SIZE windows (each stretched "
                        "to the network size), merge by class-aware NMS in original pixels")
    p.add_argument("--overlap", type=float, default=None, metavar="FRAC",
                   help="--tile: overlap of neighbouring windows, fraction of SIZE (default 0.2; "
                        "at least the largest object's size for whole boxes)")
    p.add_argument("--tile-full-image", action="store_true",
                   help="--tile: add a whole-image pass (finds objects larger than a window)")


def check_tile_arguments(args) -> None:
    """ConfigError naming the flag for impossible --tile / --overlap values."""
    from damo_jax.errors import ConfigError
    if args.tile is None:
        if args.tile_full_image:
            raise ConfigError("--tile-full-image needs --tile SIZE")
        if args.overlap is not None:
            raise ConfigError(f"--overlap {args.overlap}: needs --tile SIZE (without it the image is "
                              f"not cut into windows)")
        return
    if args.overlap is None:
        args.overlap = DEFAULT_OVERLAP
    if args.tile < 32:
        raise ConfigError(f"--tile {args.tile}: the window must be at least 32 pixels")
    if not 0.0 <= args.overlap < 1.0:
        raise ConfigError(f"--overlap {args.overlap}: must be in [0, 1)")


def run_tiled_detections(detector, dataset, *, tile: int, overlap: float, full_image: bool,
                         scored_ids: set | None = None, progress: bool = True) -> list[dict]:
    """Tiled detections of every dataset image -> COCO results (source category ids, xywh in
    original pixels). Unreadable images are skipped and logged (not added to ``scored_ids``)."""
    import logging
    log = logging.getLogger("damo_jax.inference.tiling")
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc="eval (tiled)", unit="img")
    category_ids = list(dataset.category_ids)
    results = []
    for index in indices:
        try:
            record = dataset[index]
        except (ValueError, OSError) as e:
            log.warning("skipping image %d: %s", index, e)
            continue
        out = detect_tiled(detector, record["image"], tile=tile, overlap=overlap,
                           full_image=full_image)
        image_id = int(record["image_id"])
        if scored_ids is not None:
            scored_ids.add(image_id)
        for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                     out["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": int(category_ids[label]),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                            "score": float(score)})
    return results
