"""Export a DAMO-YOLO model to ONNX without PyTorch.

    damo-jax export onnx --config s --weights damoyolo_s.pth --output s.onnx
    damo-jax export onnx --checkpoint runs/s_coco --batch dynamic --output s_dyn.onnx
    damo-jax export onnx --config t --weights t.pth --end2end --topk 100 --output t_e2e.onnx
    damo-jax export onnx --config ns --img-size 416 --via tf --output ns_tf.onnx

Pipeline: weights -> ``damo_jax.models.reparam.fuse`` (RepConv + every BN folded) -> ``build_model(cfg,
deploy=True)`` -> ONNX. Input ``images`` float32 (N, 3, H, W) RGB 0-255 (no normalisation);
outputs ``scores`` (N, A, C) sigmoid probabilities and ``boxes`` (N, A, 4) x1y1x2y2 in input pixels
(the official raw export layout, no NMS). ``--end2end`` appends the official class-aware NMS as ONNX
nodes: outputs ``num_dets`` (N, 1) int32, ``boxes`` (N, K, 4), ``scores`` (N, K), ``labels`` (N, K)
int32, at most K = ``--topk`` rows per image.

Routes (``--via``):
* ``jax2onnx`` (default, TensorFlow-free): jax2onnx -> value_info fix -> onnxruntime's basic
  optimiser run offline + the verified upsample fold (``--no-optimize`` keeps the literal graph).
* ``tf``: jax2tf (native StableHLO) -> SavedModel with a ``serving_default`` signature ->
  ``TFLiteConverter`` -> ``tf2onnx --tflite``. Also writes ``<output stem>_tf/saved_model/`` and
  ``<output stem>_tf/model.tflite`` next to the ONNX file. Static batch only.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path


import onnx

from damo_jax.errors import ConfigError, InputPathError

from damo_jax.export import common, end2end, graph_passes, onnx_utils

log = logging.getLogger("damo_jax.export")
MIN_OPSET = 17
MAX_TF2ONNX_OPSET = 18


def max_runtime_opset() -> int:
    """The newest default-domain opset the installed onnxruntime loads (every export is checked in
    onnxruntime): probed once, from the installed onnx's newest down, with a model of the
    activations an export holds (``Swish`` from opset 24 on: jax2onnx writes SiLU as one ``Swish``
    there, and onnxruntime 1.31 has no kernel for it)."""
    global _MAX_OPSET
    if _MAX_OPSET is None:
        import onnxruntime as ort
        from onnx import TensorProto, helper
        _MAX_OPSET = MIN_OPSET
        info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "xyz"]
        for opset in range(onnx.defs.onnx_opset_version(), MIN_OPSET, -1):
            swish = opset >= 24 and onnx.defs.has("Swish")
            nodes = [helper.make_node("Relu", ["x"], ["y" if swish else "z"])]
            nodes += [helper.make_node("Swish", ["y"], ["z"])] if swish else []
            graph = helper.make_graph(nodes, "probe", info[:1], info[2:])
            probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
            probe.ir_version = min(probe.ir_version, 10)
            try:
                ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            except Exception:  # noqa: BLE001 - "opset under development" and the like
                continue
            _MAX_OPSET = opset
            break
    return _MAX_OPSET


_MAX_OPSET: int | None = None


def convert_jax2onnx(dm: common.DeployModel, *, batch=1, opset: int = 17,
                     optimize: bool = True) -> onnx.ModelProto:
    """Fused deploy model -> raw ONNX (inputs ``images``; outputs ``scores``, ``boxes``)."""
    from jax2onnx import to_onnx

    fn = common.raw_fn(dm)
    t0 = time.time()
    model = to_onnx(fn, [common.input_spec(batch, dm.image_size)], opset=opset,
                    model_name=f"damo_yolo_{dm.cfg.model.name}",
                    input_names=[common.INPUT_NAME], output_names=list(common.RAW_OUTPUTS))
    log.info("jax2onnx: %.1f s, %s", time.time() - t0, onnx_utils.graph_summary(model))
    model = onnx_utils.fix_value_info(onnx_utils.prune_dead_nodes(model))
    if optimize:
        model = optimize_graph(model)
    return model


def optimize_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT basic pass -> fold verified upsample chains into Resize -> ORT basic pass again."""
    model = onnx_utils.optimize_ort(model)
    model, folded = graph_passes.fold_upsample_chains(model)
    if folded:
        model = onnx_utils.optimize_ort(onnx_utils.fix_value_info(model))
    log.info("optimised: %d upsample chain(s) folded, %s", folded, onnx_utils.graph_summary(model))
    return model


