"""Runtimes for exported models, with the interface ``damo_jax.inference.detector.Detector`` expects.

A backend is a callable ``forward(images)``: images (B, H, W, 3) float32 RGB 0-255 **NHWC** (the
library's layout) -> ``(scores (B, A, C), boxes (B, A, 4))`` numpy float32, boxes x1y1x2y2 in network
input pixels. The exported files take NCHW; the transpose happens here. Attributes:

* ``input_hw``   — (H, W) the file was exported for (exported graphs have a fixed size);
* ``batch_size`` — the file's static batch, or ``None`` for a dynamic-batch export. A static-batch
  file still accepts any B here: the batch is split / zero-padded to the file's batch.
* ``class_names`` — from the export metadata (``None`` if absent);
* ``num_classes`` — the static last dimension of the ``scores`` output (``None`` if dynamic);
* ``metadata`` — the export metadata (``{}`` if absent).

Files whose input height / width are not fixed (another tool's dynamic-axes export), or whose
outputs are neither ``scores`` / ``boxes`` nor an end-to-end export's (official DAMO-YOLO exports)
are refused with one :class:`ExportedModelError` naming the flag and the file.

``OnnxBackend(path, *, threads=None)`` runs onnxruntime (CPU; CUDA/TensorRT providers when
available and asked for); ``OpenVinoBackend(path, *, precision="f32")`` runs an OpenVINO IR
(``.xml``) or ONNX file. ``precision="f32"`` sets ``INFERENCE_PRECISION_HINT=f32`` — on CPUs with
AMX/AVX512-BF16 OpenVINO's default is bf16 (errors ~1e-2); ``"auto"`` keeps the device default.
End-to-end files (``damo-jax export onnx --end2end``, and the OpenVINO IRs converted from them:
outputs ``num_dets`` / ``boxes`` / ``scores`` / ``labels``, NMS inside the graph) are read too: their
``end2end`` attribute is an :class:`End2EndInfo` (the in-graph NMS's ``topk`` / ``conf_thre`` /
``iou_thre``; ``None`` for a raw file) and ``forward(images)`` returns the in-graph NMS result as
the dict :func:`damo_jax.ops.nms.multiclass_nms` returns (``num_dets`` (B,) int32, ``boxes``
(B, K, 4) network-input pixels, ``scores`` (B, K), ``labels`` (B, K) int32), which
:func:`damo_jax.inference.pipeline.detect` passes on instead of running damo_jax's NMS.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from damo_jax.errors import InputPathError, UserError
from damo_jax.inference.pipeline import pad_batch

RAW_OUTPUTS = ("scores", "boxes")


@dataclasses.dataclass(frozen=True)
class End2EndInfo:
    """The NMS inside an ``--end2end`` file: ``topk`` K (rows per image), ``conf_thre`` (keeps
    scores strictly above), ``iou_thre`` (suppresses IoU above); ``None`` where unknown."""
    topk: int | None
    conf_thre: float | None
    iou_thre: float | None

    def describe(self) -> str:
        """``"topk 100, conf_thre 0.05, iou_thre 0.7"`` (``?`` for an unknown value)."""
        return ", ".join(f"{k} {'?' if v is None else format(v, 'g')}"
                         for k, v in dataclasses.asdict(self).items())


def e2e_outputs() -> tuple:
    """The outputs of an ``--end2end`` export, in order (``export/end2end.py``: ``E2E_OUTPUTS``)."""
    from damo_jax.export.end2end import E2E_OUTPUTS
    return E2E_OUTPUTS


def is_end2end(names) -> bool:
    """Whether output ``names`` are an ``--end2end`` export's."""
    return "num_dets" in names and sorted(names) == sorted(e2e_outputs())


