"""FP16 ONNX for strongly typed runtimes (TensorRT >= 11 has no ``BuilderFlag.FP16``).

``to_fp16(model)`` converts the convolutional trunk to float16 and keeps the interface in float32:

* a node runs in FP16 when its op is in ``FP16_OPS`` **and** it is a Conv or feeds (transitively)
  a Conv — i.e. the backbone and neck and the head convolutions; the head's post-processing after
  the last convs (sigmoid, DFL softmax/integral, box decode in pixels) and any appended NMS stay
  FP32 (boxes in FP16 would be quantised to 0.5 px above 512 px);
* float initializers read by FP16 nodes get FP16 copies; ``Cast`` nodes are inserted where a
  tensor crosses between the two domains; ``Resize`` keeps its FP32 ``roi``/``scales`` inputs;
* graph inputs and outputs keep their names and FP32 types.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from damo_jax.export import onnx_utils

FP16_OPS = frozenset({
    "Conv", "Relu", "Sigmoid", "Mul", "Add", "Sub", "Div", "Concat", "MaxPool", "Resize",
    "Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Gather", "SpaceToDepth", "Expand",
    "Identity", "Pad", "Split", "Flatten", "Clip", "HardSigmoid", "HardSwish", "Neg", "Exp",
    "Reciprocal", "AveragePool", "GlobalAveragePool", "BatchNormalization"})
FLOAT32_INPUTS = {"Resize": {1, 2}}     # roi, scales must stay tensor(float)
_F32, _F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _constants_to_initializers(g) -> None:
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)


def _conv_trunk(nodes) -> set:
    """Indices of nodes that are Convs or ancestors of a Conv (protobuf wrappers have no stable
    identity, so everything is keyed by position)."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.output}
    trunk, stack = set(), [k for k, n in enumerate(nodes) if n.op_type == "Conv"]
    while stack:
        k = stack.pop()
        if k in trunk:
            continue
        trunk.add(k)
        stack.extend(producer[i] for i in nodes[k].input if i in producer)
    return trunk


def _elem_types(model) -> dict:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 copy of ``model`` (see the module docstring); input/output types unchanged."""
    model = onnx_utils.fix_value_info(onnx.ModelProto.FromString(model.SerializeToString()))
    g = model.graph
    _constants_to_initializers(g)
    types = _elem_types(model)
    nodes = list(g.node)
    trunk = _conv_trunk(nodes)
    inits = {t.name: t for t in g.initializer}
    half_copies: dict = {}
    casts: dict = {}
    half: set = set()                       # float tensors that are FP16 after the rewrite
    new_nodes = []

    def as_half_init(name):
        if name not in half_copies:
            arr = numpy_helper.to_array(inits[name]).astype(np.float16)
            half_copies[name] = numpy_helper.from_array(arr, name + "__fp16")
            g.initializer.append(half_copies[name])
        return half_copies[name].name

    def cast(name, to_half):
        key = (name, to_half)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to_half else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], name=out,
                                              to=_F16 if to_half else _F32))
            casts[key] = out
        return casts[key]

    for index, node in enumerate(nodes):
        is_half = node.op_type in FP16_OPS and index in trunk
        keep32 = FLOAT32_INPUTS.get(node.op_type, set())
        for k, name in enumerate(node.input):
            if not name or types.get(name) not in (_F32, _F16):
                continue
            want_half = is_half and k not in keep32
            if name in inits and types[name] == _F32:
                if want_half:
                    node.input[k] = as_half_init(name)
            elif want_half != (name in half):
                node.input[k] = cast(name, want_half)
        if is_half:
            half.update(o for o in node.output if types.get(o) == _F32)
        new_nodes.append(node)
    outputs = {o.name for o in g.output}
    for name in sorted(outputs & half):     # FP16-produced graph outputs: cast back under the name
        inner = name + "__fp16_out"
        for n in new_nodes:
            n.output[:] = [inner if o == name else o for o in n.output]
            n.input[:] = [inner if i == name else i for i in n.input]
        new_nodes.append(helper.make_node("Cast", [inner], [name], name=name + "__to_fp32",
                                          to=_F32))
    del g.node[:]
    g.node.extend(new_nodes)
    onnx_utils.prune_dead_nodes(model)
    model.metadata_props.append(onnx.StringStringEntryProto(key="precision", value="fp16-trunk"))
    model = onnx_utils.fix_value_info(model)
    onnx_utils.check(model)
    return model


def convert_file(src, dst) -> Path:
    """``to_fp16`` on a file."""
    return onnx_utils.save(to_fp16(onnx_utils.load(src)), dst)
