"""Layout clean-up passes for jax2onnx graphs (pure ONNX, verified rewrites).

jax2onnx writes every NHWC op of the Flax model literally and wraps each Conv/MaxPool in a pair of
NHWC<->NCHW Transposes. onnxruntime's basic optimiser (``onnx_utils.optimize_ort``) cancels most of
them, but not the ones around the neck's nearest 2x upsample: ``jnp.repeat`` lowers to a chain of
``Reshape``/``Expand``/``Transpose`` in NHWC that the transpose optimiser cannot push through.

``fold_upsample_chains`` finds every maximal chain of those layout-only ops (single consumer,
constant shapes) from a 4-D tensor X to a 4-D tensor Y, **evaluates the chain in numpy on a probe
tensor of distinct values**, and only if the result equals a nearest s-times upsample (``np.repeat``
over H and W) of X — X and Y each in NCHW or NHWC — replaces the chain by one NCHW ``Resize``
(nearest, asymmetric, floor: ``out[i] = in[i // s]``, exact) with a Transpose before / after it
where X / Y are NHWC (the next ORT pass cancels those against their neighbours). Any chain that
does something else is left untouched.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_LAYOUT_OPS = ("Reshape", "Expand", "Transpose")


def _constants(graph) -> dict:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return values


def _static_shapes(model) -> dict:
    shapes = {}
    for v in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = tuple(d.dim_value for d in dims)
    return shapes


def _apply(node, x, consts):
    """numpy semantics of the three layout ops (Reshape with 0 / -1, bidirectional Expand)."""
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        return np.transpose(x, perm)
    shape = [int(s) for s in consts[node.input[1]]]
    if node.op_type == "Reshape":
        allowzero = next((a.i for a in node.attribute if a.name == "allowzero"), 0)
        if not allowzero:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return np.reshape(x, shape)
    return np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(shape)))


def _chain_ending_at(node, producer, consumers, consts):
    """Walk back from ``node`` through single-consumer layout ops; returns (start_tensor, nodes)."""
    chain = [node]
    while True:
        src = chain[-1].input[0]
        prev = producer.get(src)
        if (prev is None or prev.op_type not in _LAYOUT_OPS or len(consumers.get(src, ())) != 1
                or any(i not in consts for i in prev.input[1:])):
            return src, chain[::-1]
        chain.append(prev)


_NCHW, _NHWC, _TO_NCHW = (0, 1, 2, 3), (0, 2, 3, 1), (0, 3, 1, 2)


def _match_upsample(chain, consts, x_shape, y_shape):
    """``(s, in_perm, out_perm)`` when the chain computes ``transpose(repeat_s(X_nchw), out_perm)``
    where ``X_nchw = transpose(X, in_perm)`` (X given in NCHW or NHWC), else None."""
    if len(x_shape) != 4 or len(y_shape) != 4:
        return None
    probe = np.arange(np.prod(x_shape), dtype=np.float64).reshape(x_shape)
    out = probe
    for n in chain:
        out = _apply(n, out, consts)
    if out.shape != tuple(y_shape):
        return None
    for in_perm in (_NCHW, _TO_NCHW):
        x_nchw = np.transpose(probe, in_perm)
        for out_perm in (_NCHW, _NHWC):
            y_nchw_shape = tuple(y_shape[out_perm.index(i)] for i in range(4))
            if y_nchw_shape[:2] != x_nchw.shape[:2]:
                continue
            sh, rh = divmod(y_nchw_shape[2], x_nchw.shape[2])
            sw, rw = divmod(y_nchw_shape[3], x_nchw.shape[3])
            if rh or rw or sh != sw or sh < 2:
                continue
            if np.array_equal(out, np.transpose(x_nchw.repeat(sh, 2).repeat(sh, 3), out_perm)):
                return sh, in_perm, out_perm
    return None


def fold_upsample_chains(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace verified NCHW nearest-upsample chains by ``Resize``. Returns (model, #replaced).

    Needs static shapes in ``value_info`` (run ``onnx_utils.fix_value_info`` first).
    """
    g = model.graph
    consts = _constants(g)
    shapes = _static_shapes(model)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    nodes = list(g.node)       # protobuf wrappers have no stable identity: key by position
    position = {o: k for k, n in enumerate(nodes) for o in n.output}
    replaced, drop, resize_at = 0, set(), {}
    for node in nodes:
        if (node.op_type not in _LAYOUT_OPS or position[node.output[0]] in drop
                or any(i not in consts for i in node.input[1:])):
            continue
        y = node.output[0]
        nxt = consumers.get(y, [])
        if y not in outputs and len(nxt) == 1 and nxt[0].op_type in _LAYOUT_OPS:
            continue  # not the end of a maximal chain
        x, chain = _chain_ending_at(node, producer, consumers, consts)
        if len(chain) < 2 or x not in shapes or y not in shapes:
            continue
        match = _match_upsample(chain, consts, shapes[x], shapes[y])
        if match is None:
            continue
        s, in_perm, out_perm = match
        drop.update(position[n.output[0]] for n in chain)
        tag = f"upsample{replaced}"
        scales = numpy_helper.from_array(np.array([1, 1, s, s], np.float32), f"{tag}_scales")
        g.initializer.append(scales)
        new = []
        if in_perm != _NCHW:   # the chain started in NHWC: go to NCHW first
            new.append(helper.make_node("Transpose", [x], [f"{tag}_in_nchw"],
                                        name=f"{tag}_to_nchw", perm=list(in_perm)))
            x = f"{tag}_in_nchw"
        up = y if out_perm == _NCHW else f"{tag}_nchw"
        new.append(helper.make_node(
            "Resize", [x, "", scales.name], [up], name=f"{tag}_resize",
            mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"))
        if out_perm != _NCHW:  # the chain ended in NHWC: keep that layout for its consumer
            new.append(helper.make_node("Transpose", [up], [y], name=f"{tag}_to_nhwc",
                                        perm=list(out_perm)))
        resize_at[position[chain[-1].output[0]]] = new
        replaced += 1
    if replaced:
        new_nodes = []
        for k, n in enumerate(nodes):
            if k in resize_at:
                new_nodes.extend(resize_at[k])
            elif k not in drop:
                new_nodes.append(n)
        del g.node[:]
        g.node.extend(new_nodes)
    return model, replaced
