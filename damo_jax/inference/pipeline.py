"""THE inference path: pre-process -> forward -> NMS -> rescale, shared by evaluation, predict,
``Detector``, training's ``predictions.png`` and the reference of the end-to-end export.

* :func:`stretch_resize` / :func:`preprocess` — the evaluation protocol (SPEC §9.4/§10.2):
  stretch-resize (cv2 bilinear, no letterbox) to the network size, RGB 0–255, no normalisation.
* :func:`pad_batch` — zero-pads a batch to a static size (one compiled shape, fixed-batch files).
* :class:`NmsParams` / :func:`nms_params` — conf / iou / max_dets / pre_nms_topk from ``cfg.test``.
* :func:`check_detection_options` — conf / iou in [0, 1], max_dets / pre_nms_topk / batch_size
  >= 1: a ``ConfigError`` naming the flag (``--conf`` ...) before anything is loaded.
* :func:`detect` — backend forward + :func:`damo_jax.ops.nms.multiclass_nms`; a :class:`JaxBackend`
  runs both in ONE jit (:func:`detect_batch`), exported backends (ONNX, OpenVINO) run their
  forward and then the same jitted NMS — except end-to-end files (``--end2end``, backend attribute
  ``end2end``), whose in-graph NMS result takes the NMS step's place (:func:`end2end_detections`).
* :func:`end2end_params` / :func:`check_end2end_options` — what the NMS options mean for an
  end-to-end file (a higher ``conf`` filters its rows, ``max_dets`` up to its K truncates them; an
  ``iou``, a lower ``conf``, a larger ``max_dets`` or a ``pre_nms_topk`` cannot change its NMS).
* :func:`rescale_detections` — NMS output of one image -> boxes in original-image pixels.

Backend interface: ``forward(images)`` with images (B, H, W, 3) float32 RGB 0–255 NHWC returning
``(scores (B, A, C), boxes (B, A, 4))`` xyxy network-input pixels; optional attributes
``input_hw`` (fixed (H, W)) and ``batch_size`` (fixed batch; None = any). A backend whose
``end2end`` attribute is set (:class:`damo_jax.inference.backends.End2EndInfo`) returns its
in-graph NMS result instead: the dict ``num_dets`` (B,), ``boxes`` (B, K, 4) network-input
pixels, ``scores`` (B, K), ``labels`` (B, K), rows in descending score order.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from damo_jax.config import PRE_NMS_TOPK
from damo_jax.ops.boxes import scale_boxes
from damo_jax.ops.nms import iou_threshold_f32, multiclass_nms


def stretch_resize(image: np.ndarray, image_hw: Sequence[int]) -> np.ndarray:
    """(h, w, 3) uint8 -> (H, W, 3) uint8, cv2 bilinear; the image itself when already (H, W)."""
    import cv2
    h, w = int(image_hw[0]), int(image_hw[1])
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def preprocess(images: Sequence[np.ndarray], image_hw) -> tuple[np.ndarray, np.ndarray]:
    """list of (h, w, 3) uint8 RGB -> ((B, H, W, 3) uint8 network input, (B, 2) original (h, w))."""
    batch = np.stack([stretch_resize(im, image_hw) for im in images])
    sizes = np.array([im.shape[:2] for im in images], np.int64)
    return batch, sizes


def pad_batch(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad axis 0 of ``array`` to ``size`` rows (returned unchanged when already that long)."""
    array = np.asarray(array)
    missing = int(size) - len(array)
    if missing <= 0:
        return array
    return np.concatenate([array, np.zeros((missing,) + array.shape[1:], array.dtype)])


@dataclasses.dataclass(frozen=True)
class NmsParams:
    conf: float = 0.05        # keep scores strictly above
    iou: float = 0.7          # suppress IoU strictly above (same class)
    max_dets: int = 500       # kept per image
    pre_nms_topk: int = PRE_NMS_TOPK  # candidates per image before NMS (static shape)
    classes: tuple | None = None  # 0-based labels kept (their scores only enter NMS); None: all


OPTION_FLAGS = {"conf": "--conf", "iou": "--iou", "max_dets": "--max-dets",
                "pre_nms_topk": "--pre-nms-topk", "batch_size": "--batch-size"}


def check_detection_options(where: str = "", **options) -> None:
    """Check the detection options that were given (None = not given): ``conf`` and ``iou``
    finite numbers in [0, 1]; ``max_dets``, ``pre_nms_topk`` and ``batch_size`` integers >= 1.
    A :class:`~damo_jax.errors.ConfigError` (a ``ValueError``) naming the flag, prefixed by
    ``where`` (e.g. ``"Detector.load: "``), for the first bad one."""
    from damo_jax.errors import ConfigError, is_count, is_probability
    for name, value in options.items():
        if value is None:
            continue
        flag = OPTION_FLAGS.get(name, name)
        if name in ("conf", "iou"):
            what = "score threshold" if name == "conf" else "NMS IoU threshold"
            if not is_probability(value):
                raise ConfigError(f"{where}{flag} {value!r}: the {what} must be a number in "
                                  f"[0, 1]")
        elif not is_count(value):
            raise ConfigError(f"{where}{flag} {value!r}: must be an integer >= 1")


