"""INT8 export with calibration: OpenVINO IR through NNCF, QDQ ONNX through onnxruntime.

    damo-jax export int8 --checkpoint runs/demo --calib-data demo --calib-images 64 \\
        --format both --mixed 4 --output-dir int8/
    damo-jax export int8 --config s --onnx s.onnx --calib-data coco:/data/coco --report-data coco:/data/coco

Steps (library: :func:`export_int8`):

1. FP32: the raw-output ONNX (``--onnx``, or exported first from ``--checkpoint`` / ``--config
   --weights``) and its OpenVINO IR.
2. Calibration images: ``--calib-images`` images spread evenly over the ``--calib-split`` split of
   the user's dataset spec, through the shared inference pre-processing
   (:func:`damo_jax.inference.pipeline.preprocess`: stretch-resize, RGB 0-255 float32), as NCHW.
3. Full INT8: onnxruntime ``quantize_static`` (QDQ, per-channel symmetric INT8 weights, asymmetric
   UINT8 activations, MinMax calibration) -> ``<stem>_int8.onnx``; NNCF ``nncf.quantize``
   (performance preset, all calibration images) on the IR -> ``<stem>_int8.xml``. In the QDQ
   ONNX the head's post-processing after its last Convs (reshapes, concat, sigmoid, DFL, box
   decoding: :func:`post_processing_nodes`, the part ``export/fp16.py`` keeps in FP32) stays
   float, and the class Convs write float logits: one per-tensor UINT8 scale over class logits
   spanning about -300..3 (a trained model) collapsed the scores to a few values (demo T @ 256:
   AP 0.406 -> 0.271; now 0.407). NNCF leaves them float by itself (same model: AP 0.399).
4. Mixed precision (``--mixed K``): the per-layer sensitivity of
   :mod:`damo_jax.export.quant_sensitivity` (measured on the calibration images), and the K most
   sensitive Convs kept in float (ORT ``nodes_to_exclude``, NNCF ``IgnoredScope``) ->
   ``<stem>_int8_mixed.onnx`` / ``.xml``; the ranking is written to ``sensitivity.json``.
5. The accuracy report (:mod:`damo_jax.export.quant_report`): mAP of every file on the report
   split through the evaluation path, latency at 1 and 2 threads, ``int8_report.json`` / ``.md``;
   a warning when an INT8 file loses more than ``quant_report.AP_DROP_WARN`` AP.

``--onnx`` takes a raw-output damo_jax ONNX (outputs ``scores``, ``boxes``; not ``--end2end``, not
the official DAMO-YOLO files) whose class count matches the config: from ``--config``, or without
it from the file's export metadata (as ``predict`` / ``eval --onnx``). It is checked before any
calibration or file is written.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger("damo_jax.export")

FORMATS = ("openvino", "onnx")


def calibration_images(spec: str, split: str, image_hw, count: int) -> list[np.ndarray]:
    """``count`` images spread evenly over the split, as (1, 3, H, W) float32 NCHW network inputs.

    Unreadable images are skipped and logged; an error names the spec when none can be read.
    """
    from damo_jax.data_pipelines import DataError, open_dataset
    from damo_jax.inference.pipeline import preprocess

    if count < 1:
        raise DataError(f"--calib-images must be >= 1, got {count}")
    dataset = open_dataset(spec, split)
    if len(dataset) == 0:
        raise DataError(f"calibration data {spec!r} ({split}): the split has no images")
    indices = np.unique(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round())
    images, skipped = [], 0
    for index in indices.astype(int).tolist():
        try:
            image = dataset[index]["image"]
        except (DataError, OSError, ValueError) as e:
            skipped += 1
            log.warning("calibration: skipping image %d of %s: %s", index, spec, e)
            continue
        batch, _ = preprocess([image], tuple(image_hw))
        images.append(np.ascontiguousarray(batch.astype(np.float32).transpose(0, 3, 1, 2)))
    if not images:
        raise DataError(f"calibration data {spec!r} ({split}): none of {len(indices)} images "
                        "could be read")
    log.info("calibration: %d images of %s (%s) at %s, %d skipped", len(images), spec, split,
             tuple(image_hw), skipped)
    return images


def _input_hw(onnx_path) -> tuple[int, int]:
    import onnx
    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return int(dims[2].dim_value), int(dims[3].dim_value)


class _PreprocessHintFilter(logging.Filter):
    """Drops onnxruntime's "Please consider to run pre-processing before quantization" (a root
    logger warning of every ``quantize_static`` call). Its pre-processing (``quant_pre_process``:
    symbolic shape inference, graph optimisation) has nothing left to do on our exports: static
    shapes, BatchNorm folded — on the demo Ns it returned the same 289 nodes with the same names."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def post_processing_nodes(model) -> list[str]:
    """Names of the nodes after the head's last Convs — neither a Conv nor an ancestor of one (the
    rule :mod:`damo_jax.export.fp16` keeps in FP32): reshapes / concat of the per-level outputs,
    sigmoid, DFL softmax + integral, box decoding. ``model``: ONNX proto or path."""
    import onnx

    from damo_jax.export.fp16 import _conv_trunk
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    nodes = list(model.graph.node)
    trunk = _conv_trunk(nodes)
    return [n.name for k, n in enumerate(nodes) if k not in trunk and n.name]


