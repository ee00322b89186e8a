"""``Detector``: images in, detections out (boxes in original-image pixels), any backend.

    det = damo_jax.Detector.load("runs/s_demo")                          # training checkpoint
    det = damo_jax.Detector.load("s", weights="damoyolo_s.pth")            # official weights
    det = damo_jax.Detector.load("s", backend="onnx", model_path="s.onnx") # exported model
    result = det("photo.jpg")          # or a PIL image, an (H,W,3) uint8 RGB array, or a list

Pre-processing is the evaluation protocol (SPEC §9.4/§10.2): stretch-resize (cv2 bilinear) to the
network size, RGB 0–255 float32, no normalisation; post-processing is the same
:func:`damo_jax.ops.nms.multiclass_nms` as evaluation; boxes are mapped back with independent x / y
factors. Each result is a dict ``boxes`` (N,4) float32 x1y1x2y2, ``scores`` (N,), ``labels`` (N,)
int32 (0-based), ``class_names`` (N names), sorted by descending score.

Backend interface: a callable ``forward(images)`` with images (B,H,W,3) float32 RGB 0–255 NHWC
returning ``(scores (B,A,C), boxes (B,A,4))`` in network-input pixels (numpy or jax arrays).
Optional attributes: ``input_hw`` (fixed (H, W) of an exported model) and ``batch_size`` (fixed
batch of an exported model; None = any). :class:`JaxBackend` is the Flax model;
``damo_jax.inference.backends.OnnxBackend`` / ``OpenVinoBackend`` (export helper) wrap exported files.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from damo_jax.ops.nms import iou_threshold_f32, multiclass_nms

log = logging.getLogger("damo_jax.inference.detector")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


# --------------------------------------------------------------------------------- model loading

def load_jax_model(config=None, checkpoint=None, weights=None, *, fuse: bool = True):
    """``(cfg, model, variables, class_names)`` from a training checkpoint or official weights.

    ``checkpoint``: training-run directory (EMA weights, config and class names from its meta);
    ``weights``: official ``.pth`` / converted ``.npz`` for ``config``. ``fuse`` folds RepConvs and
    BatchNorms (``damo_jax.models.reparam.fuse`` + ``build_model(cfg, deploy=True)``; same outputs, faster).
    """
    from damo_jax.config import load_config
    from damo_jax.models import build_model

    if (checkpoint is None) == (weights is None):
        raise ValueError("load_jax_model: give exactly one of checkpoint= or weights=")
    if checkpoint is not None:
        from damo_jax.train.checkpoint import load_for_inference
        cfg, variables, class_names = load_for_inference(checkpoint)
        if config is not None:
            log.info("using the config stored in checkpoint %s (ignoring config %r)", checkpoint, config)
    else:
        if config is None:
            raise ValueError(f"official weights {weights}: a config is needed (e.g. --config s)")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights file {weights} not found")
        from damo_jax.interop.convert import from_torch_state_dict, read_state_dict_file
        cfg = load_config(config)
        state_dict = read_state_dict_file(weights)
        _check_weight_classes(state_dict, cfg, weights)
        variables = from_torch_state_dict(state_dict, cfg)
        class_names = tuple(cfg.model.class_names)
    if len(class_names) != int(cfg.model.head.num_classes):
        raise ValueError(f"{checkpoint or weights}: {len(class_names)} class names but the model "
                         f"has {cfg.model.head.num_classes} classes")
    if fuse:
        from damo_jax.models.reparam import fuse as fuse_variables
        variables = fuse_variables(variables, cfg, fuse_bn=True)
    return cfg, build_model(cfg, deploy=bool(fuse)), variables, tuple(class_names)


def _check_weight_classes(state_dict, cfg, weights) -> None:
    """Clear error when the weights' head predicts another number of classes than the config."""
    key = next((k for k in state_dict if k.removeprefix("module.") == "head.gfl_cls.0.bias"), None)
    if key is None:
        return  # the strict conversion reports the missing head keys
    found, expected = int(np.shape(state_dict[key])[0]), int(cfg.model.head.num_classes)
    legacy = bool(cfg.model.head.get("legacy", False))  # legacy heads have one extra channel
    if found != expected + legacy:
        raise ValueError(f"weights {weights} predict {found} classes but config {cfg.model.name!r} "
                         f"has model.head.num_classes = {expected}")


