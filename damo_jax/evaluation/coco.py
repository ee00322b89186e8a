"""COCO bbox evaluation (SPEC §9.4): detections -> COCO results -> the 12 standard stats.

* :func:`detections_to_coco` maps static-shape NMS output (network-input pixels, contiguous labels)
  to COCO results: boxes scaled back with **independent** x / y factors (orig_w / W_in,
  orig_h / H_in), x1y1x2y2 -> xywh (w = x2 - x1, no +1), labels -> source category ids.
* :func:`coco_evaluate` runs the COCO protocol with faster-coco-eval (default, ~8x faster) or
  pycocotools (the reference); both give identical numbers (TOOLCHAIN §6, tested). With
  ``details=True`` it also returns the same run's accumulated arrays (per-class reports).
  :func:`run_cocoeval` is the one place a COCOeval object is built and run.
* :func:`format_coco_table` renders the standard 12-line COCO summary.

Conventions of the returned dict: keys :data:`STAT_NAMES`, Python floats in [0, 1], and -1.0
where COCO leaves a stat undefined (e.g. APs when the ground truth has no small object).
With zero detections the evaluation still runs (every defined stat is 0.0).
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Iterable, Mapping, Sequence

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

_TABLE_ROWS = (  # (title, IoU, area, maxDets) of pycocotools' _summarizeDets, in STAT_NAMES order
    ("Average Precision", "0.50:0.95", "all", 100), ("Average Precision", "0.50", "all", 100),
    ("Average Precision", "0.75", "all", 100), ("Average Precision", "0.50:0.95", "small", 100),
    ("Average Precision", "0.50:0.95", "medium", 100), ("Average Precision", "0.50:0.95", "large", 100),
    ("Average Recall", "0.50:0.95", "all", 1), ("Average Recall", "0.50:0.95", "all", 10),
    ("Average Recall", "0.50:0.95", "all", 100), ("Average Recall", "0.50:0.95", "small", 100),
    ("Average Recall", "0.50:0.95", "medium", 100), ("Average Recall", "0.50:0.95", "large", 100),
)


def detections_to_coco(nms_out: Mapping, image_ids, orig_sizes, input_hw: Sequence[int],
                       category_ids: Sequence[int], valid=None) -> list[dict]:
    """Convert one batch of :func:`damo_jax.ops.nms.multiclass_nms` output to COCO result dicts.

    Args:
      nms_out: ``boxes`` (B,K,4) x1y1x2y2 in network-input pixels, ``scores`` (B,K),
        ``labels`` (B,K) contiguous 0..C-1, ``num_dets`` (B,).
      image_ids: (B,) source image ids.
      orig_sizes: (B,2) original (h, w) of each image.
      input_hw: (H_in, W_in) of the network input the boxes refer to.
      category_ids: source category id of each contiguous label (``dataset.category_ids``).
      valid: optional (B,) bool; False rows (padding of the last batch) are skipped.
    Returns a list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in original
    image pixels (boxes are not clipped, like the official evaluator).
    """
    boxes = np.asarray(nms_out["boxes"], np.float64)
    scores = np.asarray(nms_out["scores"], np.float64)
    labels = np.asarray(nms_out["labels"])
    num_dets = np.asarray(nms_out["num_dets"])
    image_ids = np.asarray(image_ids).reshape(-1)
    orig_sizes = np.asarray(orig_sizes, np.float64).reshape(-1, 2)
    category_ids = np.asarray(category_ids)
    batch = boxes.shape[0]
    if not (len(image_ids) == len(orig_sizes) == batch == len(num_dets)):
        raise ValueError(f"detections_to_coco: batch sizes differ: boxes {batch}, image_ids "
                         f"{len(image_ids)}, orig_sizes {len(orig_sizes)}, num_dets {len(num_dets)}")
    valid = np.ones(batch, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    in_h, in_w = float(input_hw[0]), float(input_hw[1])
    results = []
    for b in range(batch):
        n = int(num_dets[b])
        if not valid[b] or n == 0:
            continue
        lab = labels[b, :n]
        if lab.min() < 0 or lab.max() >= len(category_ids):
            raise ValueError(f"detections_to_coco: label {int(lab.max())} outside the "
                             f"{len(category_ids)} category ids of the dataset")
        scale = np.array([orig_sizes[b, 1] / in_w, orig_sizes[b, 0] / in_h] * 2)
        xyxy = boxes[b, :n] * scale
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        cats = category_ids[lab]
        img_id = int(image_ids[b])
        for box, score, cat in zip(xywh.tolist(), scores[b, :n].tolist(), cats.tolist()):
            results.append({"image_id": img_id, "category_id": int(cat), "bbox": box,
                            "score": float(score)})
    return results


def _clean_gt(gt_coco_dict: Mapping) -> dict:
    """A copy of the GT dict with the fields COCOeval needs (iscrowd, area, id) filled in."""
    for key in ("images", "annotations", "categories"):
        if key not in gt_coco_dict:
            raise KeyError(f"coco_evaluate: ground-truth dict lacks the {key!r} list")
    gt = {"info": dict(gt_coco_dict.get("info", {})),
          "images": [dict(im) for im in gt_coco_dict["images"]],
          "categories": [dict(c) for c in gt_coco_dict["categories"]],
          "annotations": []}
    for index, ann in enumerate(gt_coco_dict["annotations"]):
        ann = dict(ann)
        x, y, w, h = ann["bbox"]
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(w) * float(h))
        ann.setdefault("id", index + 1)
        gt["annotations"].append(ann)
    return gt


def _check_detections(detections: Iterable[Mapping], gt: dict) -> list[dict]:
    image_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    dets = []
    for det in detections:
        if det["image_id"] not in image_ids:
            raise ValueError(f"coco_evaluate: detection for image_id {det['image_id']} that is "
                             "not in the ground truth")
        if det["category_id"] not in cat_ids:
            raise ValueError(f"coco_evaluate: detection with category_id {det['category_id']} "
                             f"that is not a ground-truth category ({sorted(cat_ids)[:10]}...)")
        dets.append({"image_id": int(det["image_id"]), "category_id": int(det["category_id"]),
                     "bbox": [float(v) for v in det["bbox"]], "score": float(det["score"])})
    return dets


def _empty_results(coco_cls, gt_api):
    res = coco_cls()
    res.dataset = {"info": {}, "images": list(gt_api.dataset["images"]), "annotations": [],
                   "categories": copy.deepcopy(gt_api.dataset["categories"])}
    res.createIndex()
    return res


def run_cocoeval(gt: dict, dets: list[dict], *, use_fast: bool = True):
    """THE COCOeval run of this package (bbox; evaluate, accumulate, summarize; nothing printed) on
    a :func:`_clean_gt` dict and :func:`_check_detections` results, with faster-coco-eval
    (``use_fast``) or pycocotools. Returns the evaluator: ``stats`` (12), ``eval["precision"]``
    (T, R, K, A, M), ``params``."""
    if use_fast:
        from faster_coco_eval import COCO, COCOeval_faster as COCOeval
        kw = {"print_function": lambda *a, **k: None}
        gt_api = COCO(gt, **kw)
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        kw = {}
        with contextlib.redirect_stdout(io.StringIO()):
            gt_api = COCO()
            gt_api.dataset = gt
            gt_api.createIndex()
    with contextlib.redirect_stdout(io.StringIO()):
        dt_api = gt_api.loadRes(dets) if dets else _empty_results(COCO, gt_api)
        evaluator = COCOeval(gt_api, dt_api, "bbox", **kw)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _details(evaluator, stats: dict) -> dict:
    return {"stats": stats,
            "precision": np.asarray(evaluator.eval["precision"], np.float64),
            "iou_thrs": np.asarray(evaluator.params.iouThrs, np.float64),
            "rec_thrs": np.asarray(evaluator.params.recThrs, np.float64),
            "cat_ids": [int(c) for c in evaluator.params.catIds]}


def restrict_to_images(gt_coco_dict: Mapping, image_ids: Iterable[int]) -> dict:
    """The ground truth of the listed images only (their ``images`` and ``annotations`` entries;
    ``categories`` unchanged), e.g. the images an evaluation could actually read."""
    keep = {int(i) for i in image_ids}
    return dict(gt_coco_dict, images=[im for im in gt_coco_dict["images"] if int(im["id"]) in keep],
                annotations=[a for a in gt_coco_dict["annotations"] if int(a["image_id"]) in keep])


def coco_evaluate(gt_coco_dict: Mapping, detections: Iterable[Mapping], *,
                  use_fast: bool = True, image_ids: Iterable[int] | None = None,
                  details: bool = False):
    """COCO bbox evaluation of ``detections`` (COCO results format, source category ids).

    Args:
      gt_coco_dict: COCO ground-truth dict (``images``, ``annotations``, ``categories``), e.g.
        ``dataset.to_coco_dict()``; it is not modified.
      detections: iterable of ``{"image_id", "category_id", "bbox": [x,y,w,h], "score"}``.
      use_fast: faster-coco-eval (True) or pycocotools (False); identical numbers.
      image_ids: score only these images (:func:`restrict_to_images`; e.g. leave out images that
        could not be read, instead of counting their objects as missed). None: every image.
      details: also return the accumulated arrays of the same run (what the per-class table,
        PR curves and ``reports.coco_eval_details`` read), so that a report costs no second
        COCOeval run.
    Returns ``{name: float}`` for the 12 :data:`STAT_NAMES`; with ``details`` the pair
    ``(stats, {"stats", "precision" (T,R,K,A,M) float64, "iou_thrs" (T,), "rec_thrs" (R,),
    "cat_ids" (K,) in the precision array's class order})``.
    """
    if image_ids is not None:
        gt_coco_dict = restrict_to_images(gt_coco_dict, image_ids)
    gt = _clean_gt(gt_coco_dict)
    dets = _check_detections(detections, gt)
    evaluator = run_cocoeval(gt, dets, use_fast=use_fast)
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats[:12])}
    return (stats, _details(evaluator, stats)) if details else stats


def format_coco_table(stats: Mapping[str, float]) -> str:
    """The standard 12-line COCO summary (same layout as pycocotools' ``summarize``)."""
    lines = []
    for name, (title, iou, area, max_dets) in zip(STAT_NAMES, _TABLE_ROWS):
        kind = "(AP)" if title.startswith("Average Precision") else "(AR)"
        lines.append(f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | "
                     f"maxDets={max_dets:>3d} ] = {stats[name]:0.3f}")
    return "\n".join(lines)


def print_coco_table(stats: Mapping[str, float], file=None) -> None:
    print(format_coco_table(stats), file=file)