def _float_scores(model, tail) -> int:
    """The post-processing nodes ``tail`` of the class scores (those the ``scores`` output depends
    on; all of ``tail`` when there is no such output) read the float tensor ``x`` where they read
    ``DQ(Q(x))``. The quantiser also quantises every Conv's OUTPUT, so excluding the
    post-processing nodes alone still left the class Convs writing per-tensor UINT8 logits (demo
    T @ 256, stride 16: -277..0, step 1.1): these few-channel Convs now write float logits. The box
    Convs (DFL logits, a narrow range) keep their INT8 output: float they cost +20 % latency for
    no AP. Unused Q/DQ nodes are pruned. Returns the number of inputs rewired."""
    from damo_jax.export import onnx_utils
    producer = {o: n for n in model.graph.node for o in n.output}
    wanted, stack = set(), [o.name for o in model.graph.output if o.name == "scores"]
    while stack:                                    # the tail nodes the scores depend on
        node = producer.get(stack.pop())
        if node is not None and node.name in tail and node.name not in wanted:
            wanted.add(node.name)
            stack.extend(node.input)
    wanted = wanted or set(tail)
    count = 0
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = dq is not None and dq.op_type == "DequantizeLinear" and producer.get(dq.input[0])
            if q and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
                count += 1
    onnx_utils.prune_dead_nodes(model)
    return count