@functools.partial(jax.jit, static_argnames=("model",))
def _scores_and_boxes(model, variables, images):
    out = model.apply(variables, images, train=False)
    return out["scores"], out["boxes"]


class JaxBackend:
    """Backend of a Flax ``build_model`` module: jitted ``model.apply`` -> (scores, boxes).

    The jitted function is shared: equal models with same-shaped inputs reuse one compilation.
    """

    input_hw = None
    batch_size = None

    def __init__(self, model, variables):
        self.model = model
        self.variables = variables

    def __call__(self, images):
        return _scores_and_boxes(self.model, self.variables, images)


def make_backend(kind: str, model_path) -> Callable:
    """``damo_jax.inference.backends.OnnxBackend`` / ``OpenVinoBackend`` for an exported model file."""
    if not model_path:
        raise ValueError(f"backend {kind!r} needs model_path= (the exported .onnx / .xml file)")
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"backend {kind!r}: model file {model_path} not found")
    from damo_jax.inference import backends
    if kind == "onnx":
        return backends.OnnxBackend(str(model_path))
    if kind == "openvino":
        return backends.OpenVinoBackend(str(model_path))
    raise ValueError(f"unknown backend {kind!r} (known: jax, onnx, openvino)")


# ------------------------------------------------------------------------------- pre-processing

def read_image(path) -> np.ndarray:
    """(H,W,3) uint8 RGB of an image file, decoded like the datasets do (``data_pipelines.imageio``:
    EXIF orientation applied, alpha dropped, 16-bit / float images scaled)."""
    from damo_jax.data_pipelines.imageio import decode_image
    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} not found")
    return decode_image(str(path))


