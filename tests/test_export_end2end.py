"""The appended end-to-end NMS graph (export/end2end.py) against the official semantics.

A pass-through ONNX graph (inputs = raw scores/boxes) gets the NMS nodes appended; its outputs are
compared with a plain numpy implementation of SPEC §2.14 (strict score > conf, class-aware greedy
NMS suppressing IoU > iou, descending score, ties by (anchor, class) index, hard cap K) and with
``damo_jax.ops.nms.multiclass_nms``, in onnxruntime and OpenVINO (f32).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from damo_jax.export import end2end, onnx_utils


def _iou_one_to_many(box, others):
    """torchvision IoU in float64 (0/0 -> NaN never suppresses)."""
    wh = np.clip(np.minimum(box[2:], others[:, 2:]) - np.maximum(box[:2], others[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    union = np.prod(box[2:] - box[:2]) + np.prod(others[:, 2:] - others[:, :2], axis=1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


def reference_nms(scores, boxes, conf, iou, topk):
    """Official per-image post-processing (SPEC §2.14) in numpy, float64 IoU.

    Candidates in row-major (anchor, class) order, stable sort by descending score, greedy NMS
    per class (a class's first ``topk`` kept boxes are all that can reach the output)."""
    out = []
    for s, b in zip(scores, boxes):
        anchors, classes = np.nonzero(s > conf)
        order = np.argsort(-s[anchors, classes], kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        kept = []                                                   # candidate indices
        for c in np.unique(classes):
            members = np.nonzero(classes == c)[0]
            members = members[np.argsort(rank[members], kind="stable")]
            kept_boxes = np.zeros((0, 4))
            count = 0
            for m in members:
                box = b[anchors[m]].astype(np.float64)
                if len(kept_boxes) and (_iou_one_to_many(box, kept_boxes) > iou).any():
                    continue
                kept.append(m)
                kept_boxes = np.vstack([kept_boxes, box])
                count += 1
                if count == topk:
                    break
        kept = sorted(kept, key=lambda m: rank[m])[:topk]
        out.append(dict(boxes=b[anchors[kept]].reshape(-1, 4),
                        scores=s[anchors[kept], classes[kept]],
                        labels=classes[kept].astype(np.int32)))
    return out


def passthrough(num_classes, batch="N", anchors="A", opset=17):
    g = helper.make_graph(
        [helper.make_node("Identity", ["s_in"], ["scores"]),
         helper.make_node("Identity", ["b_in"], ["boxes"])], "raw",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [batch, anchors, num_classes]),
         helper.make_tensor_value_info("b_in", TensorProto.FLOAT, [batch, anchors, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, anchors, num_classes]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, anchors, 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def random_case(seed, batch, anchors, classes, *, power=3.0, clustered=True):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 120, (batch, 6, 2))
    pick = rng.integers(0, 6, (batch, anchors))
    xy = (np.take_along_axis(centres, pick[..., None], 1) if clustered
          else rng.uniform(0, 120, (batch, anchors, 2))) + rng.normal(0, 4, (batch, anchors, 2))
    wh = rng.uniform(8, 40, (batch, anchors, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], -1).astype(np.float32)
    scores = (rng.uniform(0, 1, (batch, anchors, classes)) ** power).astype(np.float32)
    return scores, boxes


def run_ort(model, scores, boxes):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["num_dets", "boxes", "scores", "labels"], {"s_in": scores, "b_in": boxes})


def run_openvino(model, scores, boxes, tmp_path):
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()
    path = onnx_utils.save(model, tmp_path / "e2e.onnx")
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled({"s_in": scores, "b_in": boxes})
    return [np.asarray(res[compiled.output(n)]) for n in ("num_dets", "boxes", "scores", "labels")]


def assert_matches_reference(outputs, ref, topk):
    num, boxes, scores, labels = outputs
    assert num.shape == (len(ref), 1) and num.dtype == np.int32
    assert boxes.shape == (len(ref), topk, 4) and scores.shape == (len(ref), topk)
    assert labels.dtype == np.int32
    for i, r in enumerate(ref):
        n = int(num[i, 0])
        assert n == len(r["scores"]) <= topk
        np.testing.assert_array_equal(labels[i, :n], r["labels"])
        np.testing.assert_allclose(scores[i, :n], r["scores"], rtol=0, atol=0)
        np.testing.assert_allclose(boxes[i, :n], r["boxes"], rtol=0, atol=1e-3)
        assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all()
        assert (boxes[i, n:] == 0).all()


@pytest.mark.parametrize("seed,batch,anchors,classes,conf,iou,topk", [
    (0, 3, 60, 7, 0.3, 0.5, 20),     # many candidates: the K cap binds
    (1, 2, 40, 3, 0.6, 0.7, 50),     # fewer detections than K: padding rows
    (2, 1, 30, 80, 0.9, 0.45, 100),  # 80 classes, very few candidates
    (3, 2, 25, 4, 0.0, 0.65, 8),     # conf 0: every positive score is a candidate
])
def test_end2end_graph_matches_reference_in_onnxruntime(seed, batch, anchors, classes, conf, iou,
                                                        topk):
    model = end2end.append_end2end(passthrough(classes), topk=topk, conf_thre=conf, iou_thre=iou)
    onnx.checker.check_model(model, full_check=True)
    scores, boxes = random_case(seed, batch, anchors, classes)
    ref = reference_nms(scores, boxes, conf, iou, topk)
    assert_matches_reference(run_ort(model, scores, boxes), ref, topk)


def test_end2end_cap_is_respected_with_thousands_of_candidates():
    """Upstream bug #146 returned more than topk rows; here K is structural."""
    model = end2end.append_end2end(passthrough(5), topk=100, conf_thre=0.0, iou_thre=0.99)
    scores, boxes = random_case(7, 2, 900, 5, power=1.0, clustered=False)
    num, b, s, labels = run_ort(model, scores, boxes)
    assert b.shape == (2, 100, 4) and (num[:, 0] == 100).all()
    ref = reference_nms(scores, boxes, 0.0, 0.99, 100)
    assert_matches_reference((num, b, s, labels), ref, 100)


def test_end2end_matches_damo_jax_nms_and_ties_go_anchor_major():
    import jax.numpy as jnp

    from damo_jax.ops.nms import multiclass_nms
    scores, boxes = random_case(11, 2, 50, 6)
    scores[0, 3, :] = 0.8          # one anchor, equal scores in every class
    scores[1, 10:14, 2] = 0.7      # equal scores, same class, overlapping boxes
    boxes[1, 10:14] = boxes[1, 10]
    model = end2end.append_end2end(passthrough(6), topk=30, conf_thre=0.2, iou_thre=0.6)
    num, b, s, labels = run_ort(model, scores, boxes)
    det = multiclass_nms(jnp.asarray(scores), jnp.asarray(boxes), conf_thre=0.2, iou_thre=0.6,
                         max_dets=30, pre_nms_topk=50 * 6)
    np.testing.assert_array_equal(num[:, 0], np.asarray(det["num_dets"]))
    np.testing.assert_array_equal(labels, np.asarray(det["labels"]))
    np.testing.assert_array_equal(s, np.asarray(det["scores"]))
    np.testing.assert_allclose(b, np.asarray(det["boxes"]), atol=1e-3)
    assert_matches_reference((num, b, s, labels), reference_nms(scores, boxes, 0.2, 0.6, 30), 30)


def test_end2end_strict_thresholds():
    """score == conf is dropped; IoU == iou is kept (suppression needs IoU > iou) in ORT."""
    model = end2end.append_end2end(passthrough(1), topk=10, conf_thre=0.5, iou_thre=0.5)
    boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60]]], np.float32)
    scores = np.array([[[0.9], [0.8], [0.5]]], np.float32)      # IoU(0, 1) = 0.5 exactly
    num, _, s, _ = run_ort(model, scores, boxes)
    assert int(num[0, 0]) == 2 and s[0, :2].tolist() == pytest.approx([0.9, 0.8])