def import_openvino():
    """``import openvino``, without OpenVINO's usage telemetry (every import of the package, and
    nncf, otherwise post usage statistics to Google Analytics from a process they ``fork()``:
    network traffic the user did not ask for, and a fork of JAX's multithreaded process, which
    Python warns may deadlock). OpenVINO and nncf fall back to their built-in no-op stubs when
    ``openvino_telemetry`` cannot be imported; a process that imported it before keeps it."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)      # None: ``import`` raises ImportError
    import openvino
    return openvino


class ExportedModelError(UserError, ValueError):
    """An exported file that is not a raw-output damo_jax model (wrong suffix, outputs, input)."""


#: the file suffixes each exported-model backend reads
SUFFIXES = {"onnx": (".onnx",), "openvino": (".xml", ".onnx")}


def check_file(path, suffixes, flag: str = "exported model") -> Path:
    """``path`` as a Path: InputPathError when it is missing, ExportedModelError for a suffix not
    in ``suffixes``."""
    p = Path(path)
    if not p.is_file():
        raise InputPathError(f"{flag} {p} not found")
    if p.suffix.lower() not in suffixes:
        raise ExportedModelError(f"{flag} {p}: expected a {'/'.join(suffixes)} file"
                                 + (" (the .xml of an OpenVINO IR; its .bin sits next to it)"
                                    if p.suffix.lower() == ".bin" else ""))
    return p


def runtime_error_reason(err: BaseException) -> str:
    """The informative part of a runtime's (multi-line) error message, one short line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    keep = [line for line in lines if not line.startswith(("Exception from src", "Check '"))]
    text = " ".join(keep or lines) or type(err).__name__
    text = text.replace("[ONNXRuntimeError] : ", "")
    return text if len(text) <= 300 else text[:297] + "..."


def onnxruntime_errors() -> tuple[type, ...]:
    """onnxruntime's load errors (pybind classes, not RuntimeError subclasses)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state
    names = ("Fail", "InvalidProtobuf", "InvalidGraph", "InvalidArgument", "NoSuchFile", "NoModel",
             "NotImplemented", "RuntimeException", "EPFail")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type)) + (
        RuntimeError,)


#: what to do with a file whose outputs are not a damo_jax export's (official ONNX exports: outputs
#: ``output`` and an auto-generated name)
NOT_AN_EXPORT_HINT = ("; not a damo_jax export (official DAMO-YOLO ONNX exports are not read: export "
                      "the official .pth with damo_jax instead: damo-jax export onnx --config NAME "
                      "--weights FILE.pth --output FILE.onnx; damo-jax info --weights FILE.pth names "
                      "its config)")


def _check_outputs(path, names, flag: str = "exported model", *, end2end_ok: bool = False) -> None:
    """ExportedModelError unless ``names`` are a raw export's outputs (or, with ``end2end_ok``, an
    ``--end2end`` export's: what the backends read)."""
    if end2end_ok and is_end2end(names):
        return
    if sorted(names) != sorted(RAW_OUTPUTS):
        hint = (" — an --end2end export (NMS inside the graph); this needs the raw export: export "
                "without --end2end" if "num_dets" in names else NOT_AN_EXPORT_HINT)
        raise ExportedModelError(f"{flag} {path}: outputs {list(names)}, expected "
                                 f"{list(RAW_OUTPUTS)}{hint}")


def _input_geometry(dims, path, flag: str) -> tuple:
    """``(batch or None, (H, W))`` of an input shape ``(N, 3, H, W)`` (``dims``: ints, None or names
    for dynamic dimensions; None for an unknown rank). ExportedModelError for another rank, channel
    count or a dynamic height / width: the pre-processing resizes to the file's one input size."""
    dims = None if dims is None else list(dims)
    shown = ("of unknown rank" if dims is None else
             "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")")
    if dims is None or len(dims) != 4 or _static_dim(dims[1]) not in (None, 3):
        raise ExportedModelError(f"{flag} {path}: input shape {shown}, expected (N, 3, H, W) "
                                 f"(NCHW RGB images)")
    h, w = _static_dim(dims[2]), _static_dim(dims[3])
    if h is None or w is None:
        raise ExportedModelError(f"{flag} {path}: the input height / width are not fixed (input "
                                 f"shape {shown}); damo_jax reads exported files with a fixed input "
                                 f"size: export one file per size (damo-jax export onnx --img-size H W)")
    return _static_dim(dims[0]), (h, w)


def _static_dim(d):
    return d if isinstance(d, int) and d > 0 else None


def _class_names(meta: dict):
    text = meta.get("class_names")
    return tuple(json.loads(text)) if text else None


