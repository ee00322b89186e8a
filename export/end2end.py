"""Append the official eval post-processing (SPEC §2.14) to a raw ``(scores, boxes)`` ONNX graph.

The appended sub-graph uses only standard ONNX ops that onnxruntime, OpenVINO and TensorRT's ONNX
parser all implement (Transpose, NonMaxSuppression, GatherND, ScatterND, TopK, GatherElements, ...):

1. ``scores`` (N, A, C) -> (N, C, A); ``NonMaxSuppression(boxes, scores_nca, K, iou, conf)`` runs NMS
   **per (image, class)** (the op's native class dimension = class-aware NMS), keeps a candidate only
   when its score is ``> conf`` (strict) and suppresses a candidate whose IoU with a kept box of the
   same class is ``> iou`` — exactly torchvision ``batched_nms`` after the official ``score > conf``
   filter. Equal scores are taken lower anchor index first (measured in onnxruntime 1.31 and
   OpenVINO 2026.4). At most K boxes per class (enough: the final output keeps K overall).
2. The kept scores are scattered into a dense (N, A, C) matrix filled with -1, flattened to
   (N, A*C) (padded with K more -1 columns so TopK works for any size), and ``TopK(K)`` picks the K
   best kept (anchor, class) pairs per image in descending score order (ties: lower anchor, then
   lower class first — the official candidate order). The output therefore **never has more than
   K rows** (upstream bug #146).
3. Outputs: ``num_dets`` (N, 1) int32, ``boxes`` (N, K, 4) x1y1x2y2, ``scores`` (N, K),
   ``labels`` (N, K) int32 (0-based class index). Rows past ``num_dets`` are 0 / 0 / -1.

Semantic notes (documented, not bugs of this graph): onnxruntime suppresses on IoU ``> iou`` as the
official code; OpenVINO's NMS suppresses on ``>=`` — the two differ only when an IoU equals the
threshold exactly in float32. NonMaxSuppression normalises flipped corners; DAMO-YOLO boxes always
have x1 <= x2, y1 <= y2 (distances are >= 0), so this never matters here.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from damo_jax.export import onnx_utils

from damo_jax.errors import ConfigError, InputPathError

#: detections kept per image by the appended NMS when not told otherwise (``--topk``)
DEFAULT_TOPK = 100

E2E_OUTPUTS = ("num_dets", "boxes", "scores", "labels")
_P = "e2e_"  # prefix of every appended tensor / node name
CONF_INIT = _P + "conf_thre"   # the initializer holding the NMS score threshold


class _Builder:
    """Collects nodes and initializers (constants are initializers: TensorRT's parser requires
    NonMaxSuppression thresholds, TopK's K and Slice/Unsqueeze axes to be initializers)."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value), _P + name))
        return _P + name

    def node(self, op, inputs, name, n_out=1, **attrs):
        outs = [_P + name] if n_out == 1 else [f"{_P}{name}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=_P + name + "_node",
                                           **attrs))
        return outs[0] if n_out == 1 else outs


def validate_thresholds(topk: int, conf_thre: float, iou_thre: float) -> None:
    """The rules of ``damo-jax predict`` (:func:`damo_jax.errors.is_probability` /
    :func:`~damo_jax.errors.is_count`): ``topk`` an integer >= 1, both thresholds in [0, 1]
    (a score threshold of 1 keeps nothing: scores are sigmoids and the test is strict >)."""
    from damo_jax.errors import is_count, is_probability
    if not is_count(topk):
        raise ConfigError(f"--topk {topk!r}: the end2end detection cap must be an integer >= 1")
    if not is_probability(conf_thre):
        raise ConfigError(f"--conf {conf_thre!r}: the end2end score threshold must be a number in [0, 1]")
    if not is_probability(iou_thre):
        raise ConfigError(f"--iou {iou_thre!r}: the end2end IoU threshold must be a number in [0, 1]")