def test_end2end_in_openvino_matches_reference(tmp_path):
    model = end2end.append_end2end(passthrough(7), topk=20, conf_thre=0.3, iou_thre=0.5)
    scores, boxes = random_case(0, 3, 60, 7)
    ref = reference_nms(scores, boxes, 0.3, 0.5, 20)
    assert_matches_reference(run_openvino(model, scores, boxes, tmp_path), ref, 20)


def test_end2end_static_shapes_and_errors():
    model = end2end.append_end2end(passthrough(3, batch=2, anchors=10), topk=4)
    shapes = onnx_utils.io_shapes(model)
    assert shapes["num_dets"] == [2, 1] and shapes["boxes"] == [2, 4, 4]
    assert shapes["labels"] == [2, 4]
    scores, boxes = random_case(5, 2, 10, 3, power=0.2)
    assert run_ort(model, scores, boxes)[1].shape == (2, 4, 4)
    with pytest.raises(ValueError, match="topk"):
        end2end.append_end2end(passthrough(3), topk=0)
    with pytest.raises(ValueError, match="conf"):
        end2end.append_end2end(passthrough(3), conf_thre=1.5)
    with pytest.raises(ValueError, match="no output .nope_scores."):
        end2end.append_end2end(passthrough(3), scores="nope_scores", boxes="boxes")


