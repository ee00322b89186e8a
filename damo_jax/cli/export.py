"""``damo-jax export TARGET``: export a model without PyTorch.

examples:
  damo-jax export onnx --config s --weights damoyolo_s.pth --output s.onnx
  damo-jax export onnx --checkpoint runs/demo --img-size 256 --batch dynamic --output demo.onnx
  damo-jax export onnx --config t --weights t.pth --end2end --topk 100 --output t_e2e.onnx
  damo-jax export openvino --onnx s.onnx --output s.xml [--fp16]
  damo-jax export openvino --config s --weights damoyolo_s.pth --output s.xml
  damo-jax export tensorrt --onnx s.onnx --output s.engine [--fp16]
  damo-jax export openvino --int8 --checkpoint runs/demo --calib-data demo --mixed 4 --output-dir int8/
  damo-jax export int8 --config s --onnx s.onnx --calib-data coco:/data/coco --output-dir int8/

Then score the exported file with the same pre/post-processing: damo-jax eval --config s
--onnx s.onnx --data coco:/data/coco. Aliases: python export/to_onnx.py, to_openvino.py,
to_tensorrt.py.
"""
from __future__ import annotations

# target -> (module with main(argv, prog), one-line description). Add rows for new targets.
EXPORT_TARGETS = {
    "onnx": ("damo_jax.export.to_onnx", "raw (scores, boxes) or --end2end ONNX (opset >= 17)"),
    "openvino": ("damo_jax.export.to_openvino", "OpenVINO IR .xml/.bin from an ONNX file (or export first)"),
    "tensorrt": ("damo_jax.export.to_tensorrt", "TensorRT engine from an ONNX file (NVIDIA GPU)"),
    "int8": ("damo_jax.export.int8", "calibrated INT8 OpenVINO IR (NNCF) / QDQ ONNX (onnxruntime), "
             "optional mixed precision, accuracy + latency report"),
}
# ``export onnx|openvino --int8 ...`` is ``export int8 --format onnx|openvino ...``
INT8_FORMATS = ("onnx", "openvino")


def usage(prog: str) -> str:
    rows = "\n".join(f"  {name:9s} {desc}" for name, (_, desc) in EXPORT_TARGETS.items())
    return (f"usage: {prog} TARGET [options]   ({prog} TARGET --help)\n\n"
            f"{__doc__.splitlines()[0]}\n\ntargets:\n{rows}\n\n" + __doc__.split("\n\n", 1)[1])


# targets that read a given ``--onnx FILE``; checked here, before the target's converter opens it
ONNX_READING_TARGETS = ("openvino", "tensorrt", "int8")
TENSORRT_MISSING = ("TensorRT's Python package is not installed (pip install tensorrt, from "
                    "NVIDIA's index, on a machine with an NVIDIA GPU); --print-trtexec prints the "
                    "equivalent trtexec command without it")


def _flag_value(argv, flag: str):
    """The value of ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``), else None."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def check_onnx_file(path, flag: str = "--onnx") -> None:
    """:class:`~damo_jax.errors.UserError` naming ``flag`` when an existing ``path`` is not a
    readable ONNX model (random bytes, a truncated export, an image, an empty graph). A missing
    file is left to the target (its own "not found" error)."""
    from pathlib import Path

    from damo_jax.errors import UserError
    if not Path(path).is_file():
        return
    import onnx
    from google.protobuf.message import DecodeError
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise UserError(f"{flag} {path}: cannot be read as an ONNX model ({e})") from e
    if not len(model.graph.node) or not len(model.graph.input):
        raise UserError(f"{flag} {path}: cannot be read as an ONNX model (no graph: "
                        f"{len(model.graph.node)} nodes, {len(model.graph.input)} inputs)")


def check_tensorrt() -> None:
    """UserError when TensorRT's Python package cannot be imported."""
    from damo_jax.errors import UserError
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as e:
        raise UserError(f"export tensorrt: {TENSORRT_MISSING} [{e}]") from e


def precheck(target: str, rest) -> None:
    """Input checks of ``export TARGET`` that the target modules leave to their converters (which
    fail with tracebacks): an unreadable ``--onnx`` file; TensorRT not installed."""
    if any(a in ("-h", "--help") for a in rest):
        return
    onnx_path = _flag_value(rest, "--onnx")
    if target in ONNX_READING_TARGETS and onnx_path:
        check_onnx_file(onnx_path)
    if target == "tensorrt" and "--print-trtexec" not in rest:
        check_tensorrt()


def main(argv=None, prog: str = "damo-jax export"):
    from damo_jax.cli.common import dispatch, run_cli
    argv = list(argv or [])
    if argv and argv[0] in INT8_FORMATS and "--int8" in argv[1:]:
        argv = ["int8"] + [a for a in argv[1:] if a != "--int8"] + ["--format", argv[0]]
    if argv and argv[0] in EXPORT_TARGETS:
        run_cli(lambda a: precheck(a[0], a[1:]), argv)
    return dispatch(EXPORT_TARGETS, argv, prog, lambda: usage(prog), what="target")
