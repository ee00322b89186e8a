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

import argparse
import logging
import sys
import tempfile
from pathlib import Path


import onnx

log = logging.getLogger("damo_jax.export")



def convert(onnx_path, output, *, fp16: bool = False) -> Path:
    """ONNX file -> IR ``output`` (.xml; the .bin is written next to it)."""
    import openvino as ov

    onnx_path, output = Path(onnx_path), Path(output)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} not found")
    if output.suffix != ".xml":
        raise ValueError(f"--output must end in .xml, got {output}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--onnx", help="input ONNX file (from export/to_onnx.py)")
    p.add_argument("--fp16", action="store_true", help="store FP16-compressed weights")
    p.add_argument("--output", required=True, help="output IR .xml path")
    p.add_argument("--keep-onnx", action="store_true",
                   help="with --config/--checkpoint: keep the intermediate ONNX next to the IR")
    return p


def main(argv=None) -> Path:
    from damo_jax.export.common import setup_logging  # lazy: keeps jax out of the import
    setup_logging()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    out = Path(args.output)
    if args.onnx:
        if rest:
            parser.error(f"unexpected arguments with --onnx: {rest}")
        return convert(args.onnx, out, fp16=args.fp16)
    if not rest:
        parser.error("give --onnx FILE, or to_onnx.py options (--config/--weights/--checkpoint, "
                     "--img-size, --batch, --end2end, ...) to export first")
    from damo_jax.export import to_onnx
    if args.keep_onnx:
        onnx_path = to_onnx.main(rest + ["--output", str(out.with_suffix(".onnx"))])
        return convert(onnx_path, out, fp16=args.fp16)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = to_onnx.main(rest + ["--output", str(Path(tmp) / "model.onnx")])
        return convert(onnx_path, out, fp16=args.fp16)


if __name__ == "__main__":
    main()