class _Backend:
    """Shared NHWC -> NCHW handling and batch splitting/padding for fixed-batch files."""
    input_hw: tuple
    batch_size: int | None
    class_names: tuple | None

    end2end: End2EndInfo | None = None

    def _run(self, images_nchw: np.ndarray) -> tuple:
        """The outputs of one batch: ``(scores, boxes)``, or :func:`e2e_outputs` of an end2end file."""
        raise NotImplementedError

    def __call__(self, images):
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{type(self).__name__}: images must be (B, H, W, 3) NHWC, "
                             f"got {images.shape}")
        if tuple(images.shape[1:3]) != tuple(self.input_hw):
            raise ValueError(f"{type(self).__name__}: the model was exported for "
                             f"{tuple(self.input_hw)} inputs, got {tuple(images.shape[1:3])}")
        nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        fixed = self.batch_size
        if fixed is None or len(nchw) == fixed:
            outputs = self._run(nchw)
        else:
            parts = []
            for start in range(0, len(nchw), fixed):
                chunk = nchw[start:start + fixed]
                parts.append([o[:len(chunk)] for o in self._run(pad_batch(chunk, fixed))])
            outputs = tuple(np.concatenate(column) for column in zip(*parts))
        if self.end2end is None:
            return outputs
        num_dets, boxes, scores, labels = outputs
        return {"num_dets": np.asarray(num_dets).reshape(-1).astype(np.int32),
                "boxes": np.asarray(boxes, np.float32), "scores": np.asarray(scores, np.float32),
                "labels": np.asarray(labels).astype(np.int32)}

    def _setup_end2end(self, names, boxes_dims) -> None:
        """``end2end`` of a file with outputs ``names`` (``boxes_dims``: its boxes output's
        shape, None entries dynamic): the metadata's ``end2end`` entry (``topk=..,conf_thre=..,
        iou_thre=..``), else what the graph says (K from the boxes shape; an ONNX file's NMS
        constants)."""
        self.outputs = e2e_outputs() if is_end2end(names) else RAW_OUTPUTS
        if self.outputs is RAW_OUTPUTS:
            return
        found = _end2end_from_metadata(self.metadata.get("end2end"))
        if self.path.suffix.lower() == ".onnx" and len(found) < 3:   # the graph is read only then
            found = {**_end2end_from_onnx_graph(self.path), **found}
        if found.get("topk") is None and boxes_dims and len(boxes_dims) == 3:
            found["topk"] = _static_dim(boxes_dims[1])
        self.end2end = End2EndInfo(topk=found.get("topk"), conf_thre=found.get("conf_thre"),
                                   iou_thre=found.get("iou_thre"))


def _end2end_from_metadata(text) -> dict:
    """``{"topk": int, "conf_thre": float, "iou_thre": float}`` (those present) of the export
    metadata's ``end2end`` entry ``topk=100,conf_thre=0.05,iou_thre=0.7``."""
    out = {}
    for item in str(text or "").split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        try:
            if key == "topk":
                out[key] = int(value)
            elif key in ("conf_thre", "iou_thre"):
                out[key] = float(value)
        except ValueError:
            continue
    return out


def _end2end_from_onnx_graph(path: Path) -> dict:
    """The NMS constants ``export/end2end.py`` writes (initializers ``e2e_max_per_class``,
    ``e2e_conf_thre``, ``e2e_iou_thre``) of an ONNX file without the metadata entry."""
    import onnx
    from onnx import numpy_helper
    names = {"e2e_max_per_class": ("topk", int), "e2e_conf_thre": ("conf_thre", float),
             "e2e_iou_thre": ("iou_thre", float)}
    out = {}
    for init in onnx.load(str(path), load_external_data=False).graph.initializer:
        if init.name in names:
            key, kind = names[init.name]
            value = numpy_helper.to_array(init).reshape(-1)
            if value.size == 1:            # float32 0.7 -> 0.7 (its shortest repr), not 0.69999999
                out[key] = kind(str(value[0]))
    return out


