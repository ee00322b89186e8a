"""Convert an exported ONNX file to OpenVINO IR (``.xml`` + ``.bin``), FP32 or FP16 weights.

    python export/to_openvino.py --onnx s.onnx --output s.xml              # FP32 weights
    python export/to_openvino.py --onnx s.onnx --fp16 --output s_fp16.xml  # FP16-compressed weights
    python export/to_openvino.py --config s --weights damoyolo_s.pth --output s.xml   # runs to_onnx first

``--fp16`` stores the weights in FP16 (``ov.save_model(..., compress_to_fp16=True)``); the CPU
plugin decompresses them and computes in its inference precision. Note: on CPUs with
AMX/AVX512-BF16 the CPU plugin computes in **bf16 by default**; for FP32 results compile with
``{"INFERENCE_PRECISION_HINT": "f32"}`` (``damo_jax.inference.backends.OpenVinoBackend(precision="f32")``,
``benchmark_app -infer_precision f32``). The ONNX metadata (class names, size, thresholds) is
copied into the IR's rt_info under ``damo_jax``.

OpenVINO's Python package posts usage telemetry from a forked child process on ``import openvino``
and on every ``convert_model`` (Python warns about ``os.fork()`` when JAX is loaded); opt out
once per machine with ``opt_in_out --opt_out`` (OpenVINO's tool).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path


import onnx

from damo_jax.errors import ConfigError, InputPathError
from damo_jax.export import onnx_utils

log = logging.getLogger("damo_jax.export")



def convert(onnx_path, output, *, fp16: bool = False) -> Path:
    """ONNX file -> IR ``output`` (.xml; the .bin is written next to it)."""
    import openvino as ov

    onnx_path, output = Path(onnx_path), Path(output)
    if not onnx_path.is_file():
        raise InputPathError(f"--onnx {onnx_path}: ONNX file not found")
    if output.suffix != ".xml":
        raise ConfigError(f"--output must end in .xml, got {output}")
    onnx_utils.check_readable(onnx_path)
    model = ov.convert_model(str(onnx_path))
    proto = onnx.load(str(onnx_path), load_external_data=False)
    for prop in proto.metadata_props:
        model.set_rt_info(prop.value, ["damo_jax", prop.key])
    model.set_rt_info("fp16" if fp16 else "fp32", ["damo_jax", "weights_precision"])
    output.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(output), compress_to_fp16=fp16)
    log.info("wrote %s (+ .bin), %s weights, inputs %s, outputs %s", output,
             "FP16" if fp16 else "FP32", [str(i.get_partial_shape()) for i in model.inputs],
             [o.get_any_name() for o in model.outputs])
    return output


def build_parser(prog: str = "python export/to_openvino.py"):
    from damo_jax.cli.common import Parser
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0],
               epilog="examples:\n" + __doc__.split("\n\n", 1)[1])
    p.add_argument("--onnx", help="input ONNX file (from damo-jax export onnx)")
    p.add_argument("--fp16", action="store_true", help="store FP16-compressed weights")
    p.add_argument("--output", required=True, help="output IR .xml path")
    p.add_argument("--keep-onnx", action="store_true",
                   help="with --config/--checkpoint: keep the intermediate ONNX next to the IR")
    return p


def run(argv, prog: str) -> Path:
    from damo_jax.export import to_onnx
    parser = build_parser(prog)
    args, rest = parser.parse_known_args(argv)
    out = Path(args.output)
    if out.suffix != ".xml":
        raise ConfigError(f"--output must end in .xml, got {out}")
    from damo_jax.cli.common import output_file
    output_file(out, "--output")
    if args.onnx:
        if rest:
            parser.error(f"unexpected arguments with --onnx: {rest}")
        return convert(args.onnx, out, fp16=args.fp16)
    if not rest:
        parser.error("give --onnx FILE, or export options (--config/--weights/--checkpoint, "
                     "--img-size, --batch, --end2end, ...) to export to ONNX first")
    onnx_prog = f"{prog} (ONNX step)"
    if args.keep_onnx:
        onnx_path = to_onnx.main(rest + ["--output", str(out.with_suffix(".onnx"))], prog=onnx_prog)
        return convert(onnx_path, out, fp16=args.fp16)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = to_onnx.main(rest + ["--output", str(Path(tmp) / "model.onnx")], prog=onnx_prog)
        return convert(onnx_path, out, fp16=args.fp16)


def main(argv=None, prog: str = "python export/to_openvino.py") -> Path:
    """``damo-jax export openvino`` / ``python export/to_openvino.py``; returns the .xml path."""
    from damo_jax.cli.common import run_cli
    return run_cli(lambda a: run(a, prog), argv)


if __name__ == "__main__":
    main()
