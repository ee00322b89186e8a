"""The TensorFlow route (TOOLCHAIN §2b): jax2tf (native StableHLO) -> SavedModel -> TFLite -> ONNX.

jax2tf's graph mode is gone in current JAX and tf2onnx cannot read ``XlaCallModule``; TF's TFLite
converter, however, legalises the StableHLO inside it to TFLite builtin ops, and tf2onnx reads
.tflite files. Static batch only (the dynamic .tflite graph is much worse and OpenVINO cannot read
it). Writes into ``workdir``: ``saved_model/`` (signature ``serving_default``: input ``images``
(N,3,H,W) float32, outputs ``scores``, ``boxes``), ``model.tflite`` and ``metadata.json`` (the
export metadata of the ONNX file — class names, size, thresholds — plus ``tflite_outputs``: the
.tflite's outputs in index order, which is NOT ``scores``, ``boxes``: read them by name through the
signature runner, ``interpreter.get_signature_runner()(images=x)``).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import onnx

from damo_jax.export import common, onnx_utils

log = logging.getLogger("damo_jax.export")


def _import_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import tf2onnx  # noqa: F401
        from jax.experimental import jax2tf
    except ImportError as e:
        raise ImportError("--via tf needs tensorflow-cpu and tf2onnx (pip install "
                          "'damo_jax[tf]'); the default --via jax2onnx does not") from e
    return tf, jax2tf


def write_saved_model(dm: common.DeployModel, batch: int, path: Path) -> Path:
    """SavedModel with a ``serving_default`` signature ``images -> {scores, boxes}``."""
    tf, jax2tf = _import_tf()
    forward = common.raw_fn(dm)

    def named(images):
        scores, boxes = forward(images)
        return {"scores": scores, "boxes": boxes}

    tf_fn = jax2tf.convert(named, with_gradient=False)
    module = tf.Module()
    spec = tf.TensorSpec(common.input_spec(batch, dm.image_size), tf.float32,
                         name=common.INPUT_NAME)
    module.serve = tf.function(tf_fn, input_signature=[spec], autograph=False)
    tf.saved_model.save(module, str(path),
                        signatures={"serving_default": module.serve.get_concrete_function()})
    return path


def write_tflite(saved_model: Path, path: Path) -> Path:
    tf, _ = _import_tf()
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    path.write_bytes(converter.convert())
    return path


def tflite_io_names(path: Path) -> dict:
    """``{"images"|"scores"|"boxes": tflite tensor name}`` from the serving signature."""
    tf, _ = _import_tf()
    interp = tf.lite.Interpreter(model_path=str(path))
    runner = interp.get_signature_runner("serving_default")
    details = {**runner.get_input_details(), **runner.get_output_details()}
    by_index = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    missing = {common.INPUT_NAME, *common.RAW_OUTPUTS} - set(details)
    if missing:
        raise RuntimeError(f"{path}: serving signature lacks {sorted(missing)} ({sorted(details)})")
    return {key: by_index[d["index"]] for key, d in details.items()}


def write_metadata(dm: common.DeployModel, tflite: Path, names: dict, path: Path) -> Path:
    """``metadata.json`` beside the .tflite (which carries no class names): the ONNX export
    metadata, its values as JSON, and ``tflite_outputs``, the signature names of the .tflite's
    outputs in index order (``get_output_details()``)."""
    tf, _ = _import_tf()
    by_tensor = {tensor: key for key, tensor in names.items()}
    order = [by_tensor.get(d["name"], d["name"])
             for d in sorted(tf.lite.Interpreter(model_path=str(tflite)).get_output_details(),
                             key=lambda d: d["index"])]
    meta = {}
    for key, value in dm.metadata().items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    meta["tflite_outputs"] = order
    path.write_text(json.dumps(meta, indent=1) + "\n")
    return path


def convert(dm: common.DeployModel, *, batch: int, opset: int, workdir) -> onnx.ModelProto:
    """Write SavedModel + .tflite into ``workdir`` and return the raw ONNX model."""
    _, _ = _import_tf()
    import tf2onnx

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    saved = write_saved_model(dm, batch, workdir / "saved_model")
    tflite = write_tflite(saved, workdir / "model.tflite")
    names = tflite_io_names(tflite)
    write_metadata(dm, tflite, names, workdir / "metadata.json")
    log.info("SavedModel + TFLite in %.1f s: %s", time.time() - t0, workdir)
    model, _ = tf2onnx.convert.from_tflite(
        str(tflite), input_names=[names[common.INPUT_NAME]],
        output_names=[names[k] for k in common.RAW_OUTPUTS], opset=opset)
    onnx_utils.set_io_names(model, inputs=[common.INPUT_NAME],
                            outputs=_output_order(model, names))
    model = onnx_utils.fix_value_info(onnx_utils.prune_dead_nodes(model))
    log.info("tf2onnx --tflite: %s", onnx_utils.graph_summary(model))
    return model


def _output_order(model: onnx.ModelProto, names: dict) -> list[str]:
    """Public names for the model's outputs in their current order."""
    public = {tensor: key for key, tensor in names.items()}
    out = []
    for o in model.graph.output:
        if o.name not in public:
            raise RuntimeError(f"tf2onnx output {o.name!r} is not in the TFLite signature {names}")
        out.append(public[o.name])
    return out
