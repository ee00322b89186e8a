"""ONNX graph utilities for the export routes (TF-free unless a tf2onnx pass is asked for).

* ``fix_value_info``      — drop jax2onnx's stale NHWC ``value_info`` and re-infer shapes (TOOLCHAIN §2c
                             gotcha 2: without it ``check_model(full_check=True)`` fails).
* ``check``               — ``onnx.checker.check_model(full_check=True)``.
* ``prune_dead_nodes``    — remove nodes/initializers that no graph output depends on.
* ``rename_value``        — rename a tensor everywhere (inputs, outputs, node I/O, value_info).
* ``op_counts`` / ``count_transposes`` — graph statistics for reports and tests.
* ``optimize_ort``        — ONNX Runtime's *basic* (standard-ops-only) optimiser run offline: constant
                             folding, Conv+Mul/Add fusion and the transpose optimiser that cancels
                             jax2onnx's NHWC<->NCHW pairs. The result is plain ONNX (default domain only).
* ``optimize_tf2onnx``    — tf2onnx's optimiser (needs TensorFlow, opset <= 18); optional cross-check.
* ``save`` / ``load``     — single-file save (external data only above 2 GB), written to a
                             temporary name and renamed: an interrupted export leaves no half file.
* ``ort_refusals`` / ``check_runs`` — onnxruntime's refusal of a graph (an op without a kernel at
                             that opset, ...) as one user-facing error line.
"""
from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from pathlib import Path

import onnx

from damo_jax.errors import UserError, write_failed


class OnnxRuntimeRefused(UserError, RuntimeError):
    """onnxruntime cannot load or run a graph (e.g. an op it has no kernel for at that opset)."""


@contextlib.contextmanager
def ort_refusals(what: str, hint: str = ""):
    """Turn onnxruntime's load errors inside the block into :class:`OnnxRuntimeRefused`
    ``"<what>: onnxruntime <version> cannot run it (<reason>)<hint>"``."""
    from damo_jax.inference.backends import onnxruntime_errors, runtime_error_reason
    try:
        yield
    except onnxruntime_errors() as e:
        if isinstance(e, UserError):
            raise
        import onnxruntime as ort
        raise OnnxRuntimeRefused(f"{what}: onnxruntime {ort.__version__} cannot run it "
                                 f"({runtime_error_reason(e)}){hint}") from e


def check_runs(model: onnx.ModelProto, what: str, hint: str = "") -> None:
    """:class:`OnnxRuntimeRefused` unless onnxruntime (CPU) builds a session for ``model``."""
    import onnxruntime as ort
    if model.ByteSize() > 2_000_000_000:
        return                                   # not serialisable in one proto; checked on load
    with ort_refusals(what, hint):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

def load(path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist")
    return onnx.load(str(path))


def check_readable(path, flag: str = "--onnx") -> None:
    """:class:`~damo_jax.errors.UserError` naming ``flag`` when the existing file ``path`` is not a
    readable ONNX model (random bytes, a truncated export, an image, an empty graph): one error
    line instead of the converter's protobuf / OpenVINO traceback."""
    from google.protobuf.message import DecodeError

    from damo_jax.errors import UserError
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise UserError(f"{flag} {path}: cannot be read as an ONNX model ({e})") from e
    if not len(model.graph.node) or not len(model.graph.input):
        raise UserError(f"{flag} {path}: cannot be read as an ONNX model (no graph: "
                        f"{len(model.graph.node)} nodes, {len(model.graph.input)} inputs)")


def save(model: onnx.ModelProto, path) -> Path:
    """Save as one file (external data only when the proto would exceed protobuf's 2 GB)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > 2_000_000_000
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        onnx.save_model(model, str(tmp), save_as_external_data=large,
                        all_tensors_to_one_file=True, location=path.name + ".data")
        os.replace(tmp, path)
    except OSError as e:                 # disk full, no permission: one line, nothing left behind
        raise write_failed(path, e) from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def fix_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every intermediate ``value_info`` by freshly inferred shapes (strict inference)."""
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                             data_prop=True)


