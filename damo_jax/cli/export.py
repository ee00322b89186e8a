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
--onnx s.onnx --data coco:/data/coco. Aliases: python -m damo_jax.export.to_onnx (.to_openvino,
.to_tensorrt, .int8); in a source checkout also python export/to_onnx.py and its siblings.
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


def main(argv=None, prog: str = "damo-jax export"):
    from damo_jax.cli.common import dispatch
    argv = list(argv or [])
    if argv and argv[0] in INT8_FORMATS and "--int8" in argv[1:]:
        argv = ["int8"] + [a for a in argv[1:] if a != "--int8"] + ["--format", argv[0]]
    return dispatch(EXPORT_TARGETS, argv, prog, lambda: usage(prog), what="target")