class OnnxBackend(_Backend):
    """onnxruntime session of a raw-output ONNX export."""

    def __init__(self, path, *, threads: int | None = None, providers=None, flag: str = "--onnx"):
        import onnxruntime as ort

        self.path = check_file(path, SUFFIXES["onnx"], flag)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts,
                                                providers=providers or ["CPUExecutionProvider"])
        except onnxruntime_errors() as e:     # random bytes, a truncated file, a broken graph
            raise ExportedModelError(f"{flag} {self.path}: cannot be read as an ONNX model "
                                     f"({runtime_error_reason(e)})") from e
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ExportedModelError(f"{flag} {self.path}: expected one input 'images', got "
                                     f"{[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        outputs = self.session.get_outputs()
        self.output_names = [o.name for o in outputs]
        _check_outputs(self.path, self.output_names, flag, end2end_ok=True)
        self.batch_size, self.input_hw = _input_geometry(inputs[0].shape, self.path, flag)
        shapes = dict((o.name, o.shape) for o in outputs)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.class_names = _class_names(meta)
        self._setup_end2end(self.output_names, shapes["boxes"])
        scores = shapes["scores"]           # an end2end file's scores (N, K) hold no class count
        self.num_classes = (_static_dim(scores[-1]) if scores and self.end2end is None else None)

    def _run(self, images_nchw):
        return tuple(self.session.run(list(self.outputs), {self.input_name: images_nchw}))


class OpenVinoBackend(_Backend):
    """OpenVINO compiled model (CPU by default) of an IR ``.xml`` or ONNX file."""

    def __init__(self, path, *, precision: str = "f32", device: str = "CPU",
                 threads: int | None = None, flag: str = "--openvino"):
        if precision not in ("f32", "auto"):
            raise ValueError(f"OpenVinoBackend precision must be 'f32' or 'auto', got {precision!r}")
        core, model = read_openvino_model(path, flag)
        self.path = Path(path)
        kind = _openvino_kind(self.path)
        names = [o.get_any_name() for o in model.outputs]
        _check_outputs(self.path, names, flag, end2end_ok=True)
        if len(model.inputs) != 1:
            raise ExportedModelError(f"{flag} {self.path}: expected one input 'images', got "
                                     f"{[i.get_any_name() for i in model.inputs]}")
        self.batch_size, self.input_hw = _input_geometry(
            _partial_dims(model.inputs[0].get_partial_shape()), self.path, flag)
        self.metadata = _ov_metadata(model, self.path)
        self.class_names = _class_names(self.metadata)
        self._setup_end2end(names, _partial_dims(model.outputs[names.index("boxes")].get_partial_shape()))
        scores = _partial_dims(model.outputs[names.index("scores")].get_partial_shape())
        self.num_classes = (_static_dim(scores[-1]) if scores and self.end2end is None else None)
        config = {}
        if precision == "f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, device, config)
        except RuntimeError as e:              # e.g. a .bin that does not belong to the .xml
            raise ExportedModelError(f"{flag} {self.path}: cannot be compiled as {kind} model "
                                     f"({runtime_error_reason(e)})") from e
        self.request = self.compiled.create_infer_request()
        self._outputs = {name: self.compiled.output(name) for name in names}

    def _run(self, images_nchw):
        result = self.request.infer({0: images_nchw})
        return tuple(np.asarray(result[self._outputs[name]]) for name in self.outputs)


def _openvino_kind(path: Path) -> str:
    return "an ONNX" if path.suffix.lower() == ".onnx" else "an OpenVINO IR"


def read_openvino_model(path, flag: str = "--openvino"):
    """``(ov.Core(), ov.Model)`` of an IR ``.xml`` (with the ``.bin`` next to it) or an ONNX file,
    not compiled: InputPathError for a missing file / ``.bin``, ExportedModelError naming ``flag``,
    the file and OpenVINO's reason for one that cannot be read (not XML, a truncated ``.xml`` or
    ``.bin``, the ``.bin`` of another IR)."""
    ov = import_openvino()
    path = check_file(path, SUFFIXES["openvino"], flag)
    weights = path.with_suffix(".bin")
    if path.suffix.lower() == ".xml" and not weights.is_file():
        raise InputPathError(f"{flag} {path}: its weights file {weights.name} is missing "
                             f"(an OpenVINO IR is the .xml and the .bin next to it)")
    core = ov.Core()
    try:
        return core, core.read_model(str(path))
    except RuntimeError as e:              # not XML / not an IR / a truncated .bin
        raise ExportedModelError(f"{flag} {path}: cannot be read as {_openvino_kind(path)} model "
                                 f"({runtime_error_reason(e)})") from e


def _partial_dims(shape):
    """An OpenVINO PartialShape as a list (None for a dynamic dimension), or None (dynamic rank)."""
    if shape.rank.is_dynamic:
        return None
    return [d.get_length() if d.is_static else None for d in shape]


def _ov_metadata(model, path: Path) -> dict:
    """Export metadata: rt_info ``damo_jax/<key>`` of an IR written by ``export/to_openvino.py``,
    or the ``metadata_props`` of an ONNX file."""
    if path.suffix.lower() == ".onnx":
        import onnx
        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}
    if not model.has_rt_info(["damo_jax"]):
        return {}
    section = model.get_rt_info()["damo_jax"]
    return {str(k): v.astype(str) if hasattr(v, "astype") else str(v) for k, v in section.items()}