def check(model_or_path) -> None:
    """Full ONNX checker (raises ``onnx.checker.ValidationError`` with the reason)."""
    model = load(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    onnx.checker.check_model(model, full_check=True)


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    """Node count per op type of the top-level graph."""
    return collections.Counter(n.op_type for n in model.graph.node)


def count_transposes(model: onnx.ModelProto) -> int:
    return op_counts(model)["Transpose"]


def graph_summary(model: onnx.ModelProto) -> dict:
    """``{"nodes", "transposes", "convs", "ops": {op: count}}`` for reports."""
    ops = op_counts(model)
    return {"nodes": sum(ops.values()), "transposes": ops["Transpose"], "convs": ops["Conv"],
            "ops": dict(sorted(ops.items()))}


def prune_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers that do not contribute to any graph output (in place)."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # sub-graphs (If/Loop) read outer-scope names
                for sub in list(attr.g and [attr.g]) + list(attr.graphs):
                    needed.update(i for n in sub.node for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    vis = [v for v in g.value_info if v.name in needed]
    del g.value_info[:]
    g.value_info.extend(vis)
    return model


def rename_value(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    """Rename tensor ``old`` to ``new`` in graph inputs/outputs, node I/O and value_info (in place)."""
    g = model.graph
    taken = {v.name for v in list(g.input) + list(g.output) + list(g.value_info)}
    taken |= {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
    if old == new:
        return model
    if old not in taken:
        raise KeyError(f"rename_value: no tensor named {old!r} in the graph")
    if new in taken:
        raise ValueError(f"rename_value: a tensor named {new!r} already exists")
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.name == old:
            v.name = new
    for t in g.initializer:
        if t.name == old:
            t.name = new
    for n in g.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
    return model


def set_io_names(model: onnx.ModelProto, inputs=None, outputs=None) -> onnx.ModelProto:
    """Rename graph inputs / outputs positionally (``None`` keeps a name). Outputs that must take a
    name currently used by another output are renamed through a temporary name."""
    g = model.graph
    for values, names in ((g.input, inputs), (g.output, outputs)):
        if names is None:
            continue
        if len(names) != len(values):
            raise ValueError(f"set_io_names: {len(names)} names for {len(values)} graph values "
                             f"({[v.name for v in values]})")
        targets = [(v.name, n) for v, n in zip(values, names) if n is not None and n != v.name]
        for i, (old, _) in enumerate(targets):
            rename_value(model, old, f"__tmp_io_{i}")
        for i, (_, new) in enumerate(targets):
            rename_value(model, f"__tmp_io_{i}", new)
    return model


def io_shapes(model: onnx.ModelProto) -> dict:
    """``{name: [dim or dim_param]}`` of the graph inputs and outputs."""
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return {v.name: dims(v) for v in list(model.graph.input) + list(model.graph.output)}


def optimize_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's basic-level graph optimisation, saved back to plain ONNX.

    Basic level only uses semantics-preserving rewrites into standard ONNX ops (no contrib ops,
    no hardware-specific layouts), so the file stays portable to OpenVINO and TensorRT.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        save(model, src)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(dst)
        opts.log_severity_level = 3
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        out = onnx.load(str(dst))
    foreign = {n.domain for n in out.graph.node} - {"", "ai.onnx"}
    if foreign:
        raise RuntimeError(f"optimize_ort produced non-standard op domains {sorted(foreign)}")
    # ORT drops the IR/producer info it does not need; keep the original metadata.
    out.ir_version = model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return fix_value_info(out)


def optimize_tf2onnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """tf2onnx's optimiser (transpose push-down, BN/Conv folding). Imports TensorFlow."""
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset > 18:
        raise ValueError(f"optimize_tf2onnx: tf2onnx 1.17 supports opset <= 18, the model has {opset}")
    from tf2onnx.graph import GraphUtil

    out = GraphUtil.optimize_model_proto(model)
    out.ir_version = min(out.ir_version, model.ir_version) or model.ir_version
    return fix_value_info(out)