def nms_nodes(scores: str, boxes: str, *, topk: int, conf_thre: float, iou_thre: float):
    """The NMS sub-graph reading tensors ``scores`` (N,A,C) and ``boxes`` (N,A,4).

    Returns ``(nodes, initializers, {output_name: tensor_name})`` for the four outputs.
    """
    validate_thresholds(topk, conf_thre, iou_thre)
    k = int(topk)
    n = _Builder()
    scores_nca = n.node("Transpose", [scores], "scores_nca", perm=[0, 2, 1])
    selected = n.node(                                             # (S, 3) [image, class, anchor]
        "NonMaxSuppression",
        [boxes, scores_nca, n.const("max_per_class", np.array([k], np.int64)),
         n.const("iou_thre", np.array([iou_thre], np.float32)),
         n.const("conf_thre", np.array([conf_thre], np.float32))],
        "selected", center_point_box=0)
    # Reorder to [image, anchor, class] so the dense matrix is (N, A, C) and ties in TopK go
    # anchor-major, class-minor: the candidate order of the official / damo_jax.ops.nms code.
    # Split + Concat, not a Gather of the columns: OpenVINO 2026.4 computed another network for the
    # Gather form once saved as IR and read back (tests/test_export_models.py, IR end2end test).
    img_col, cls_col, anchor_col = n.node(
        "Split", [selected, n.const("split3", np.array([1, 1, 1], np.int64))],
        "selected_cols", n_out=3, axis=1)
    selected = n.node("Concat", [img_col, anchor_col, cls_col], "selected_bac", axis=1)
    kept_scores = n.node("GatherND", [scores, selected], "kept_scores")         # (S,)
    nac_shape = n.node("Shape", [scores], "nac_shape")
    minus_one = numpy_helper.from_array(np.array([-1.0], np.float32), _P + "minus_one")
    dense = n.node("ConstantOfShape", [nac_shape], "dense_fill", value=minus_one)
    dense = n.node("ScatterND", [dense, selected, kept_scores], "dense_kept")  # (N, A, C)
    flat = n.node("Reshape", [dense, n.const("flat_shape", np.array([0, -1], np.int64))],
                  "flat")                                                         # (N, A*C)
    batch = n.node("Slice", [nac_shape, n.const("zero1", np.array([0], np.int64)),
                             n.const("one1", np.array([1], np.int64))], "batch")
    pad_shape = n.node("Concat", [batch, n.const("k1", np.array([k], np.int64))],
                       "pad_shape", axis=0)
    pad = n.node("ConstantOfShape", [pad_shape], "pad_fill", value=minus_one)
    flat = n.node("Concat", [flat, pad], "flat_padded", axis=1)               # (N, A*C + K)
    top_scores, top_index = n.node("TopK", [flat, n.const("k", np.array([k], np.int64))],
                                   "topk", n_out=2, axis=1, largest=1, sorted=1)
    valid = n.node("Greater", [top_scores, n.const("minus_half", np.array(-0.5, np.float32))],
                   "valid")                                                       # (N, K) bool
    num_anchors = n.node("Slice", [nac_shape, n.const("one1b", np.array([1], np.int64)),
                                   n.const("two1", np.array([2], np.int64))], "num_anchors")
    num_classes = n.node("Slice", [nac_shape, n.const("two1b", np.array([2], np.int64)),
                                   n.const("three1", np.array([3], np.int64))], "num_classes")
    label = n.node("Mod", [top_index, num_classes], "label_i64", fmod=0)
    anchor = n.node("Div", [top_index, num_classes], "anchor_raw")
    anchor = n.node("Mod", [anchor, num_anchors], "anchor", fmod=0)  # padding columns stay < A
    index = n.node("Unsqueeze", [anchor, n.const("axis2", np.array([2], np.int64))],
                   "anchor_3d")
    index = n.node("Expand", [index, n.const("expand4", np.array([1, 1, 4], np.int64))],
                   "anchor_x4")
    top_boxes = n.node("GatherElements", [boxes, index], "top_boxes", axis=1)  # (N, K, 4)
    valid3 = n.node("Unsqueeze", [valid, n.const("axis2b", np.array([2], np.int64))],
                    "valid_3d")
    zero = n.const("zero_f", np.array(0.0, np.float32))
    out = {
        "boxes": n.node("Where", [valid3, top_boxes, zero], "out_boxes"),
        "scores": n.node("Where", [valid, top_scores, zero], "out_scores"),
    }
    label = n.node("Cast", [label], "label_i32", to=TensorProto.INT32)
    minus_one_i = n.const("minus_one_i", np.array(-1, np.int32))
    out["labels"] = n.node("Where", [valid, label, minus_one_i], "out_labels")
    count = n.node("Cast", [valid], "valid_i32", to=TensorProto.INT32)
    out["num_dets"] = n.node("ReduceSum", [count, n.const("axis1", np.array([1], np.int64))],
                             "out_num_dets", keepdims=1)
    return n.nodes, n.inits, out


def append_end2end(model: onnx.ModelProto, *, topk: int = DEFAULT_TOPK, conf_thre: float = 0.05,
                   iou_thre: float = 0.7, scores: str = "scores",
                   boxes: str = "boxes") -> onnx.ModelProto:
    """Return a new model whose outputs are ``num_dets, boxes, scores, labels`` (see module doc).

    ``model`` must output ``scores`` (N, A, C) and ``boxes`` (N, A, 4) under the given names.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    names = [o.name for o in model.graph.output]
    for need in (scores, boxes):
        if need not in names:
            raise ConfigError(f"append_end2end: the model has no output {need!r} (outputs: {names})")
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        raise ConfigError(f"append_end2end needs opset >= 13, the model has {opset}")
    onnx_utils.rename_value(model, scores, "raw_scores")
    onnx_utils.rename_value(model, boxes, "raw_boxes")
    nodes, inits, out = nms_nodes("raw_scores", "raw_boxes", topk=topk, conf_thre=conf_thre,
                           iou_thre=iou_thre)
    # The four outputs get their public names through Identity nodes.
    for public in E2E_OUTPUTS:
        nodes.append(helper.make_node("Identity", [out[public]], [public], name=_P + public))
    g = model.graph
    g.node.extend(nodes)
    g.initializer.extend(inits)
    del g.output[:]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    n_dim = batch.dim_param or batch.dim_value or "N"
    g.output.extend([
        helper.make_tensor_value_info("num_dets", TensorProto.INT32, [n_dim, 1]),
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [n_dim, topk, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [n_dim, topk]),
        helper.make_tensor_value_info("labels", TensorProto.INT32, [n_dim, topk]),
    ])
    model.metadata_props.append(onnx.StringStringEntryProto(
        key="end2end", value=f"topk={topk},conf_thre={conf_thre},iou_thre={iou_thre}"))
    return onnx_utils.fix_value_info(model)
