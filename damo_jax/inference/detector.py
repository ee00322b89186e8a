"""``Detector``: images in, detections out (boxes in original-image pixels), any backend.

    det = damo_jax.Detector.load("runs/s_demo")                          # training checkpoint
    det = damo_jax.Detector.load("s", weights="damoyolo_s.pth")            # official weights
    det = damo_jax.Detector.load("s.onnx")                                # exported model (its metadata)
    result = det("photo.jpg")          # or a PIL image, an (H,W,3) uint8 RGB array, or a list

Image inputs: a path (decoded like the datasets: EXIF orientation applied), a PIL image (EXIF
orientation applied too), or an RGB array — uint8 as is; other integer arrays are 8-bit values
when their maximum is <= 255, else 16-bit (``/ 257``); float arrays 0..1 (maximum <= 1.5: a resized
0..1 image overshoots 1) or 0..255. OpenCV arrays are BGR: pass ``bgr=True`` (``det(frame, bgr=True)``;
arrays only, their first three channels reversed) or convert them first (``cv2.cvtColor``).
Lists are padded to 1, 2, 4, ... ``batch_size`` images (few compiled shapes; ``__call__``).
``conf`` / ``iou`` must be in [0, 1], ``max_dets`` / ``pre_nms_topk`` / ``batch_size`` >= 1
(a ``ConfigError``, a ``ValueError``, when the detector is built).
``classes=`` (class names and / or 0-based indices) keeps only those classes: the others' scores
are zeroed before NMS, so they never take a ``max_dets`` place (``resolve_classes``).

End-to-end files (``damo-jax export onnx --end2end``, NMS inside the graph, and their OpenVINO
IRs) run their own NMS instead of damo_jax's; the rest is the same (boxes mapped back to the
original pixels, result dicts). Their ``iou`` and K are the file's: ``conf`` above the file's
score threshold and ``max_dets`` up to its K filter its rows (``classes=`` too, after its NMS), and
``Detector.load`` refuses an ``iou`` other than the file's, a lower ``conf`` or a larger
``max_dets`` (:func:`damo_jax.inference.pipeline.check_end2end_options`).

Loading is :func:`damo_jax.inference.loading.load_model`; pre-processing, forward, NMS and the
mapping back to original pixels are :mod:`damo_jax.inference.pipeline` (the evaluation protocol,
SPEC §9.4/§10.2: stretch-resize, RGB 0–255 float32, no normalisation; independent x / y factors).
Each result is a dict ``boxes`` (N,4) float32 x1y1x2y2, ``scores`` (N,), ``labels`` (N,) int32
(0-based), ``class_names`` (N names), sorted by descending score.

Backend interface: see :mod:`damo_jax.inference.pipeline` (``forward(images)`` NHWC float32 ->
``(scores, boxes)``, optional ``input_hw`` / ``batch_size``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from damo_jax.config import PRE_NMS_TOPK
from damo_jax.errors import ConfigError, InputPathError
from damo_jax.inference.pipeline import (JaxBackend, NmsParams, check_detection_options,
                                         check_end2end_options, detect, end2end_params, pad_batch,
                                         preprocess, rescale_detections, stretch_resize)
from damo_jax.ops.boxes import check_image_size

log = logging.getLogger("damo_jax.inference.detector")

#: ``Detector.load(path)`` of an exported file: the backend its suffix implies (``backend=`` may
#: name the other one: OpenVINO reads .onnx files too)
EXPORTED_SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}

__all__ = ["Detector", "JaxBackend", "bgr_to_rgb", "read_image", "to_rgb_array", "stretch_resize"]


# ------------------------------------------------------------------------------- images in

def read_image(path) -> np.ndarray:
    """(H,W,3) uint8 RGB of an image file, decoded like the datasets do (``data_pipelines.imageio``:
    EXIF orientation applied, alpha dropped, 16-bit / float images scaled)."""
    from damo_jax.data_pipelines.imageio import decode_image
    if Path(path).is_dir():
        raise InputPathError(f"image {path} is a folder: give its image files (damo-jax predict "
                             f"--source takes folders)")
    if not Path(path).is_file():
        raise InputPathError(f"image {path} not found")
    return decode_image(str(path))


def to_rgb_array(image) -> np.ndarray:
    """Path / PIL image / array -> (H,W,3) uint8 RGB (arrays and 16-bit / float PIL modes through
    the one converter :func:`damo_jax.inference.images.to_rgb_uint8`).

    A PIL image gets its EXIF orientation applied (like a path). Integer arrays other than uint8
    are 8-bit values when their maximum is <= 255, else 16-bit (``/ 257``); the 16-bit PIL modes
    (``I;16``, ``I``) of a decoded file are always 16-bit."""
    from damo_jax.inference.images import to_rgb_uint8
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        from PIL import ImageOps
        image = ImageOps.exif_transpose(image) or image
        if image.mode.startswith("I") or image.mode == "F":
            return to_rgb_uint8(np.asarray(image))
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if not hasattr(image, "__array__") or isinstance(image, (bytes, str)):
        raise TypeError(f"image: expected a file path, a PIL image or an (H, W, 3) array, got "
                        f"{type(image).__name__}")
    return to_rgb_uint8(image, small_ints_are_8bit=True)


def bgr_to_rgb(image):
    """An OpenCV-style BGR / BGRA / gray array (or a list of them, or a (B, H, W, C) batch) with its
    first three channels reversed, as RGB / RGBA; gray images unchanged. Paths and PIL images are
    refused (a ``ConfigError``): they decode as RGB already."""
    if isinstance(image, (list, tuple)):
        return [bgr_to_rgb(im) for im in image]
    if not hasattr(image, "__array__") or (hasattr(image, "convert") and hasattr(image, "size")):
        raise ConfigError(f"bgr=True applies to image arrays (OpenCV frames); a {type(image).__name__} "
                          f"is decoded as RGB already")
    arr = np.asarray(image)
    if arr.ndim >= 3 and arr.shape[-1] in (3, 4):
        arr = np.concatenate([arr[..., 2::-1], arr[..., 3:]], axis=-1)
    return arr


def _batch_to_rgb(batch: np.ndarray) -> list[np.ndarray]:
    """(B, H, W, C) array -> B (H, W, 3) uint8 images, with ONE value-range decision for the whole
    batch (:func:`to_rgb_array`'s rules applied to the batch as one image: a dark float image in a
    0..255 batch is not rescaled as if it were 0..1)."""
    b, h, w = batch.shape[:3]
    if b == 0:
        return []
    tall = to_rgb_array(batch.reshape((b * h,) + batch.shape[2:]))
    return list(tall.reshape(b, h, w, 3))


# ------------------------------------------------------------------------------------- Detector

def resolve_classes(classes, class_names: Sequence[str], flag: str = "classes=") -> tuple | None:
    """The labels a ``classes`` filter keeps: None (all), or class names and / or 0-based indices
    (ints or digit strings, as ``--classes 0 person``) -> sorted tuple of indices; a
    :class:`ConfigError` naming the unknown ones and the model's classes."""
    if classes is None:
        return None
    if isinstance(classes, (str, int)):
        classes = [classes]
    index = {name: i for i, name in enumerate(class_names)}
    kept, unknown = set(), []
    for c in classes:
        if isinstance(c, str) and c in index:
            kept.add(index[c])
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < len(class_names):
            kept.add(int(c))
        elif isinstance(c, str) and c.strip().isdigit() and int(c) < len(class_names):
            kept.add(int(c))
        else:
            unknown.append(c)
    if unknown or not kept:
        shown = ", ".join(f"{i} {n}" for i, n in enumerate(class_names[:12])) + (
            f", … ({len(class_names)} in all)" if len(class_names) > 12 else "")
        raise ConfigError(f"{flag}{' '.join(map(str, unknown or classes))}: "
                          f"{'not a class' if unknown else 'no class'} of this model (its classes: {shown})")
    return tuple(sorted(kept))


