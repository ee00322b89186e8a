"""Convert an exported ONNX file to OpenVINO IR (``.xml`` + ``.bin``), FP32 or FP16 weights.

    damo-jax export openvino --onnx s.onnx --output s.xml              # FP32 weights
    damo-jax export openvino --onnx s.onnx --fp16 --output s_fp16.xml  # FP16-compressed weights
    damo-jax export openvino --config s --weights damoyolo_s.pth --output s.xml   # runs to_onnx first

``--fp16`` stores the weights in FP16 (``ov.save_model(..., compress_to_fp16=True)``); the CPU
plugin decompresses them and computes in its inference precision. Note: on CPUs with
AMX/AVX512-BF16 the CPU plugin computes in **bf16 by default**; for FP32 results compile with
``{"INFERENCE_PRECISION_HINT": "f32"}`` (``damo_jax.inference.backends.OpenVinoBackend(precision="f32")``,
``benchmark_app -infer_precision f32``). The ONNX metadata (class names, size, thresholds) is
copied into the IR's rt_info under ``damo_jax``.

OpenVINO's Python package posts usage telemetry from a forked child process on ``import openvino``
and on every ``convert_model``; damo_jax imports it through
``damo_jax.inference.backends.import_openvino``, which leaves ``openvino_telemetry`` out, so
OpenVINO (and nncf) use their no-op stubs: no network traffic, no ``fork()`` of the JAX process.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from damo_jax.errors import ConfigError, InputPathError, UserError, write_failed
from damo_jax.export import end2end as end2end_graph, onnx_utils

log = logging.getLogger("damo_jax.export")



def convert(onnx_path, output, *, fp16: bool = False) -> Path:
    """ONNX file -> IR ``output`` (.xml; the .bin is written next to it)."""
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()

    onnx_path, output = Path(onnx_path), Path(output)
    if not onnx_path.is_file():
        raise InputPathError(f"--onnx {onnx_path}: ONNX file not found")
    if output.suffix != ".xml":
        raise ConfigError(f"--output must end in .xml, got {output}")
    onnx_utils.check_readable(onnx_path)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    _check_is_export(proto, onnx_path)
    model = ov.convert_model(str(onnx_path))
    for prop in proto.metadata_props:
        model.set_rt_info(prop.value, ["damo_jax", prop.key])
    model.set_rt_info("fp16" if fp16 else "fp32", ["damo_jax", "weights_precision"])
    check = None if fp16 else (        # FP16 weights differ from the ONNX file by design
        lambda tmp: verify(onnx_path, tmp, shown_as=output))
    save_ir(model, output, fp16=fp16, check=check)
    log.info("wrote %s (+ .bin), %s weights, inputs %s, outputs %s", output,
             "FP16" if fp16 else "FP32", [str(i.get_partial_shape()) for i in model.inputs],
             [o.get_any_name() for o in model.outputs])
    return output


def save_ir(model, output, *, fp16: bool = False, check=None) -> Path:
    """Write the OpenVINO model as ``output`` (.xml + .bin) under a temporary name, run
    ``check(tmp_xml)`` if given, then rename (.bin first): an interrupted, failed or refused write
    leaves no IR that was not checked and no temporary. A failed write (disk full, unwritable
    place) is an :class:`~damo_jax.errors.OutputWriteError` naming ``output``."""
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.{os.getpid()}.tmp.xml")
    try:
        try:
            ov.save_model(model, str(tmp), compress_to_fp16=fp16)
        except (OSError, RuntimeError) as e:     # OpenVINO's failed writes are RuntimeErrors
            raise write_failed(output, e) from e
        if check is not None:
            check(tmp)
        try:
            os.replace(tmp.with_suffix(".bin"), output.with_suffix(".bin"))
            os.replace(tmp, output)
        except OSError as e:
            raise write_failed(output, e) from e
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return output


def _check_is_export(proto: onnx.ModelProto, onnx_path: Path) -> None:
    """Refuse (one error line naming --onnx) what predict / eval would refuse in the IR: outputs
    other than a damo_jax export's (raw or end-to-end; e.g. an official DAMO-YOLO export) and an
    input whose height / width are not fixed."""
    from damo_jax.inference import backends
    backends._check_outputs(onnx_path, [o.name for o in proto.graph.output], "--onnx",
                            end2end_ok=True)
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in proto.graph.input[0].type.tensor_type.shape.dim]
    backends._input_geometry(dims, onnx_path, "--onnx")


class ExportMismatch(UserError, RuntimeError):
    """The written IR does not compute what its ONNX file computes (an OpenVINO defect)."""


def _probe_images(n: int, h: int, w: int) -> np.ndarray:
    """(n, 3, h, w) float32 RGB 0-255 images with smooth shading and a few solid rectangles: the
    statistics of a photo more than of white noise (on noise, the two runtimes' float32 scores
    drift apart by up to 3e-3, too close to a real defect's 2e-2)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        for c in range(3):
            fy, fx, phase = rng.uniform(1, 4), rng.uniform(1, 4), rng.uniform(0, 6.3)
            out[i, c] = 127 + 90 * np.sin(fy * 6.3 * yy + phase) * np.cos(fx * 6.3 * xx)
        for _ in range(6):
            y0, x0 = rng.integers(0, h - h // 8), rng.integers(0, w - w // 8)
            dy, dx = rng.integers(h // 16, h // 3), rng.integers(w // 16, w // 3)
            out[i, :, y0:y0 + dy, x0:x0 + dx] = rng.uniform(0, 255, (3, 1, 1))
    return out


def verify(onnx_path, xml_path, *, tol: float = 5e-3, shown_as=None) -> None:
    """Run the ONNX file (onnxruntime) and the IR read back from disk (OpenVINO, float32) on one
    fixed synthetic image batch; :class:`ExportMismatch` when a score differs by more than ``tol``
    (measured float32 noise between the runtimes: 5e-7 for a trained demo model, up to 1.8e-3 for
    the untrained golden-weight S; the end2end defect below: 1.8e-2 to 0.14).

    End-to-end files are compared through a copy whose NMS score threshold is 0 (all K rows are
    detections, so the comparison is never vacuous), on ``num_dets`` and the sorted scores (the
    order of tied rows may differ between the runtimes). Why: OpenVINO 2026.4 computed another
    network for one form of the end-to-end graph, only after the IR round trip
    (``export/end2end.py``); this check keeps such a file from being written silently.
    ``shown_as``: the IR's name in the error (the final name of an IR checked under a temporary one)."""
    import onnxruntime as ort
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()

    proto = onnx.load(str(onnx_path))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or min(dims[1:]) <= 0:
        log.info("%s: no fixed input size; the IR is not compared with the ONNX file", onnx_path)
        return
    x = _probe_images(max(dims[0], 1), dims[2], dims[3])
    end2end = any(p.key == "end2end" for p in proto.metadata_props)
    shown = f"{shown_as or xml_path}: the OpenVINO IR does not compute what {onnx_path} computes"
    given = onnx_path
    with tempfile.TemporaryDirectory() as tmp:
        if end2end:                      # the same graph with conf 0, converted the same way
            for init in proto.graph.initializer:
                if init.name == end2end_graph.CONF_INIT:
                    init.CopyFrom(onnx.numpy_helper.from_array(np.array([0.0], np.float32), init.name))
            onnx_path, xml_path = Path(tmp) / "probe.onnx", Path(tmp) / "probe.xml"
            onnx.save(proto, str(onnx_path))
            ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
        with onnx_utils.ort_refusals(f"--onnx {given}", "; the IR is checked against it, so "
                                     "it must run in onnxruntime (re-export it with a lower --opset)"):
            sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        want = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))
        compiled = ov.Core().compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        res = compiled(x)
        got = {n: np.asarray(res[compiled.output(n)]) for n in names}
    # the scores (and the count of an end2end file): a wrong network shows there; box coordinates
    # carry more float noise (the DFL integral times the stride)
    names = [n for n in ("num_dets", "scores") if n in want]
    if end2end:
        got = {n: np.sort(got[n], -1) for n in names}
        want = {n: np.sort(want[n], -1) for n in names}
    for n in names:
        a, b = got[n].astype(np.float64), want[n].astype(np.float64)
        worst = float(np.max(np.abs(a - b), initial=0.0)) if a.shape == b.shape else np.inf
        if not worst <= tol:
            raise ExportMismatch(
                f"{shown} (output {n!r} on a probe batch: differences up to {worst:.3g} > {tol}); "
                f"the IR was not kept. Run the ONNX file with onnxruntime, or export without "
                f"--end2end and use damo_jax's NMS (the Detector's OpenVINO backend)")


def build_parser(prog: str = "damo-jax export openvino"):
    from damo_jax.cli.common import Parser
    p = Parser(prog=prog, usage=f"{prog} (--onnx FILE | EXPORT-ONNX-OPTIONS) [--fp16] --output OUT.xml "
                                "[--keep-onnx]",
               description=__doc__.split("\n\n")[0] + " Without --onnx, every option of "
               "`damo-jax export onnx` (--config, --checkpoint, --weights, --img-size, --batch, "
               "--end2end, --topk, --conf, --iou, ...) exports the ONNX file first. "
               "Calibrated INT8: `damo-jax export openvino --int8 ...` (= `damo-jax export int8 "
               "--format openvino`; see `damo-jax export int8 --help`).",
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
        if args.keep_onnx:
            parser.error("--keep-onnx keeps the ONNX file this command exports first; with --onnx "
                         "there is none to keep")
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


def main(argv=None, prog: str = "damo-jax export openvino") -> Path:
    """``damo-jax export openvino`` (also ``python -m damo_jax.export.to_openvino``); returns the .xml path."""
    from damo_jax.cli.common import run_cli
    return run_cli(lambda a: run(a, prog), argv)


if __name__ == "__main__":
    main()