def finalize(model: onnx.ModelProto, dm: common.DeployModel, *, route: str,
             e2e: dict | None = None) -> onnx.ModelProto:
    """Optional end-to-end NMS, metadata, shape re-inference and the full checker."""
    if e2e is not None:
        model = end2end.append_end2end(model, **e2e)
    meta = dict(dm.metadata(), route=route)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    if e2e is not None:
        model.metadata_props.append(onnx.StringStringEntryProto(
            key="end2end", value=",".join(f"{k}={v}" for k, v in e2e.items())))
    model.producer_name, model.producer_version = "damo_jax", _version()
    model = onnx_utils.fix_value_info(model)
    onnx_utils.check(model)
    return model


def _version() -> str:
    import damo_jax
    return damo_jax.__version__


def check_route(via: str, batch, opset: int) -> None:
    """ConfigError for an opset / batch the route cannot export (checked before the model loads)."""
    if opset < MIN_OPSET or opset > max_runtime_opset():
        raise ConfigError(f"--opset must be in [{MIN_OPSET}, {max_runtime_opset()}] (the newest "
                          f"the installed onnxruntime runs), got {opset}")
    if via == "tf":
        if batch == common.DYNAMIC_BATCH:
            raise ConfigError("--via tf supports a static --batch only (the TFLite converter and "
                             "OpenVINO cannot use its dynamic-batch graph); use --via jax2onnx")
        if opset > MAX_TF2ONNX_OPSET:
            raise ConfigError(f"--via tf: tf2onnx 1.17 supports opset <= {MAX_TF2ONNX_OPSET}")


def export_onnx(dm: common.DeployModel, *, via: str = "jax2onnx", batch=1, opset: int = 17,
                end2end_cfg: dict | None = None, optimize: bool = True,
                tf_dir: Path | None = None) -> onnx.ModelProto:
    """The whole export; returns the checked model (not yet saved): it passes the full ONNX checker
    and loads in onnxruntime (an opset whose graph onnxruntime cannot run, e.g. ``Swish(24)`` in
    onnxruntime 1.31, is a one-line :class:`onnx_utils.OnnxRuntimeRefused`).

    ``batch``: an integer >= 1 or ``"dynamic"`` (:func:`common.parse_batch`; ConfigError else)."""
    batch = common.parse_batch(batch)
    check_route(via, batch, opset)
    what, hint = f"--opset {opset}: the exported graph", "; export with a lower --opset (default 17)"
    with onnx_utils.ort_refusals(what, hint):
        if via == "jax2onnx":
            model = convert_jax2onnx(dm, batch=batch, opset=opset, optimize=optimize)
        elif via == "tf":
            from damo_jax.export import tflite_route
            if tf_dir is None:
                raise ConfigError("--via tf needs an output location for the SavedModel / .tflite")
            model = tflite_route.convert(dm, batch=batch, opset=opset, workdir=tf_dir)
            if optimize:
                model = optimize_graph(model)
        else:
            raise ConfigError(f"--via must be 'jax2onnx' or 'tf', got {via!r}")
    model = finalize(model, dm, route=via, e2e=end2end_cfg)
    onnx_utils.check_runs(model, what, hint)
    return model


PROG = "damo-jax export onnx"