class Detector:
    """Callable detector; see the module docstring."""

    def __init__(self, backend: Callable, *, class_names: Sequence[str], image_size: Sequence[int],
                 conf: float = 0.05, iou: float = 0.7, max_dets: int = 500,
                 pre_nms_topk: int = PRE_NMS_TOPK, batch_size: int = 8, classes=None):
        check_detection_options("Detector: ", conf=conf, iou=iou, max_dets=max_dets,
                                pre_nms_topk=pre_nms_topk, batch_size=batch_size)
        image_size = tuple(int(v) for v in image_size)
        fixed = getattr(backend, "input_hw", None)
        if fixed is not None and tuple(fixed) != image_size:
            raise ConfigError(f"Detector: the exported model takes {tuple(fixed)} inputs but "
                              f"image size {image_size} was requested (--img-size)")
        self.image_size = check_image_size(image_size, "Detector: image size (--img-size)")
        self.backend = backend
        self.class_names = tuple(class_names)
        self.params = end2end_params(backend, NmsParams(   # an --end2end file: its NMS's values
            conf=float(conf), iou=float(iou), max_dets=int(max_dets), pre_nms_topk=int(pre_nms_topk),
            classes=resolve_classes(classes, self.class_names)))
        self.batch_size = int(getattr(backend, "batch_size", None) or batch_size)
        self._fixed_batch = getattr(backend, "batch_size", None) is not None

    @property
    def conf(self) -> float:
        return self.params.conf

    @property
    def iou(self) -> float:
        return self.params.iou

    @classmethod
    def from_loaded(cls, loaded, *, conf=None, iou=None, img_size=None, max_dets=None,
                    batch_size: int = 8, classes=None) -> "Detector":
        """Detector of a :class:`~damo_jax.inference.loading.LoadedModel`; thresholds and size
        default to its config's ``test`` section (official 0.05 / 0.7, nano 0.03 / 0.65)."""
        from damo_jax.inference.pipeline import nms_params
        test = loaded.cfg.test
        params = nms_params(test, conf=conf, iou=iou, max_dets=max_dets)
        if img_size is not None:
            img_size = check_image_size(img_size, "Detector: img_size")
        size = img_size or loaded.input_hw or test.image_size
        size = (size, size) if isinstance(size, int) else size
        return cls(loaded.backend, class_names=loaded.class_names, image_size=size,
                   conf=params.conf, iou=params.iou, max_dets=params.max_dets,
                   pre_nms_topk=params.pre_nms_topk, batch_size=batch_size, classes=classes)

    @classmethod
    def load(cls, path_or_config, *, weights=None, backend: str = "jax", model_path=None,
             conf=None, iou=None, img_size=None, max_dets=None, batch_size: int = 8,
             classes=None) -> "Detector":
        """Build a detector (:func:`damo_jax.inference.loading.load_model`).

        ``path_or_config``: a training checkpoint directory; an exported ``.onnx`` / ``.xml`` file
        (model, class names, size and thresholds from its export metadata; onnxruntime for
        ``.onnx``, OpenVINO for ``.xml`` or ``backend="openvino"``); or a config name / path /
        ConfigDict (then ``weights=`` official .pth/.npz for the jax backend, or ``model_path=``
        for ``backend="onnx"`` / ``"openvino"``: a file without export metadata).
        """
        from damo_jax.inference.loading import load_model
        check_detection_options("Detector.load: ", conf=conf, iou=iou, max_dets=max_dets,
                                batch_size=batch_size)       # before anything is loaded
        suffix = (Path(path_or_config).suffix.lower()
                  if isinstance(path_or_config, (str, os.PathLike)) else "")
        if suffix in (".pth", ".pt", ".npz"):
            raise ConfigError(f"Detector.load({str(path_or_config)!r}): pass the model's config "
                              f"and the file as weights= (Detector.load('s', weights=...))")
        if suffix in EXPORTED_SUFFIXES:        # an exported file: its metadata names the classes
            if model_path is not None or weights is not None:
                raise ConfigError(f"Detector.load({str(path_or_config)!r}): an exported file brings "
                                  f"its own weights; model_path= / weights= go with a config name")
            if backend == "jax":
                backend = EXPORTED_SUFFIXES[suffix]
            path_or_config, model_path = None, path_or_config
        is_path = isinstance(path_or_config, (str, os.PathLike))  # (None: an exported file's metadata)
        is_run = is_path and Path(path_or_config).is_dir()
        if is_path and not is_run:
            from damo_jax.config import MODEL_NAMES, load_config
            text = str(path_or_config)
            if (os.sep in text or text.endswith(".py")) and not Path(text).exists():
                raise InputPathError(f"Detector.load({text!r}): no such run directory or config file")
            if text not in MODEL_NAMES:
                load_config(text)          # an unknown name: an error listing the known ones
        if backend == "jax" and model_path is not None:
            raise ConfigError("Detector.load: model_path= is read by backend='onnx' or 'openvino'")
        if backend != "jax" and weights is not None:
            raise ConfigError(f"Detector.load: weights= is read by backend='jax', not {backend!r}")
        if is_run and weights is not None:
            raise ConfigError(f"Detector.load({str(path_or_config)!r}): a run directory brings its "
                              f"own weights; weights= goes with a config name")
        if backend == "jax":
            if not is_run and weights is None:
                raise ConfigError(f"Detector.load({path_or_config!r}): not a checkpoint directory; "
                                  "give weights= (official .pth/.npz) or an exported model_path=")
            loaded = (load_model(checkpoint=path_or_config) if is_run
                      else load_model(path_or_config, weights=weights))
        elif backend in ("onnx", "openvino"):
            if not model_path:
                raise ConfigError(f"backend {backend!r} needs model_path= (the exported .onnx / .xml)")
            loaded = load_model(path_or_config, **{backend: model_path})
        else:
            raise ConfigError(f"unknown backend {backend!r} (known: jax, onnx, openvino)")
        check_end2end_options(loaded.backend, "Detector.load: ", conf=conf, iou=iou,
                              max_dets=max_dets)
        return cls.from_loaded(loaded, conf=conf, iou=iou, img_size=img_size, max_dets=max_dets,
                               batch_size=batch_size, classes=classes)

    def preprocess(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        """list of (h,w,3) uint8 -> ((B,H,W,3) float32 network input, (B,2) original (h, w))."""
        batch, sizes = preprocess(images, self.image_size)
        return batch.astype(np.float32), sizes

    def _run_chunk(self, images: list, pad: int) -> list[dict]:
        """``pad``: zero-pad the batch to this many images (0: as it is)."""
        batch, sizes = preprocess(images, self.image_size)
        if pad > len(images):  # a static batch: no recompilation / the exported batch
            batch = pad_batch(batch, pad)
        out = jax.device_get(detect(self.backend, batch, self.params))
        results = []
        for b in range(len(images)):
            det = rescale_detections(out, b, sizes[b], self.image_size)
            results.append({"boxes": det["boxes"].astype(np.float32),
                            "scores": det["scores"].astype(np.float32), "labels": det["labels"],
                            "class_names": [self._name(int(c)) for c in det["labels"]]})
        return results

    def _name(self, label: int) -> str:
        if 0 <= label < len(self.class_names):
            return self.class_names[label]
        if not getattr(self, "_warned_unnamed", False):      # a hand-built Detector's short list
            log.warning("Detector: label %d has no class name (class_names has %d); such labels "
                        "are named by their number", label, len(self.class_names))
            self._warned_unnamed = True
        return str(label)

    def __call__(self, images, *, pad_to_batch: bool | None = None, bgr: bool = False):
        """One image (path / PIL / (H,W,3) array) -> result dict; a list / tuple of images or a
        (B,H,W,3) array -> list of result dicts.

        ``bgr``: the arrays are OpenCV's BGR (or BGRA) order (:func:`bgr_to_rgb`; arrays only).

        ``pad_to_batch``: True: zero-pad short chunks to ``batch_size`` (one compiled shape);
        False: run each chunk at its own size (a compilation per new size); None (default): pad to
        ``batch_size`` when more than one chunk is needed, else to the next power of two (at most
        log2(batch_size) + 1 compiled shapes for lists of any length, at most 2x the work).
        Fixed-batch exported models are always padded to their batch.
        """
        if bgr:
            images = bgr_to_rgb(images)
        if hasattr(images, "__array__") and getattr(images, "ndim", None) == 4:   # numpy, JAX, ...
            arrays = _batch_to_rgb(np.asarray(images))
            single = False
        else:
            single = not isinstance(images, (list, tuple))
            arrays = [to_rgb_array(im) for im in ([images] if single else images)]
        results = []
        full = pad_to_batch or self._fixed_batch or (pad_to_batch is None and len(arrays) > self.batch_size)
        for start in range(0, len(arrays), self.batch_size):
            chunk = arrays[start:start + self.batch_size]
            pad = (self.batch_size if full else 0 if pad_to_batch is False
                   else min(self.batch_size, 1 << (len(chunk) - 1).bit_length()))
            results.extend(self._run_chunk(chunk, pad))
        return results[0] if single else results

    def tiled(self, image, *, tile: int, overlap: float = 0.2, full_image: bool = False,
              bgr: bool = False) -> dict:
        """One large image by ``tile``-pixel windows overlapping by ``overlap`` (batched through
        this detector, merged by class-aware NMS in original pixels; ``full_image`` adds a
        whole-image pass): :func:`damo_jax.inference.tiling.detect_tiled`. Same result dict.
        ``bgr``: as for ``__call__``."""
        from damo_jax.inference.tiling import detect_tiled
        if bgr:
            image = bgr_to_rgb(image)
        return detect_tiled(self, image, tile=tile, overlap=overlap, full_image=full_image)

    def video(self, path, *, tile: int | None = None, overlap: float = 0.2,
              full_image: bool = False):
        """Every frame of the video file ``path`` (what OpenCV decodes), in order: yields
        ``(frame, result)`` with the (H, W, 3) uint8 RGB frame and its result dict (boxes in
        frame pixels, unclipped like ``__call__``). Frames go through in batches of
        ``batch_size``, padded to it (one compiled shape); ``tile``: tiled inference per frame.
        :func:`damo_jax.inference.video.iter_detections`; ``damo-jax predict --source clip.mp4``
        draws them into a video."""
        from damo_jax.inference.video import VideoReader, iter_detections
        tiling = (None if tile is None else
                  {"tile": tile, "overlap": overlap, "full_image": full_image})
        with VideoReader(path) as reader:
            yield from iter_detections(self, reader, tile=tiling)