def quantize_onnx(fp32_onnx, output, images: Sequence[np.ndarray], *,
                  exclude: Sequence[str] = (), quiet: bool = False) -> Path:
    """QDQ INT8 ONNX by onnxruntime static quantisation; ``exclude``: node names kept float, as
    are always the head's post-processing nodes (:func:`post_processing_nodes`).
    The FP32 file's metadata (class names, size, thresholds) is copied. ``quiet``: no "wrote"
    log line (a scratch file)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(images)

        def get_next(self):
            x = next(self._it, None)
            return None if x is None else {"images": x}

    from damo_jax.errors import write_failed
    from damo_jax.export import onnx_utils

    tail = post_processing_nodes(fp32_onnx)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # onnxruntime writes a hidden temporary; the final file is written once, atomically
    # (onnx_utils.save): a failed write (disk full) is one error line and leaves nothing behind
    tmp = output.with_name(f".{output.stem}.{os.getpid()}.quant.onnx")
    hint_filter = _PreprocessHintFilter()
    logging.getLogger().addFilter(hint_filter)
    try:
        try:
            quantize_static(str(fp32_onnx), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(dict.fromkeys([*exclude, *tail])))
        except OSError as e:
            raise write_failed(output, e) from e
        finally:
            logging.getLogger().removeFilter(hint_filter)
        model = onnx.load(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    source = onnx.load(str(fp32_onnx), load_external_data=False)
    _float_scores(model, set(tail))
    meta = {p.key: p.value for p in source.metadata_props}
    meta.update(precision="int8-qdq", float_layers=json.dumps(list(exclude)),
                float_post_processing=json.dumps(tail))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx_utils.save(model, output)
    if not quiet:
        log.info("wrote %s (QDQ INT8, %d layer nodes and the %d post-processing nodes kept "
                 "float)", output, len(exclude), len(tail))
    return output


def quantize_openvino(fp32_xml, output, images: Sequence[np.ndarray], *,
                      ignore: Sequence[str] = ()) -> Path:
    """INT8 IR by NNCF post-training quantisation of the FP32 IR; ``ignore``: ONNX Conv node names
    kept float (with their OpenVINO ``/WithoutBiases`` convolution)."""
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()                  # first: nncf imports openvino (and its telemetry) itself
    import nncf

    model = ov.Core().read_model(str(fp32_xml))
    names = [n for name in ignore for n in (name, f"{name}/WithoutBiases")]
    scope = nncf.IgnoredScope(names=names, validate=False) if names else None
    quantized = nncf.quantize(model, nncf.Dataset(list(images)), subset_size=len(images),
                              preset=nncf.QuantizationPreset.PERFORMANCE, ignored_scope=scope)
    quantized.set_rt_info("int8-nncf", ["damo_jax", "weights_precision"])
    quantized.set_rt_info(json.dumps(list(ignore)), ["damo_jax", "float_layers"])
    from damo_jax.export.to_openvino import save_ir
    output = save_ir(quantized, output)
    log.info("wrote %s (+ .bin, NNCF INT8, %d nodes kept float)", output, len(ignore))
    return output


def export_int8(fp32_onnx, out_dir, images: Sequence[np.ndarray], *,
                formats: Sequence[str] = FORMATS, mixed: int = 0,
                candidates: Sequence[str] | None = None) -> dict:
    """Write the FP32 / INT8 (/ mixed) files of ``fp32_onnx`` into ``out_dir``.

    Returns ``{"files": {label: path}, "float_layers": [...], "sensitivity": {...} | None}``;
    labels: ``onnx fp32``, ``onnx int8``, ``onnx int8 mixed``, ``openvino fp32``,
    ``openvino int8``, ``openvino int8 mixed``. ``candidates``: Conv names measured for ``mixed``
    (default all; tests use a few).
    """
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
        from damo_jax.errors import ConfigError
        raise ConfigError(f"--format: expected openvino, onnx or both, got {list(formats)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / f"{Path(fp32_onnx).stem}.onnx"
    if Path(fp32_onnx).resolve() != fp32.resolve():
        shutil.copyfile(fp32_onnx, fp32)
    stem = fp32.stem
    files = {"onnx fp32": fp32}
    scratch = None if "onnx" in formats else Path(tempfile.mkdtemp(prefix="damo_jax_int8_"))
    try:
        qdq = None            # the all-INT8 QDQ file: a deliverable, and the sensitivity base
        if "onnx" in formats or mixed > 0:
            qdq = quantize_onnx(fp32, (scratch or out) / f"{stem}_int8.onnx", images,
                                quiet=scratch is not None)
        if "onnx" in formats:
            files["onnx int8"] = qdq
        return _quantize_rest(files, fp32, out, stem, qdq, formats, images, mixed, candidates)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _quantize_rest(files, fp32, out, stem, qdq, formats, images, mixed, candidates) -> dict:
    """The mixed-precision and OpenVINO part of :func:`export_int8`."""
    from damo_jax.export import to_openvino
    from damo_jax.export.quant_sensitivity import float_layer_nodes, rank_layers
    sensitivity, float_layers, float_nodes = None, [], []
    if mixed > 0:
        sensitivity = rank_layers(qdq, fp32, images, candidates=candidates)
        import onnx
        float_layers = [name for name, _ in sensitivity["layers"][:mixed]]
        float_nodes = float_layer_nodes(onnx.load(str(fp32), load_external_data=False),
                                        float_layers)
        (out / "sensitivity.json").write_text(json.dumps(
            {"method": "all INT8 but one layer (Conv + activation): error(all INT8) - "
                       f"error(all INT8 but it), on {len(images)} calibration images",
             "float_layers": float_layers, "float_nodes": float_nodes,
             **sensitivity}, indent=1))
        log.info("mixed precision: float layers %s (of %d measured)", float_layers,
                 len(sensitivity["layers"]))
        if "onnx" in formats:
            files["onnx int8 mixed"] = quantize_onnx(fp32, out / f"{stem}_int8_mixed.onnx", images,
                                                     exclude=float_nodes)
    if "openvino" in formats:
        files["openvino fp32"] = to_openvino.convert(fp32, out / f"{stem}.xml")
        files["openvino int8"] = quantize_openvino(files["openvino fp32"],
                                                   out / f"{stem}_int8.xml", images)
        if mixed > 0:
            files["openvino int8 mixed"] = quantize_openvino(
                files["openvino fp32"], out / f"{stem}_int8_mixed.xml", images, ignore=float_nodes)
    return {"files": files, "float_layers": float_layers, "sensitivity": sensitivity}


# ----------------------------------------------------------------------------------------- CLI

PROG = "damo-jax export int8"


def build_parser(prog: str = PROG):
    from damo_jax.cli import common
    p = common.Parser(prog=prog, description=__doc__.split("\n\n")[0],
                      epilog="examples:\n" + __doc__.split("\n\n", 1)[1])
    common.add_model_source(p, ("checkpoint", "weights", "onnx"), config_help=(
        "model config name / file (needed with --weights; with --onnx optional: class names and "
        "test thresholds, default the file's export metadata)"))
    common.add_img_size(p, "export size (default: the config's / run's test.image_size)")
    p.add_argument("--calib-data", required=True, help="dataset spec of the calibration images "
                   "(demo, coco:/path, yolo:/path/data.yaml, voc:/path, tfds:coco/2017)")
    p.add_argument("--calib-split", default="train", help="calibration split (default train)")
    p.add_argument("--calib-images", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--format", choices=("openvino", "onnx", "both"), default="both",
                   help="INT8 OpenVINO IR (NNCF), QDQ ONNX (onnxruntime) or both (default)")
    p.add_argument("--mixed", type=int, default=0, metavar="K",
                   help="also write a mixed-precision model keeping the K most sensitive Convs "
                        "(measured on the calibration images) in float")
    p.add_argument("--report-data", help="dataset spec for the mAP part of the report "
                   "(default: --calib-data)")
    p.add_argument("--report-split", default="val", help="report split (default val)")
    p.add_argument("--no-report", action="store_true", help="skip the accuracy/latency report")
    p.add_argument("--report-rounds", type=int, default=5, help="interleaved latency rounds")
    p.add_argument("--output-dir", "--output", dest="output_dir", required=True,
                   help="folder for the files and the report")
    return p


def check_input_onnx(path, config=None, overrides: Sequence[str] = ()):
    """The ``LoadedModel`` of the ``--onnx`` file, through the loader and checks of ``predict`` /
    ``eval --onnx`` (:func:`damo_jax.inference.loading.load_model`): the config from ``config`` +
    ``overrides``, or from the file's export metadata; a user error naming ``--onnx`` for a file
    the report (and ``predict`` / ``eval``) would refuse: not a raw-output export (outputs
    ``scores`` / ``boxes``; an ``--end2end`` or official DAMO-YOLO file), no fixed input size, or
    another class count than the config's / metadata's. Called before any calibration or file."""
    import onnx

    from damo_jax.errors import ConfigError
    from damo_jax.export import onnx_utils
    from damo_jax.inference.backends import is_end2end
    from damo_jax.inference.loading import load_model
    onnx_utils.check_readable(path)
    names = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    if is_end2end(names):                                # predict / eval may run it; INT8 may not
        raise ConfigError(f"--onnx {path}: an --end2end export (NMS inside the graph); INT8 "
                          f"quantisation takes the raw export (export onnx without --end2end)")
    return load_model(config, onnx=str(path), overrides=overrides)


def run(args, overrides=()) -> dict:
    from damo_jax.cli.common import img_size, output_dir
    from damo_jax.errors import ConfigError
    if Path(args.output_dir).suffix.lower() in (".xml", ".onnx", ".bin"):
        raise ConfigError(f"--output-dir {args.output_dir}: INT8 export writes several files "
                          f"(FP32 and INT8 models, report); give a folder name")
    if args.mixed < 0:
        raise ConfigError(f"--mixed {args.mixed}: the number of Convs kept in float must be >= 0 "
                          f"(0: no mixed-precision model)")
    if args.calib_data:
        from damo_jax.cli.common import check_data_spec
        check_data_spec(args.calib_data, "--calib-data")
        if args.report_data:
            check_data_spec(args.report_data, "--report-data")
    if args.onnx:                        # checked before anything is written or calibrated
        fp32 = Path(args.onnx)
        config = check_input_onnx(fp32, args.config, overrides).cfg
    else:
        config = args.checkpoint or args.config
        if config is None:
            raise ConfigError("give --checkpoint RUN_DIR, --config with --weights, or --onnx "
                              "(with --config, or a file with damo_jax export metadata)")
    out = output_dir(args.output_dir, "--output-dir")
    if not args.onnx:
        from damo_jax.export import common, onnx_utils, to_onnx
        dm = common.load_deploy_model(args.config, checkpoint=args.checkpoint,
                                      weights=args.weights, image_size=img_size(args.img_size),
                                      overrides=overrides)
        fp32 = onnx_utils.save(to_onnx.export_onnx(dm, batch=1), out / f"{dm.cfg.model.name}.onnx")
    hw = _input_hw(fp32)
    images = calibration_images(args.calib_data, args.calib_split, hw, args.calib_images)
    formats = FORMATS if args.format == "both" else (args.format,)
    result = export_int8(fp32, out, images, formats=formats, mixed=args.mixed)
    if not args.no_report:
        from damo_jax.data_pipelines import open_dataset
        from damo_jax.export.quant_report import write_report
        spec = args.report_data or args.calib_data
        report = write_report(out, result["files"], model=f"{fp32.stem} @ {hw[0]}x{hw[1]}",
                              config=config, dataset=open_dataset(spec, args.report_split),
                              calibration=f"{len(images)} images of {args.calib_data} "
                                          f"({args.calib_split})",
                              float_layers=result["float_layers"], rounds=args.report_rounds,
                              overrides=overrides)
        print((out / "int8_report.md").read_text())
        result["report"] = report
    return result


def main(argv=None, prog: str = PROG):
    from damo_jax.cli.common import run_command
    return run_command(build_parser, run, argv, prog)