def to_rgb_array(image) -> np.ndarray:
    """Path / PIL image / (H,W[,1|3|4]) array -> (H,W,3) uint8 RGB."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
        raise ValueError(f"image array must be (H, W, 3) RGB (or gray / RGBA), got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float64)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def stretch_resize(image: np.ndarray, image_hw: Sequence[int]) -> np.ndarray:
    """Stretch (no letterbox) an (h,w,3) uint8 image to (H,W,3), cv2 bilinear (SPEC §9.4) --
    the very function ``data_pipelines.eval_batches`` uses, so predict == eval pre-processing."""
    from damo_jax.data_pipelines.augment.resize import stretch_resize as resize_with_boxes
    return resize_with_boxes(image, np.zeros((0, 4), np.float32), image_hw)[0]


# ------------------------------------------------------------------------------------- Detector

class Detector:
    """Callable detector; see the module docstring."""

    def __init__(self, backend: Callable, *, class_names: Sequence[str], image_size: Sequence[int],
                 conf: float = 0.05, iou: float = 0.7, max_dets: int = 500,
                 pre_nms_topk: int = 1000, batch_size: int = 8):
        image_size = tuple(int(v) for v in image_size)
        fixed = getattr(backend, "input_hw", None)
        if fixed is not None and tuple(fixed) != image_size:
            raise ValueError(f"Detector: the exported model takes {tuple(fixed)} inputs but "
                             f"image size {image_size} was requested")
        if image_size[0] % 32 or image_size[1] % 32:
            raise ValueError(f"Detector: image size {image_size} must be multiples of 32")
        self.backend = backend
        self.class_names = tuple(class_names)
        self.image_size = image_size
        self.conf, self.iou = float(conf), float(iou)
        self.max_dets, self.pre_nms_topk = int(max_dets), int(pre_nms_topk)
        self.batch_size = int(getattr(backend, "batch_size", None) or batch_size)
        self._fixed_batch = getattr(backend, "batch_size", None) is not None

    @classmethod
    def load(cls, path_or_config, *, weights=None, backend: str = "jax", model_path=None,
             conf=None, iou=None, img_size=None, max_dets=None, batch_size: int = 8) -> "Detector":
        """Build a detector.

        ``path_or_config``: a training checkpoint directory, or a config name / path / ConfigDict
        (then ``weights=`` official .pth/.npz for the jax backend, or ``model_path=`` for
        ``backend="onnx"`` / ``"openvino"``). ``conf`` / ``iou`` / ``img_size`` default to the
        config's ``test`` section (official 0.05 / 0.7, nano 0.03 / 0.65).
        """
        from damo_jax.config import load_config
        is_ckpt = isinstance(path_or_config, (str, os.PathLike)) and Path(path_or_config).is_dir()
        if isinstance(path_or_config, (str, os.PathLike)) and Path(path_or_config).suffix in (
                ".pth", ".pt", ".npz", ".onnx", ".xml"):
            raise ValueError(f"Detector.load({str(path_or_config)!r}): pass a config and the file as "
                             "weights= (.pth/.npz) or model_path= (.onnx/.xml)")
        if backend == "jax":
            if not is_ckpt and weights is None:
                raise ValueError(f"Detector.load({path_or_config!r}): not a checkpoint directory; "
                                 "give weights= (official .pth/.npz) or an exported model_path=")
            cfg, model, variables, class_names = load_jax_model(
                config=None if is_ckpt else path_or_config,
                checkpoint=path_or_config if is_ckpt else None, weights=weights)
            runner = JaxBackend(model, variables)
        else:
            if is_ckpt:
                from damo_jax.train.checkpoint import config_from_json, load_meta
                meta = load_meta(path_or_config)
                cfg = config_from_json(meta["config"])
                class_names = tuple(meta.get("class_names") or cfg.model.class_names)
            else:
                cfg = load_config(path_or_config)
                class_names = tuple(cfg.model.class_names)
            runner = make_backend(backend, model_path)
            exported = getattr(runner, "class_names", None)
            if exported and len(exported) != len(class_names):
                raise ValueError(f"{model_path} predicts {len(exported)} classes but the config "
                                 f"has {len(class_names)} class names")
            class_names = tuple(exported or class_names)
        test = cfg.test
        size = img_size or getattr(runner, "input_hw", None) or test.image_size
        return cls(runner, class_names=class_names, image_size=size,
                   conf=test.conf_thre if conf is None else conf,
                   iou=test.iou_thre if iou is None else iou,
                   max_dets=max_dets or test.max_dets, pre_nms_topk=test.pre_nms_topk,
                   batch_size=batch_size)

    def preprocess(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        """list of (h,w,3) uint8 -> ((B,H,W,3) float32 network input, (B,2) original (h, w))."""
        batch = np.stack([stretch_resize(im, self.image_size) for im in images]).astype(np.float32)
        sizes = np.array([im.shape[:2] for im in images], np.float64)
        return batch, sizes

    def _run_chunk(self, images: list, pad: bool) -> list[dict]:
        batch, sizes = self.preprocess(images)
        count = len(images)
        if pad and count < self.batch_size:  # static batch: no recompilation / exported batch
            batch = np.concatenate([batch, np.zeros((self.batch_size - count,) + batch.shape[1:],
                                                    np.float32)])
        scores, boxes = self.backend(batch)
        out = jax.device_get(multiclass_nms(
            scores, boxes, conf_thre=self.conf, iou_thre=iou_threshold_f32(self.iou),
            max_dets=self.max_dets, pre_nms_topk=self.pre_nms_topk))
        results = []
        in_h, in_w = self.image_size
        for b in range(count):
            n = int(out["num_dets"][b])
            scale = np.array([sizes[b, 1] / in_w, sizes[b, 0] / in_h] * 2, np.float64)
            labels = out["labels"][b, :n].astype(np.int32)
            results.append({
                "boxes": (out["boxes"][b, :n].astype(np.float64) * scale).astype(np.float32),
                "scores": out["scores"][b, :n].astype(np.float32),
                "labels": labels,
                "class_names": [self._name(int(c)) for c in labels],
            })
        return results

    def _name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def __call__(self, images, *, pad_to_batch: bool | None = None):
        """One image (path / PIL / (H,W,3) array) -> result dict; a list / tuple of images or a
        (B,H,W,3) array -> list of result dicts.

        ``pad_to_batch``: zero-pad short chunks to ``batch_size`` (one compiled shape); default
        only when more than one chunk is needed (always for fixed-batch exported models).
        """
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        single = not isinstance(images, (list, tuple))
        arrays = [to_rgb_array(im) for im in ([images] if single else images)]
        results = []
        pad = len(arrays) > self.batch_size if pad_to_batch is None else pad_to_batch
        pad = pad or self._fixed_batch
        for start in range(0, len(arrays), self.batch_size):
            results.extend(self._run_chunk(arrays[start:start + self.batch_size], pad))
        return results[0] if single else results