def nms_params(test_cfg=None, **overrides) -> NmsParams:
    """:class:`NmsParams` from a config's ``test`` section (missing keys: defaults); keyword
    overrides that are not None win (``conf=``, ``iou=``, ``max_dets=``, ``pre_nms_topk=``)."""
    from damo_jax.config import config_value
    values = dict(conf=float(config_value(test_cfg, "conf_thre", NmsParams.conf)),
                  iou=float(config_value(test_cfg, "iou_thre", NmsParams.iou)),
                  max_dets=int(config_value(test_cfg, "max_dets", NmsParams.max_dets)),
                  pre_nms_topk=int(config_value(test_cfg, "pre_nms_topk", NmsParams.pre_nms_topk)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return NmsParams(**values)


def keep_classes(scores, classes):
    """(B, A, C) scores with the columns of labels not in ``classes`` zeroed (``None``: all kept),
    so that only the kept classes compete for the top-k candidates, NMS and ``max_dets`` (a
    filter before NMS, as Ultralytics' ``classes=``). NumPy or JAX arrays."""
    if classes is None:
        return scores
    xp = jnp if isinstance(scores, jax.Array) else np
    keep = np.zeros(scores.shape[-1], bool)
    keep[list(classes)] = True
    return xp.where(keep, scores, xp.zeros((), scores.dtype))


@functools.partial(jax.jit, static_argnames=("model", "max_dets", "pre_nms_topk", "classes"))
def detect_batch(model, variables, images, conf_thre, iou_thre, *, max_dets=500, pre_nms_topk=PRE_NMS_TOPK,
                 classes=None):
    """Flax forward + NMS in one jit. images (B,H,W,3) uint8 or float RGB 0–255 -> NMS dict
    (``boxes`` (B,K,4) network-input pixels, ``scores`` (B,K), ``labels`` (B,K), ``num_dets`` (B,)).

    ``iou_thre`` should come through :func:`damo_jax.ops.nms.iou_threshold_f32` (traced here);
    ``classes``: a tuple of 0-based labels to keep (:func:`keep_classes`), None for all.
    """
    out = model.apply(variables, images.astype(jnp.float32), train=False)
    return multiclass_nms(keep_classes(out["scores"], classes), out["boxes"], conf_thre=conf_thre,
                          iou_thre=iou_thre, max_dets=max_dets, pre_nms_topk=pre_nms_topk)


@functools.partial(jax.jit, static_argnames=("model",))
def _scores_and_boxes(model, variables, images):
    out = model.apply(variables, images.astype(jnp.float32), train=False)
    return out["scores"], out["boxes"]


class JaxBackend:
    """Backend of a Flax ``build_model`` module: jitted ``model.apply`` -> (scores, boxes).

    The jitted functions are shared: equal models with same-shaped inputs reuse one compilation.
    """

    input_hw = None
    batch_size = None

    def __init__(self, model, variables):
        self.model = model
        self.variables = variables

    def __call__(self, images):
        return _scores_and_boxes(self.model, self.variables, images)


def detect(backend, images, params: NmsParams) -> dict:
    """(B, H, W, 3) uint8/float images -> NMS dict (device arrays; see :func:`detect_batch`).

    Asynchronous for a :class:`JaxBackend` (one jit), so callers may overlap the next batch.
    """
    iou = iou_threshold_f32(params.iou)
    if isinstance(backend, JaxBackend):
        return detect_batch(backend.model, backend.variables, images, params.conf, iou,
                            max_dets=params.max_dets, pre_nms_topk=params.pre_nms_topk,
                            classes=params.classes)
    if getattr(backend, "end2end", None) is not None:     # the NMS ran inside the file
        return end2end_detections(backend(np.asarray(images, np.float32)), params)
    scores, boxes = backend(np.asarray(images, np.float32))
    return multiclass_nms(keep_classes(scores, params.classes), boxes, conf_thre=params.conf, iou_thre=iou,
                          max_dets=params.max_dets, pre_nms_topk=params.pre_nms_topk)


def end2end_detections(out: dict, params: NmsParams) -> dict:
    """An end-to-end file's NMS result (``num_dets`` (B,), ``boxes`` (B, K, 4), ``scores``,
    ``labels`` (B, K), descending score) in :func:`multiclass_nms`'s form, with what ``params``
    can still do after the in-graph NMS: keep the rows scoring strictly above ``params.conf``
    (a ``conf`` at or below the file's changes nothing), of ``params.classes`` (the other classes
    still took their places among the file's K), the first ``params.max_dets``. ``iou`` and
    ``pre_nms_topk`` are the file's (:func:`check_end2end_options`). Host NumPy arrays."""
    scores = np.asarray(out["scores"], np.float32)
    boxes = np.asarray(out["boxes"], np.float32)
    labels = np.asarray(out["labels"]).astype(np.int32)
    rows = np.arange(scores.shape[1])
    keep = (rows[None] < np.asarray(out["num_dets"]).reshape(-1, 1)) & (scores > params.conf)
    if params.classes is not None:
        keep &= np.isin(labels, np.asarray(params.classes))
    order = np.argsort(~keep, axis=1, kind="stable")[:, :params.max_dets]  # kept rows first, in order
    num_dets = np.minimum(keep.sum(axis=1), params.max_dets).astype(np.int32)
    valid = np.arange(order.shape[1])[None] < num_dets[:, None]
    take = functools.partial(np.take_along_axis, indices=order, axis=1)
    return {"boxes": np.where(valid[..., None], np.take_along_axis(boxes, order[..., None], 1),
                              0).astype(np.float32),
            "scores": np.where(valid, take(scores), 0).astype(np.float32),
            "labels": np.where(valid, take(labels), -1).astype(np.int32), "num_dets": num_dets}


def end2end_params(backend, params: NmsParams) -> NmsParams:
    """``params`` as they act on ``backend``'s end-to-end file (``params`` itself for a raw one):
    its IoU threshold, ``conf`` at least its score threshold, ``max_dets`` at most its K."""
    e2e = getattr(backend, "end2end", None)
    if e2e is None:
        return params
    changes = {}
    if e2e.iou_thre is not None:
        changes["iou"] = float(e2e.iou_thre)
    if e2e.conf_thre is not None and params.conf < e2e.conf_thre:
        changes["conf"] = float(e2e.conf_thre)
    if e2e.topk is not None and params.max_dets > e2e.topk:
        changes["max_dets"] = int(e2e.topk)
    return dataclasses.replace(params, **changes)


def check_end2end_options(backend, where: str = "", flags: dict | None = None, **options) -> None:
    """A :class:`~damo_jax.errors.ConfigError` (prefixed by ``where``, naming the flag, the file
    and its value) for a given option (None = not given) that cannot act on ``backend``'s
    end-to-end file (nothing for a raw file): an ``iou`` other than its NMS's, a ``conf`` below its
    score threshold (those rows are not in the file's output), a ``max_dets`` above its K, any
    ``pre_nms_topk`` (its NMS has no candidate cap). ``flags``: the option's name in the message
    (default :data:`OPTION_FLAGS`, e.g. ``--iou``)."""
    from damo_jax.errors import ConfigError
    e2e = getattr(backend, "end2end", None)
    if e2e is None:
        return
    flags = {**OPTION_FLAGS, **(flags or {})}
    path = getattr(backend, "path", "the exported file")
    head = f"{path} is an --end2end export (NMS inside the graph: {e2e.describe()})"
    fix = ("re-export it with damo-jax export onnx --end2end {}, or use the raw export (without "
           "--end2end: damo_jax's NMS takes {})")
    for name, value in options.items():
        if value is None:
            continue
        flag = flags.get(name, name)
        if name == "iou" and (e2e.iou_thre is None or float(value) != e2e.iou_thre):
            why = (f"its IoU threshold is {e2e.iou_thre:g}" if e2e.iou_thre is not None
                   else "its IoU threshold is fixed in the graph")
            raise ConfigError(f"{where}{flag} {value:g}: {head}; {why} and {flag} cannot change it: "
                              + fix.format(f"--iou {value:g}", "--iou"))
        if name == "conf" and e2e.conf_thre is not None and float(value) < e2e.conf_thre:
            raise ConfigError(f"{where}{flag} {value:g}: {head}; it keeps scores above "
                              f"{e2e.conf_thre:g} only, a lower {flag} cannot add detections (a "
                              f"higher one filters them): " + fix.format(f"--conf {value:g}", "--conf"))
        if name == "max_dets" and e2e.topk is not None and int(value) > e2e.topk:
            raise ConfigError(f"{where}{flag} {value}: {head}; it returns at most {e2e.topk} "
                              f"detections per image (its topk), a larger {flag} cannot add any (a "
                              f"smaller one keeps the best): " + fix.format(f"--topk {value}", "--max-dets"))
        if name == "pre_nms_topk":
            raise ConfigError(f"{where}{flag} {value}: {head}; its NMS takes every candidate "
                              f"above its conf_thre (no pre-NMS cap), so {flag} would do nothing")


def rescale_detections(nms_out: dict, index: int, orig_hw, input_hw) -> dict:
    """Row ``index`` of a host NMS dict -> ``boxes`` (N, 4) float64 xyxy in original pixels,
    ``scores`` (N,) float64, ``labels`` (N,) int32 — N = ``num_dets``, descending score."""
    n = int(nms_out["num_dets"][index])
    return {"boxes": scale_boxes(nms_out["boxes"][index, :n], input_hw, orig_hw),
            "scores": np.asarray(nms_out["scores"][index, :n], np.float64),
            "labels": np.asarray(nms_out["labels"][index, :n]).astype(np.int32)}