def test_openvino_convert_refuses_an_ir_that_computes_something_else(tmp_path, monkeypatch):
    """``to_openvino.convert`` reads the written IR back and compares it with the ONNX file on a
    probe batch; an IR that computes something else (here: the converter made to save another
    model, as OpenVINO 2026.4 effectively did for one form of the end2end graph) is an error and
    is not kept. The genuine conversion of the same file and of its end2end form passes."""
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()

    from damo_jax.export import to_openvino
    from test_predict import write_handmade_onnx
    raw = onnx.load(str(write_handmade_onnx(tmp_path / "m.onnx")))
    e2e = onnx_utils.save(end2end.append_end2end(raw, topk=3, conf_thre=0.5, iou_thre=0.5),
                          tmp_path / "e2e.onnx")
    for path in (tmp_path / "m.onnx", e2e):
        assert to_openvino.convert(path, tmp_path / f"{path.stem}.xml").is_file()
    other = onnx.load(str(tmp_path / "m.onnx"))
    for init in other.graph.initializer:
        if init.name == "scores_c":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0.5, init.name))
    onnx.save(other, str(tmp_path / "other.onnx"))
    real_convert = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda path, *a, **k: real_convert(
        str(tmp_path / "other.onnx") if str(path).endswith("m.onnx") else path, *a, **k))
    out = tmp_path / "bad.xml"
    with pytest.raises(to_openvino.ExportMismatch, match=r"bad\.xml: the OpenVINO IR .*output 'scores'"):
        to_openvino.convert(tmp_path / "m.onnx", out)
    assert not out.exists() and not out.with_suffix(".bin").exists()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]     # checked under a temp name
    # an ONNX file onnxruntime cannot run (Swish at opset 24 in onnxruntime 1.31): one error line,
    # no IR (it died in a traceback after writing an unchecked IR)
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
    import onnxruntime as ort

    def no_kernel(*args, **kwargs):
        raise ort_state.NotImplemented("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find "
                                       "an implementation for Swish(24) node")
    monkeypatch.setattr(ort, "InferenceSession", no_kernel)
    with pytest.raises(onnx_utils.OnnxRuntimeRefused, match=r"--onnx .*e2e\.onnx: onnxruntime .* "
                       r"cannot run it \(9 : NOT_IMPLEMENTED .*Swish\(24\).*lower --opset"):
        to_openvino.convert(e2e, tmp_path / "refused.xml")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".xml", ".bin")) == [
        "e2e.bin", "e2e.xml", "m.bin", "m.xml"]


def test_openvino_conversion_sends_no_telemetry(tmp_path):
    """``import openvino`` and ``convert_model`` posted usage telemetry to Google Analytics from a
    forked child (Python warned that forking JAX's multithreaded process may deadlock). Through
    ``import_openvino`` neither ``openvino_telemetry`` is loaded nor the process forked."""
    import json
    import subprocess
    import sys
    from test_predict import write_handmade_onnx
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx")
    code = f"""
import json, os, sys
forks = []
real_fork = os.fork
os.fork = lambda: forks.append(1) or real_fork()
import jax.numpy as jnp; jnp.ones(2).block_until_ready()      # a multithreaded JAX process
from damo_jax.export import to_openvino
to_openvino.convert({str(onnx_file)!r}, {str(tmp_path / 'm.xml')!r})
print(json.dumps({{"forks": len(forks), "telemetry": sys.modules.get("openvino_telemetry") is not None}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in __import__("os").environ.items() if k != "CI"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"forks": 0, "telemetry": False}
    assert "os.fork() was called" not in r.stderr
