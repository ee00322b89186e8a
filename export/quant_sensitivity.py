"""Which layers to keep in float: per-layer INT8 sensitivity, MEASURED on calibration images.

Method ("all INT8 but one layer"): start from the fully quantised QDQ ONNX model (every
quantisable node's input activations and weights go through QuantizeLinear/DequantizeLinear; the
head's post-processing is float in every INT8 file: :func:`damo_jax.export.int8.quantize_onnx`). A
layer is a Conv with its activation nodes (:func:`conv_groups`: SiLU = Sigmoid + Mul, ReLU). For
each layer a copy of that model is made in which only its nodes read their FLOAT inputs, weight
and bias (the tensors of the FP32 model; the now unused Q/DQ nodes are left for onnxruntime to
prune). No re-calibration is needed, so one measurement costs one onnxruntime session and a
forward pass per calibration image.

Error of a model on the calibration images, against the FP32 outputs (raw export outputs:
``scores`` (B, A, C) after sigmoid, ``boxes`` (B, A, 4) x1y1x2y2 input pixels)::

    err = mean((s_q - s_f)^2) / mean(s_f^2)                            # score NMSE
        + mean over the 100 highest-scoring FP32 anchors per image of
          ((b_q - b_f) / max(w_f, h_f, 1))^2                            # box error, box-relative

The sensitivity of Conv ``i`` is ``err(all INT8) - err(all INT8 but i)``: how much of the
quantisation error goes away when that one layer stays float. The ``top_k`` most sensitive Convs
are the mixed-precision model's float layers (:func:`float_layer_nodes` lists their nodes).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import onnx

log = logging.getLogger("damo_jax.export")

TOP_ANCHORS = 100


def output_error(ref: Sequence[tuple], got: Sequence[tuple]) -> float:
    """The error above, averaged over images; ``ref`` / ``got``: per-image (scores, boxes)."""
    score_err, box_err = [], []
    for (s_f, b_f), (s_q, b_q) in zip(ref, got):
        s_f, b_f = np.asarray(s_f, np.float64), np.asarray(b_f, np.float64)
        s_q, b_q = np.asarray(s_q, np.float64), np.asarray(b_q, np.float64)
        score_err.append(np.mean((s_q - s_f) ** 2) / max(np.mean(s_f ** 2), 1e-12))
        best = np.argsort(-s_f.reshape(-1, s_f.shape[-1]).max(-1))[:TOP_ANCHORS]
        bf, bq = b_f.reshape(-1, 4)[best], b_q.reshape(-1, 4)[best]
        size = np.maximum(np.maximum(bf[:, 2] - bf[:, 0], bf[:, 3] - bf[:, 1]), 1.0)
        box_err.append(np.mean(((bq - bf) / size[:, None]) ** 2))
    return float(np.mean(score_err) + np.mean(box_err))


def run_onnx(model: onnx.ModelProto | str, images: Sequence[np.ndarray], threads: int | None = None):
    """[(scores, boxes)] of a raw-output ONNX model (proto or path) on NCHW images (1,3,H,W)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out = []
    for x in images:
        result = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x})))
        out.append((result["scores"], result["boxes"]))
    return out


def conv_names(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes, in graph order."""
    return [n.name for n in model.graph.node if n.op_type == "Conv"]


ACTIVATIONS = ("Sigmoid", "Mul", "Relu", "Clip", "HardSigmoid")


def conv_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """``{conv name: [conv, its activation nodes]}``: a Conv with the element-wise nodes that read
    only its output (SiLU = Sigmoid + Mul, ReLU), the unit kept float together."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    groups = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        members, frontier = [node.name], [node.output[0]]
        allowed = {node.output[0]}
        while frontier:
            tensor = frontier.pop()
            for user in consumers.get(tensor, []):
                if (user.op_type in ACTIVATIONS and user.name not in members
                        and all(i in allowed or not i for i in user.input
                                if i not in {t.name for t in model.graph.initializer})):
                    members.append(user.name)
                    allowed.add(user.output[0])
                    frontier.append(user.output[0])
        groups[node.name] = members
    return groups


def float_layers(qdq: onnx.ModelProto, fp32: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Copy of the QDQ model in which the nodes ``names`` (any op type; ONNX names are kept by
    the quantiser) read the FP32 model's float inputs instead of their dequantised ones."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    fp_nodes = {n.name: n for n in fp32.graph.node}
    fp_inits = {t.name: t for t in fp32.graph.initializer}
    have = ({t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
            | {o for n in model.graph.node for o in n.output})  # every name defined already
    wanted = set(names)
    for node in model.graph.node:
        if node.name not in wanted or node.name not in fp_nodes:
            continue
        source = fp_nodes[node.name]
        del node.input[:]
        node.input.extend(source.input)
        for name in source.input:
            if name in fp_inits and name not in have:
                model.graph.initializer.append(fp_inits[name])
                have.add(name)
    _float_outputs(model, wanted)
    return model


def _float_outputs(model: onnx.ModelProto, wanted: set) -> None:
    """Graph outputs quantised after a float node (``P -> Q -> DQ -> output``): the DQ becomes an
    Identity of P's float output."""
    producer = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        dq = producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        source = producer.get(q.input[0])
        if source is not None and source.name in wanted:
            dq.op_type = "Identity"
            dq.domain = ""
            del dq.attribute[:]
            del dq.input[:]
            dq.input.append(q.input[0])


def rank_layers(qdq_path, fp32_path, images: Sequence[np.ndarray], *,
                candidates: Sequence[str] | None = None, threads: int | None = None) -> dict:
    """Measure every candidate Conv (default: all). Returns ``{"error_fp32": 0.0,
    "error_int8": e_all, "layers": [(name, sensitivity), ...] most sensitive first}``."""
    qdq, fp32 = onnx.load(str(qdq_path)), onnx.load(str(fp32_path))
    ref = run_onnx(fp32, images, threads)
    base = output_error(ref, run_onnx(qdq, images, threads))
    groups = conv_groups(fp32)
    names = list(candidates) if candidates is not None else list(groups)
    scores = []
    for index, name in enumerate(names):
        err = output_error(ref, run_onnx(float_layers(qdq, fp32, groups[name]), images, threads))
        scores.append((name, base - err))
        if (index + 1) % 10 == 0:
            log.info("sensitivity: %d / %d layers measured", index + 1, len(names))
    scores.sort(key=lambda item: -item[1])
    return {"error_int8": base, "layers": scores}


def float_layer_nodes(fp32: onnx.ModelProto, layers: Sequence[str]) -> list[str]:
    """All node names (Conv + activations) of the ranked ``layers`` (Conv names)."""
    groups = conv_groups(fp32)
    return [name for layer in layers for name in groups[layer]]
