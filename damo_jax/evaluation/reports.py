"""Evaluation reports: per-class AP table, precision-recall curves, confusion matrix, results JSON.

    report = write_eval_reports("runs/eval", dataset.to_coco_dict(), detections,
                                class_names=dataset.class_names, conf=0.25, iou=0.5)

Inputs everywhere: the COCO ground-truth dict and detections in COCO results format
(``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``, source category ids), as
:mod:`damo_jax.evaluation.coco` produces them. Every report lists the classes by increasing
category id (COCOeval's order), which need not be the dataset's label order (a COCO file's
categories keep the file's order, e.g. ids 90, 3, 7). ``class_names`` are given in the order of
the ground truth's ``categories`` list (``dataset.class_names`` for ``dataset.to_coco_dict()``)
and each class is named through its category id (:func:`category_names`), never by position.

* :func:`coco_eval_details` runs the COCO protocol once and keeps ``eval["precision"]``:
  an (T=10 IoUs, R=101 recall thresholds, K classes, A=4 areas, M=3 maxDets) array, -1 where
  undefined. :func:`per_class_ap` reads per-class AP (mean over IoU 0.50:0.95 and recall) and AP50
  (IoU 0.50) at area "all", maxDets 100 -- the very slices the 12 COCO stats average over, so the
  class mean equals the overall AP. Classes without ground truth get -1 (undefined), as in COCO.
* :func:`confusion_matrix` at a stated score ``conf`` and ``iou``: detections with score >= conf,
  matched one-to-one to ground truth of ANY class by greedy descending IoU (pairs with IoU >= iou);
  rows = true class, columns = predicted class, index K = background (row K: false positives,
  column K: missed objects). Crowd annotations are left out.
* :func:`write_eval_reports` writes ``per_class.json``, ``per_class.md``, ``pr_curves.png``,
  ``confusion_matrix.png`` / ``.json`` and (``save_json``) ``detections.json`` (COCO results).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from damo_jax.evaluation.coco import coco_evaluate
from damo_jax.ops.boxes import pairwise_iou, xywh_to_xyxy


def coco_eval_details(gt_coco_dict: Mapping, detections: Iterable[Mapping], *,
                      use_fast: bool = True) -> dict:
    """COCO bbox evaluation that keeps the accumulated arrays (``coco.coco_evaluate(...,
    details=True)``'s second half): ``stats`` ({name: float} of ``coco.STAT_NAMES``),
    ``precision`` (T,R,K,A,M) float64, ``iou_thrs`` (T,), ``rec_thrs`` (R,), ``cat_ids`` (K,) in
    the precision array's class order."""
    return coco_evaluate(gt_coco_dict, detections, use_fast=use_fast, details=True)[1]


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def per_class_ap(details: Mapping) -> list[dict]:
    """[{category_id, AP, AP50}] per class (area all, maxDets 100), -1 for classes without GT."""
    precision, iou_thrs = details["precision"], details["iou_thrs"]
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    rows = []
    for k, cat in enumerate(details["cat_ids"]):
        rows.append({"category_id": cat,
                     "AP": _mean_defined(precision[:, :, k, 0, -1]),
                     "AP50": _mean_defined(precision[t50, :, k, 0, -1])})
    return rows


def pr_curve(details: Mapping, k: int | None, iou: float = 0.5) -> np.ndarray:
    """(R,) precision at each recall threshold for class index ``k`` (None: mean over the classes
    with GT) at ``iou``, area all, maxDets 100; -1 entries (unreached recall) set to 0."""
    t = int(np.argmin(np.abs(details["iou_thrs"] - iou)))
    p = details["precision"][t, :, :, 0, -1]  # (R, K)
    if k is not None:
        return np.clip(p[:, k], 0, None)
    has_gt = (p > -1).any(axis=0)
    return np.clip(p[:, has_gt], 0, None).mean(axis=1) if has_gt.any() else np.zeros(len(p))


def _gt_by_image(gt: Mapping, cat_index: Mapping[int, int]):
    out = {int(im["id"]): ([], []) for im in gt["images"]}
    for ann in gt["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        out[int(ann["image_id"])][0].append(ann["bbox"])
        out[int(ann["image_id"])][1].append(cat_index[int(ann["category_id"])])
    return out


def confusion_matrix(gt_coco_dict: Mapping, detections: Iterable[Mapping], *, conf: float,
                     iou: float) -> tuple[np.ndarray, list[int]]:
    """((K+1, K+1) int64 counts [true, predicted] with background last, category ids): row /
    column i is category ``ids[i]``, the ids sorted increasingly (whatever the order of
    ``gt_coco_dict["categories"]``), as in :func:`per_class_ap`."""
    cat_ids = sorted(int(c["id"]) for c in gt_coco_dict["categories"])
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    bg = len(cat_ids)
    matrix = np.zeros((bg + 1, bg + 1), np.int64)
    gts = _gt_by_image(gt_coco_dict, cat_index)
    dets = {i: ([], []) for i in gts}
    for d in detections:
        if float(d["score"]) >= conf:
            dets[int(d["image_id"])][0].append(d["bbox"])
            dets[int(d["image_id"])][1].append(cat_index[int(d["category_id"])])
    for image_id, (gt_boxes, gt_cls) in gts.items():
        det_boxes, det_cls = dets[image_id]
        g_used, d_used = np.zeros(len(gt_cls), bool), np.zeros(len(det_cls), bool)
        if gt_cls and det_cls:
            ious = np.nan_to_num(pairwise_iou(xywh_to_xyxy(np.asarray(gt_boxes, np.float64)),
                                              xywh_to_xyxy(np.asarray(det_boxes, np.float64))))
            for flat in np.argsort(-ious, axis=None, kind="stable"):
                g, d = np.unravel_index(flat, ious.shape)
                if ious[g, d] < iou:
                    break
                if not g_used[g] and not d_used[d]:
                    g_used[g] = d_used[d] = True
                    matrix[gt_cls[g], det_cls[d]] += 1
        for g in np.flatnonzero(~g_used):
            matrix[gt_cls[g], bg] += 1
        for d in np.flatnonzero(~d_used):
            matrix[bg, det_cls[d]] += 1
    return matrix, cat_ids


def category_names(gt_coco_dict: Mapping, class_names: Sequence[str]) -> dict[int, str]:
    """{category id: name}: ``class_names[i]`` names ``gt_coco_dict["categories"][i]`` (the
    dataset's label order, whatever the order of the ids). ValueError when the counts differ."""
    cat_ids = [int(c["id"]) for c in gt_coco_dict["categories"]]
    if len(class_names) != len(cat_ids):
        raise ValueError(f"per-class reports: {len(class_names)} class names for "
                         f"{len(cat_ids)} categories")
    return {c: str(n) for c, n in zip(cat_ids, class_names)}


def format_per_class_table(rows: Sequence[Mapping]) -> str:
    """Markdown table: class, GT instances, detections, AP, AP50 (undefined shown as '-')."""
    lines = ["| class | instances | detections | AP | AP50 |", "|---|---|---|---|---|"]
    for r in rows:
        ap = "-" if r["AP"] < 0 else f"{r['AP']:.3f}"
        ap50 = "-" if r["AP50"] < 0 else f"{r['AP50']:.3f}"
        lines.append(f"| {r['name']} | {r['instances']} | {r['detections']} | {ap} | {ap50} |")
    return "\n".join(lines)


def plot_pr_curves(details: Mapping, names: Sequence[str], order: Sequence[int], path) -> None:
    """PNG: one panel "all" + one per class index in ``order``; IoU 0.50 and 0.75 curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(None, "all classes")] + [(k, names[k]) for k in order]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    recall = details["rec_thrs"]
    for ax, (k, title) in zip(axes.flat, panels):
        for iou, style in ((0.5, "-"), (0.75, "--")):
            ax.plot(recall, pr_curve(details, k, iou), style, label=f"IoU {iou:.2f}")
        ax.set(title=title, xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(loc="lower left", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, names: Sequence[str], conf: float, iou: float, path) -> None:
    """PNG of the row-normalised confusion matrix (counts written in the cells when few classes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = list(names) + ["background"]
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.45 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"confusion matrix (score >= {conf:g}, IoU >= {iou:g})")
    if len(labels) <= 25:
        for (i, j), v in np.ndenumerate(matrix):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def per_class_rows(gt_coco_dict: Mapping, detections: Sequence[Mapping],
                   class_names: Sequence[str], details: Mapping) -> list[dict]:
    """[{category_id, name, AP, AP50, instances, detections}] per class, by increasing category id:
    :func:`per_class_ap` of a :func:`coco_eval_details` result, each row named by its category id
    (:func:`category_names`: ``class_names`` in the order of ``gt_coco_dict["categories"]``), with
    the counts of non-crowd GT boxes and of detections of that category."""
    names = category_names(gt_coco_dict, class_names)
    instances = {c: 0 for c in details["cat_ids"]}
    for ann in gt_coco_dict["annotations"]:
        if not ann.get("iscrowd", 0):
            instances[int(ann["category_id"])] += 1
    counts = {c: 0 for c in details["cat_ids"]}
    for d in detections:
        counts[int(d["category_id"])] += 1
    return [dict(r, name=names[int(r["category_id"])], instances=instances[r["category_id"]],
                 detections=counts[r["category_id"]]) for r in per_class_ap(details)]


def write_eval_reports(out_dir, gt_coco_dict: Mapping, detections: Sequence[Mapping], *,
                       class_names: Sequence[str], conf: float = 0.25, iou: float = 0.5,
                       top_k: int = 11, use_fast: bool = True, save_json: bool = True,
                       details: Mapping | None = None, printer=print) -> dict:
    """Write every report into ``out_dir``; returns ``{"stats", "per_class", "confusion",
    "files"}``. ``details``: a :func:`coco_eval_details` result to reuse (else computed here).
    ``class_names`` are in the order of ``gt_coco_dict["categories"]`` (``dataset.class_names``);
    rows, PR panels and the confusion matrix's labels are named through the category ids."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    detections = list(detections)
    details = details or coco_eval_details(gt_coco_dict, detections, use_fast=use_fast)
    rows = per_class_rows(gt_coco_dict, detections, class_names, details)
    table = format_per_class_table(rows)
    printer(table)
    files = {"per_class_json": out / "per_class.json", "per_class_md": out / "per_class.md",
             "pr_curves": out / "pr_curves.png", "confusion_png": out / "confusion_matrix.png",
             "confusion_json": out / "confusion_matrix.json"}
    files["per_class_json"].write_text(json.dumps({"stats": details["stats"], "classes": rows},
                                                  indent=1))
    files["per_class_md"].write_text(table + "\n")
    order = sorted(range(len(rows)), key=lambda k: (-rows[k]["instances"], k))[:top_k]
    plot_pr_curves(details, [r["name"] for r in rows], order, files["pr_curves"])
    matrix, cm_ids = confusion_matrix(gt_coco_dict, detections, conf=conf, iou=iou)
    names = category_names(gt_coco_dict, class_names)
    cm_names = [names[c] for c in cm_ids]
    files["confusion_json"].write_text(json.dumps(
        {"conf": conf, "iou": iou, "labels": cm_names + ["background"], "category_ids": cm_ids,
         "rows": "true class", "columns": "predicted class", "matrix": matrix.tolist()}, indent=1))
    plot_confusion(matrix, cm_names, conf, iou, files["confusion_png"])
    if save_json:
        files["detections"] = out / "detections.json"
        files["detections"].write_text(json.dumps(detections))
    return {"stats": details["stats"], "per_class": rows, "confusion": matrix,
            "files": {k: str(v) for k, v in files.items()}}