def add_arguments(p) -> None:
    from damo_jax.cli import common
    common.add_model_source(p, ("checkpoint", "weights"), config_help=f"model config name "
                            f"({common.config_names()}) or .py path; --config.KEY=VALUE overrides any key")
    common.add_img_size(p, "export size (default: the config's test.image_size, 640 or 416 for "
                        "nano)")
    p.add_argument("--batch", default="1",
                   help="static batch size, or 'dynamic' (jax2onnx route only) (default 1)")
    p.add_argument("--end2end", action="store_true",
                   help="append the official class-aware NMS (outputs num_dets, boxes, scores, labels)")
    p.add_argument("--topk", type=int, default=None,
                   help=f"end2end: max detections per image (K; default {end2end.DEFAULT_TOPK})")
    p.add_argument("--conf", type=float, default=None,
                   help="end2end: score threshold, strict > (default: config test.conf_thre)")
    p.add_argument("--iou", type=float, default=None,
                   help="end2end: IoU threshold, suppress > (default: config test.iou_thre)")
    p.add_argument("--via", choices=("jax2onnx", "tf"), default="jax2onnx",
                   help="jax2onnx (default, TF-free, static or dynamic batch) or tf (jax2tf -> "
                        "SavedModel -> TFLite -> tf2onnx; STATIC BATCH ONLY; also writes "
                        "<output stem>_tf/saved_model/ and <output stem>_tf/model.tflite)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; <= 18 with --via tf)")
    p.add_argument("--no-optimize", action="store_true",
                   help="keep the converter's literal graph (no ORT-basic / upsample clean-up)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the random init without weights (default 0)")
    p.add_argument("--output", required=True, help="output .onnx path")


def build_parser(prog: str = PROG):
    from damo_jax.cli.common import Parser
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0] + " Writes an ONNX file (opset >= 17).",
               epilog="examples:\n" + __doc__.split("\n\n", 1)[1])
    add_arguments(p)
    return p


def run(args, overrides=()) -> Path:
    from damo_jax.cli.common import img_size, output_file
    from damo_jax.errors import ConfigError
    if args.checkpoint is None and args.config is None:
        raise ConfigError("give --config (with --weights, or alone for random weights) or "
                          "--checkpoint")
    if args.seed is not None and (args.checkpoint or args.weights):
        raise ConfigError("--seed: the seed of a random-weight export; with --checkpoint / "
                          "--weights there is nothing random")
    batch = common.parse_batch(args.batch)
    size = img_size(args.img_size)
    check_route(args.via, batch, args.opset)           # the options first: before the model loads
    if args.end2end:                                   # the given thresholds (defaults: the config's)
        end2end.validate_thresholds(end2end.DEFAULT_TOPK if args.topk is None else args.topk,
                                    0.0 if args.conf is None else args.conf,
                                    0.5 if args.iou is None else args.iou)
    else:
        given = [flag for flag, value in (("--topk", args.topk), ("--conf", args.conf),
                                          ("--iou", args.iou)) if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: NMS options of --end2end only (the raw export "
                              f"has no NMS; damo-jax predict / eval take --conf / --iou)")
    out = output_file(args.output, "--output", suffix=".onnx",
                      inputs={"--weights": args.weights, "--checkpoint": args.checkpoint})
    dm = common.load_deploy_model(args.config, checkpoint=args.checkpoint, weights=args.weights,
                                  image_size=size, seed=args.seed or 0, overrides=overrides)
    e2e = None
    if args.end2end:
        e2e = dict(topk=end2end.DEFAULT_TOPK if args.topk is None else args.topk,
                   conf_thre=float(dm.cfg.test.conf_thre if args.conf is None else args.conf),
                   iou_thre=float(dm.cfg.test.iou_thre if args.iou is None else args.iou))
        end2end.validate_thresholds(**e2e)
    model = export_onnx(dm, via=args.via, batch=batch, opset=args.opset, end2end_cfg=e2e,
                        optimize=not args.no_optimize,
                        tf_dir=out.with_name(out.stem + "_tf") if args.via == "tf" else None)
    onnx_utils.save(model, out)
    summary = onnx_utils.graph_summary(model)
    log.info("wrote %s (%s route, batch %s, %dx%d, opset %d): %d nodes, %d Conv, %d Transpose; "
             "I/O %s", out, args.via, batch, *dm.image_size, args.opset, summary["nodes"],
             summary["convs"], summary["transposes"], onnx_utils.io_shapes(model))
    return out


def main(argv=None, prog: str = "damo-jax export onnx") -> Path:
    """``damo-jax export onnx`` (also ``python -m damo_jax.export.to_onnx``); returns the written path."""
    from damo_jax.cli.common import run_command
    return run_command(build_parser, run, argv, prog)


if __name__ == "__main__":
    main()
