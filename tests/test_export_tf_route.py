"""The TensorFlow route (--via tf): jax2tf -> SavedModel -> TFLite -> tf2onnx, on Ns (golden loop).

Needs tensorflow-cpu and tf2onnx (the ``[tf]`` extra); skipped with that reason when absent.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="--via tf needs tensorflow-cpu (pip install damo_jax[tf])")
pytest.importorskip("tf2onnx", reason="--via tf needs tf2onnx (pip install damo_jax[tf])")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import golden_path  # noqa: E402
from test_export_models import (assert_boxes_close, assert_scores_close, golden_input,  # noqa: E402
                                ort_run, train_variables)

from damo_jax.export import common, onnx_utils, to_onnx  # noqa: E402


def test_tflite_route_golden_loop_and_artifacts(tmp_path):
    dm = common.from_variables("ns", train_variables("Ns"), (128, 128), source="golden")
    model = to_onnx.export_onnx(dm, via="tf", batch=2, opset=17, tf_dir=tmp_path / "tf")
    assert (tmp_path / "tf" / "saved_model" / "saved_model.pb").is_file()
    tflite = tmp_path / "tf" / "model.tflite"
    assert tflite.stat().st_size > 1_000_000
    # metadata.json: the class names the .tflite lacks, and its outputs in index order (boxes
    # first here: a reader going by index with a 4-class model would swap them silently)
    import json

    import tensorflow as tf
    meta = json.loads((tmp_path / "tf" / "metadata.json").read_text())
    assert len(meta["class_names"]) == 80 and meta["image_size"] == [128, 128]
    details = sorted(tf.lite.Interpreter(model_path=str(tflite)).get_output_details(),
                     key=lambda d: d["index"])
    assert sorted(meta["tflite_outputs"]) == ["boxes", "scores"]
    for name, d in zip(meta["tflite_outputs"], details):
        assert list(d["shape"]) == [2, 336, 80 if name == "scores" else 4], (name, d["shape"])
    assert onnx_utils.io_shapes(model) == {"images": [2, 3, 128, 128], "scores": [2, 336, 80],
                                           "boxes": [2, 336, 4]}
    assert {p.key: p.value for p in model.metadata_props}["route"] == "tf"
    ops = onnx_utils.op_counts(model)
    assert ops["Transpose"] <= 6 and ops["BatchNormalization"] == 0
    path = onnx_utils.save(model, tmp_path / "ns_tf.onnx")
    onnx_utils.check(path)

    x = golden_input()
    scores, boxes = ort_run(path, x)
    golden = np.load(golden_path("models", "Ns_b2_128x128.npz"))
    np.testing.assert_allclose(scores, golden["head.scores"], rtol=1e-4, atol=1e-4)
    assert_boxes_close(boxes, golden["head.boxes"], 5e-3)
    ref = common.run_jax(common.raw_fn(dm), x)
    assert_scores_close(scores, ref[0])
    assert_boxes_close(boxes, ref[1], 5e-3)

    # OpenVINO reads the .tflite itself too (f32 hint)
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()
    compiled = ov.Core().compile_model(str(tflite), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled({0: x})
    by_shape = {tuple(res[o].shape): np.asarray(res[o]) for o in compiled.outputs}
    assert_scores_close(by_shape[(2, 336, 80)], ref[0])     # TFLite names: StatefulPartitionedCall:k
    assert_boxes_close(by_shape[(2, 336, 4)], ref[1], 5e-3)


def test_tf2onnx_optimizer_pass_on_a_jax2onnx_graph():
    """onnx_utils.optimize_tf2onnx (optional cross-check pass): same outputs, Transposes pushed."""
    from test_export_tools import ort_out, tiny_net_onnx
    _, raw = tiny_net_onnx()
    opt = onnx_utils.optimize_tf2onnx(raw)
    onnx_utils.check(opt)
    assert onnx_utils.count_transposes(opt) < onnx_utils.count_transposes(raw)
    x = np.random.default_rng(5).normal(size=(1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(ort_out(opt, x), ort_out(raw, x), atol=1e-5)
