"""oneDNN convolutions for XLA:CPU train graphs (``model.grad_impl = "onednn"``) and for the dense
k x k convs of folded inference graphs (``model.dense_impl = "onednn"``).

XLA:CPU (jax 0.10.2) runs a dense 3x3 convolution's forward, input gradient and kernel gradient at
about half the speed of oneDNN, the library PyTorch uses on CPU (measured per shape on an AMD EPYC
Zen 4, batch 8, 64->64 at 80x80: XLA 36 / 31 / 47-52 ms, oneDNN 17.5 / 17.4 / 27 ms;
docs/bench_train.md). This module runs those three ops through oneDNN's C API (``libdnnl.so.3``
from the ``onednn-cpu-gomp`` wheel, loaded with ``ctypes``; no build step) and exposes them to JAX
as XLA FFI custom calls (XLA hands over its own buffers, no copies, and the compiled step can be
stored in the persistent compilation cache) inside a ``jax.custom_vjp`` (:func:`conv`). When an
input needs no gradient (the image into the stem), only the kernel gradient is computed.

Handlers: the native one (``onednn_ffi.c``, compiled on first use by :mod:`onednn_native` with the
system C compiler) runs each call without Python; Python only builds a conv shape's primitives the
first time it is met. Without a C compiler the typed FFI handler written with ``ctypes`` below
takes over (a warning says so): it runs Python per call and so needs the GIL, and any Python
thread running beside the model then slows every conv call (an S@320 step 0.8 -> 7.2 s beside one
busy thread, docs/bench_train.md §0r). ``DAMO_JAX_ONEDNN_HANDLER=auto|native|python`` chooses.

Scope and contract:

* float32, 2-D, NHWC activations / HWIO kernels, explicit padding, no dilation, dense
  (``groups == 1``) or depthwise (groups == input == output channels, kernel (kh, kw, 1, C)), any
  kernel size and stride (:func:`supported`). The same function as ``lax.conv_general_dilated``
  up to float32 summation order (relative difference ~1e-6; tests/test_onednn.py).
* Single-device CPU processes only (``conv_grad.resolve_grad_impl`` / ``resolve_dense_impl``): the
  custom call has no partitioning rule for a ``Mesh``; exported graphs never use it (exporters set
  ``dense_impl = "conv"``).
* All oneDNN calls are serialised by one lock (the native handler's mutex once it is loaded;
  oneDNN itself uses all cores through OpenMP).
  Primitives are created once per shape and cached. Results are deterministic for a fixed
  ``OMP_NUM_THREADS``.

Layouts: ``x`` (B, H, W, C) NHWC, ``w`` (kh, kw, C, D) HWIO, ``y`` (B, Ho, Wo, D) NHWC. oneDNN picks
its own (blocked) kernel layout (``format_tag_any``); kernels are reordered from/to HWIO per call.

Winograd: :func:`conv` with ``algo="winograd"`` runs a 3x3 stride-1 padding-1 dense conv (any
channel counts, :func:`winograd_eligible`) as Winograd F(2x2, 3x3) in ``winograd_ffi.c`` (x86-64
with AVX2 + FMA, native handler only; :func:`winograd_available`) -- forward, input and kernel gradient. Which
convs use it is ``model.conv3x3_impl`` (``conv_grad.resolve_conv3x3_impl``; by default every one
large enough, :func:`winograd_min_pixels`). Its GEMMs use AVX-512 where oneDNN does
(:func:`onednn_has_avx512`, honouring ``ONEDNN_MAX_CPU_ISA``), else AVX2; oneDNN 3.2 has no AVX2
Winograd, and against its direct kernels this is 1.2-1.8x faster per conv with AVX2, 0.9-1.5x with
AVX-512 (docs/bench_train.md §0zn).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
from ctypes import byref, c_int, c_int64, c_void_p

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

# oneDNN 3.x C API constants (dnnl_types.h; stable within major version 3)
_F32 = 3
_TAG_ANY = 1
_ENGINE_CPU = 1
_STREAM_DEFAULT = 1
_CONV_DIRECT = 1
_FORWARD_TRAINING = 64
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS = 1, 17, 33
_ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS = 129, 145, 161
_Q_SRC_MD, _Q_DIFF_SRC_MD, _Q_WEIGHTS_MD, _Q_DIFF_WEIGHTS_MD = 129, 130, 131, 132
_Q_DST_MD, _Q_DIFF_DST_MD = 133, 134
_Q_SCRATCHPAD_MD = 136
_ARG_SCRATCHPAD = 80
_SCRATCHPAD_MODE_USER = 1
_ALLOCATE = c_void_p(ctypes.c_size_t(-1).value)  # DNNL_MEMORY_ALLOCATE
_Dims = c_int64 * 12


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", c_int), ("memory", c_void_p)]


class _Version(ctypes.Structure):
    _fields_ = [("major", c_int), ("minor", c_int), ("patch", c_int)]


_LOCK = threading.Lock()        # library loading
_STATE: dict = {}
log = logging.getLogger(__name__)


def _candidate_paths():
    env = os.environ.get("DAMO_JAX_ONEDNN_LIB")
    if env:
        yield env
        return
    try:
        from importlib import metadata
        dist = metadata.distribution("onednn-cpu-gomp")
        for f in dist.files or ():
            if f.name.startswith("libdnnl.so"):
                yield os.path.realpath(str(dist.locate_file(f)))
    except Exception:  # noqa: BLE001 - not installed: try the usual prefix
        pass
    yield os.path.join(sys.prefix, "lib", "libdnnl.so.3")


def _load():
    """(lib, engine, stream) or raises OSError with the reason."""
    if sys.platform != "linux":
        raise OSError("oneDNN route is only wired for Linux")
    errors = []
    for path in _candidate_paths():
        if not os.path.exists(path):
            errors.append(f"{path}: missing")
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        lib.dnnl_version.restype = ctypes.POINTER(_Version)
        lib.dnnl_primitive_desc_query_md.restype = c_void_p
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        ver = lib.dnnl_version().contents
        if ver.major != 3:
            errors.append(f"{path}: oneDNN {ver.major}.{ver.minor}, need 3.x")
            continue
        engine, stream = c_void_p(), c_void_p()
        _check(lib.dnnl_engine_create(byref(engine), _ENGINE_CPU, 0), "engine_create")
        _check(lib.dnnl_stream_create(byref(stream), engine, _STREAM_DEFAULT), "stream_create")
        return lib, engine, stream, f"{path} (oneDNN {ver.major}.{ver.minor}.{ver.patch})"
    raise OSError("libdnnl.so.3 not found: " + "; ".join(errors))


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"oneDNN {what} failed with status {status}")


def _runtime():
    with _LOCK:
        if "lib" not in _STATE and "error" not in _STATE:
            try:
                _STATE["lib"], _STATE["engine"], _STATE["stream"], _STATE["where"] = _load()
            except (OSError, RuntimeError, AttributeError) as e:
                _STATE["error"] = str(e)
    if "error" in _STATE:
        raise OSError(_STATE["error"])
    return _STATE["lib"], _STATE["engine"], _STATE["stream"]


def available() -> bool:
    """True when ``libdnnl.so.3`` (oneDNN 3.x) loads; :func:`unavailable_reason` says why not."""
    try:
        _runtime()
        return True
    except OSError:
        return False


def unavailable_reason() -> str | None:
    return None if available() else _STATE.get("error")


# ----------------------------------------------------------------------------- primitives
def _out_hw(in_hw, kernel_hw, strides, padding) -> tuple:
    """(Ho, Wo) of a conv with explicit ((top, bottom), (left, right)) padding, no dilation."""
    return tuple((n + lo + hi - k) // s + 1
                 for n, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, padding))


def _md_nhwc(lib, n, c, h, w):
    md = c_void_p()
    _check(lib.dnnl_memory_desc_create_with_strides(
        byref(md), 4, _Dims(n, c, h, w), _F32, _Dims(h * w * c, 1, w * c, c)), "md(nhwc)")
    return md


def _weight_dims(x_shape, w_shape) -> tuple:
    """oneDNN's kernel dims of an NHWC ``x`` / HWIO ``w`` conv: (o, i, kh, kw), or (groups,
    o / groups, i / groups, kh, kw) when ``w``'s input channels are a fraction of ``x``'s."""
    kh, kw, ig, o = w_shape
    groups = x_shape[3] // ig
    return (o, ig, kh, kw) if groups == 1 else (groups, o // groups, ig, kh, kw)


def _md_hwio(lib, x_shape, w_shape):
    """The user kernel ``w`` (HWIO, row-major) described with :func:`_weight_dims`' dims; the
    strides of (groups, o / groups, i / groups, kh, kw), the group axis dropped when dense."""
    dims = _weight_dims(x_shape, w_shape)
    kh, kw, ig, o = w_shape
    strides = (dims[1], 1, o, kw * ig * o, ig * o)[5 - len(dims):]   # grouped: dims[1] = o / groups
    md = c_void_p()
    _check(lib.dnnl_memory_desc_create_with_strides(
        byref(md), len(dims), _Dims(*dims), _F32, _Dims(*strides)), "md(hwio)")
    return md


def _md_any(lib, dims):
    md = c_void_p()
    _check(lib.dnnl_memory_desc_create_with_tag(byref(md), len(dims), _Dims(*dims), _F32,
                                                _TAG_ANY), "md(any)")
    return md


def _user_scratchpad_attr(lib):
    """Primitive attributes with ``scratchpad_mode = user``: the caller passes every primitive's
    scratchpad at execution (``DNNL_ARG_SCRATCHPAD``). Why not oneDNN's default ("library"): the
    implementations that use its *global* scratchpad (the GEMM-based convolutions, e.g. the
    AVX2 kernel gradient of a depthwise conv on a map smaller than its kernel) keep it per thread,
    allocated in the thread that created the primitive, and read the executing thread's copy at
    run time. XLA runs our custom calls on any of its threads, so such a primitive got a NULL
    (or another primitive's, too small) im2col buffer: a segfault in an AVX2-capped Ns training
    step (docs/bench_train.md §0zl). One shared buffer, grown as needed, serves every primitive
    because oneDNN calls are serialised (the execution lock)."""
    attr = _STATE.get("attr")
    if attr is None:
        attr = c_void_p()
        _check(lib.dnnl_primitive_attr_create(byref(attr)), "primitive_attr_create")
        _check(lib.dnnl_primitive_attr_set_scratchpad_mode(attr, _SCRATCHPAD_MODE_USER),
               "primitive_attr_set_scratchpad_mode")
        _STATE["attr"] = attr
    return attr


def _scratchpad_md(lib, pd):
    """``(md, bytes)`` of a primitive descriptor's scratchpad (``(None, 0)`` when it needs none)."""
    md = c_void_p(lib.dnnl_primitive_desc_query_md(pd, _Q_SCRATCHPAD_MD, 0))
    size = int(lib.dnnl_memory_desc_get_size(md)) if md.value else 0
    return (md, size) if size else (None, 0)


class _Reorder:
    """A reorder primitive between two memory descriptors (``attr``: primitive attributes, e.g.
    :func:`_user_scratchpad_attr`; None: oneDNN's defaults)."""

    def __init__(self, lib, engine, src_md, dst_md, attr=None):
        self.pd = c_void_p()
        _check(lib.dnnl_reorder_primitive_desc_create(byref(self.pd), src_md, engine, dst_md,
                                                      engine, attr), "reorder_pd")
        self.prim = c_void_p()
        _check(lib.dnnl_primitive_create(byref(self.prim), self.pd), "reorder")


def _conv_pds(lib, engine, x_shape, w_shape, strides, padding, activations="nhwc", attr=None):
    """Primitive descriptors of one conv: ``({"fwd", "bwd_data", "bwd_weights"} -> pd, y_shape)``.

    ``x_shape`` NHWC, ``w_shape`` HWIO, ``padding`` ((top, bottom), (left, right)), no dilation;
    activations NHWC float32, kernel in oneDNN's preferred layout (``format_tag_any``); the
    backward descriptors are hinted by the forward-training one. ``y_shape`` is NHWC. Each pd
    holds oneDNN's first-choice implementation (``benchmarks/onednn_impls.py`` walks the others).
    ``activations="any"`` lets oneDNN choose the activations' layout too (its blocked ones, as a
    network kept in that layout would run; only ``benchmarks/onednn_impls.py --layouts`` asks).
    ``attr``: primitive attributes for all three (damo_jax passes :func:`_user_scratchpad_attr`).
    """
    n, h, w, c = x_shape
    kh, kw, _, d = w_shape
    (pt, pb), (pl, pr) = padding
    ho, wo = _out_hw((h, w), (kh, kw), strides, padding)
    if activations == "any":
        src, dst = _md_any(lib, (n, c, h, w)), _md_any(lib, (n, d, ho, wo))
    else:
        src, dst = _md_nhwc(lib, n, c, h, w), _md_nhwc(lib, n, d, ho, wo)
    w_any = _md_any(lib, _weight_dims(x_shape, w_shape))
    st, dl = _Dims(*strides), _Dims(0, 0)
    lo, hi = _Dims(pt, pl), _Dims(pb, pr)
    fwd_pd, bwd_d_pd, bwd_w_pd = c_void_p(), c_void_p(), c_void_p()
    _check(lib.dnnl_convolution_forward_primitive_desc_create(
        byref(fwd_pd), engine, _FORWARD_TRAINING, _CONV_DIRECT, src, w_any, None, dst, st, dl,
        lo, hi, attr), "conv_fwd_pd")
    _check(lib.dnnl_convolution_backward_data_primitive_desc_create(
        byref(bwd_d_pd), engine, _CONV_DIRECT, src, w_any, dst, st, dl, lo, hi, fwd_pd, attr),
        "conv_bwd_data_pd")
    _check(lib.dnnl_convolution_backward_weights_primitive_desc_create(
        byref(bwd_w_pd), engine, _CONV_DIRECT, src, w_any, None, dst, st, dl, lo, hi, fwd_pd,
        attr), "conv_bwd_weights_pd")
    return {"fwd": fwd_pd, "bwd_data": bwd_d_pd, "bwd_weights": bwd_w_pd}, (n, ho, wo, d)


_PRIMS = ("to_fwd", "fwd", "to_bwd", "bwd_data", "bwd_weights", "from_dw")


class _Plan(ctypes.Structure):
    """One conv shape's primitives as the native handler reads them (``plan_t`` in
    ``onednn_ffi.c``, same field order); ``md_sp_*``: each primitive's scratchpad descriptor
    (NULL: none), ``sp_bytes`` the largest."""
    _fields_ = [("y_dims", c_int64 * 4)] + [(n, c_void_p) for n in (
        *_PRIMS,
        "md_w_user", "md_src", "md_dst", "md_diff_dst_d", "md_diff_src", "md_src_w", "md_diff_dst_w",
        "w_fwd", "w_bwd", "dw_int", *(f"md_sp_{k}" for k in _PRIMS))] + [("sp_bytes", c_int64)]


class _ConvPrimitives:
    """Forward, backward-data and backward-weights primitives of one conv shape, plus the kernel
    reorders (HWIO <-> oneDNN's chosen layout) and oneDNN-owned kernel buffers; ``plan`` holds
    the same handles for the native handler."""

    def __init__(self, x_shape, w_shape, strides, padding):
        lib, engine, _ = _runtime()
        attr = _user_scratchpad_attr(lib)
        self.w_user = _md_hwio(lib, x_shape, w_shape)
        self.pds, self.y_shape = _conv_pds(lib, engine, x_shape, w_shape, strides, padding,
                                           attr=attr)
        fwd_pd, bwd_d_pd, bwd_w_pd = self.pds["fwd"], self.pds["bwd_data"], self.pds["bwd_weights"]
        self.prims = {}
        for k, pd in self.pds.items():
            self.prims[k] = c_void_p()
            _check(lib.dnnl_primitive_create(byref(self.prims[k]), pd), f"{k} primitive")

        def md(pd, q):
            return c_void_p(lib.dnnl_primitive_desc_query_md(pd, q, 0))
        self.mds = {"src": md(fwd_pd, _Q_SRC_MD), "dst": md(fwd_pd, _Q_DST_MD),
                    "diff_src": md(bwd_d_pd, _Q_DIFF_SRC_MD),
                    "diff_dst_d": md(bwd_d_pd, _Q_DIFF_DST_MD),
                    "src_w": md(bwd_w_pd, _Q_SRC_MD), "diff_dst_w": md(bwd_w_pd, _Q_DIFF_DST_MD)}
        # kernels in oneDNN's layout: owned buffers, filled / drained by reorders
        self.w_fwd = self._owned(lib, engine, md(fwd_pd, _Q_WEIGHTS_MD))
        self.w_bwd = self._owned(lib, engine, md(bwd_d_pd, _Q_WEIGHTS_MD))
        self.dw_int = self._owned(lib, engine, md(bwd_w_pd, _Q_DIFF_WEIGHTS_MD))
        self.to_fwd = _Reorder(lib, engine, self.w_user, md(fwd_pd, _Q_WEIGHTS_MD), attr)
        self.to_bwd = _Reorder(lib, engine, self.w_user, md(bwd_d_pd, _Q_WEIGHTS_MD), attr)
        self.from_dw = _Reorder(lib, engine, md(bwd_w_pd, _Q_DIFF_WEIGHTS_MD), self.w_user, attr)
        # each primitive's scratchpad (user mode): a descriptor over the shared buffer per call
        self.sp = {k: _scratchpad_md(lib, pd) for k, pd in (
            ("to_fwd", self.to_fwd.pd), ("fwd", fwd_pd), ("to_bwd", self.to_bwd.pd),
            ("bwd_data", bwd_d_pd), ("bwd_weights", bwd_w_pd), ("from_dw", self.from_dw.pd))}
        self.sp_bytes = max(size for _, size in self.sp.values())
        m = self.mds
        self.plan = _Plan((c_int64 * 4)(*self.y_shape), *(h.value for h in (
            self.to_fwd.prim, self.prims["fwd"], self.to_bwd.prim, self.prims["bwd_data"],
            self.prims["bwd_weights"], self.from_dw.prim, self.w_user, m["src"], m["dst"],
            m["diff_dst_d"], m["diff_src"], m["src_w"], m["diff_dst_w"], self.w_fwd, self.w_bwd,
            self.dw_int)), *(md.value if md is not None else None
                             for md, _ in (self.sp[k] for k in _PRIMS)), self.sp_bytes)

    @staticmethod
    def _owned(lib, engine, md):
        mem = c_void_p()
        _check(lib.dnnl_memory_create(byref(mem), md, engine, _ALLOCATE), "memory(owned)")
        return mem


@functools.lru_cache(maxsize=None)
def _primitives(x_shape, w_shape, strides, padding) -> _ConvPrimitives:
    return _ConvPrimitives(x_shape, w_shape, strides, padding)


def _execute(lib, stream, prim, args):
    arr = (_ExecArg * len(args))(*(_ExecArg(a, m) for a, m in args))
    _check(lib.dnnl_primitive_execute(prim, stream, len(args), arr), "execute")


class _Session:
    """One serialised round of oneDNN calls: ``wrap`` makes memory objects over numpy arrays (no
    copy), ``run`` executes primitives; on exit waits for the stream and frees the objects."""

    def __enter__(self):
        self.lib, self.engine, self.stream = _runtime()
        self.mems = []
        self._release = _exec_lock_acquire()
        return self

    def wrap(self, md, array):
        """A oneDNN memory object over ``array`` (a handler ``_View`` or a C-contiguous float32
        numpy array); no copy."""
        return self._wrap_ptr(md, array.ptr if isinstance(array, _View) else array.ctypes.data)

    def run(self, prim, args, sp=(None, 0)):
        """Execute ``prim`` with ``args`` and, when it has one (``sp`` = ``(md, bytes)`` from
        :func:`_scratchpad_md`), its scratchpad over the process's shared buffer."""
        md, size = sp
        if md is not None:
            args = [*args, (_ARG_SCRATCHPAD, self._wrap_ptr(md, _scratch_buffer(size)))]
        _execute(self.lib, self.stream, prim, args)

    def _wrap_ptr(self, md, ptr):
        mem = c_void_p()
        _check(self.lib.dnnl_memory_create(byref(mem), md, self.engine, c_void_p(ptr)), "memory")
        self.mems.append(mem)
        return mem

    def __exit__(self, exc_type, *_):
        try:
            if exc_type is None:
                _check(self.lib.dnnl_stream_wait(self.stream), "stream_wait")
        finally:
            for m in self.mems:
                self.lib.dnnl_memory_destroy(m)
            self._release()
        return False


_EXEC_LOCK = threading.Lock()
_SCRATCH: dict = {"bytes": 0}


def _scratch_buffer(size: int) -> int:
    """Address of the Python handler's scratchpad buffer (page-aligned, at least ``size`` bytes),
    grown when needed; only called with the execution lock held (``_Session``), so no primitive
    is using it while it is replaced. The native handler keeps its own (onednn_ffi.c)."""
    if size > _SCRATCH["bytes"]:
        buf = np.empty(size + 4096, np.uint8)
        _SCRATCH.update(buf=buf, bytes=size, ptr=(buf.ctypes.data + 4095) // 4096 * 4096)
    return _SCRATCH["ptr"]


def _exec_lock_acquire():
    """Serialise oneDNN execution: the native handler's mutex once it is loaded (shared with its C
    calls), else a Python lock. Returns the matching release function."""
    native = _STATE.get("native")
    if native is not None:
        native.damo_onednn_lock()      # CDLL call: releases the GIL while it blocks
        return native.damo_onednn_unlock
    _EXEC_LOCK.acquire()
    return _EXEC_LOCK.release


def _run_forward(x, w, y, strides, padding):
    """``y[...] = conv(x, w)``; all C-contiguous float32 arrays (NHWC, HWIO, NHWC)."""
    p = _primitives(x.shape, w.shape, tuple(strides), tuple(map(tuple, padding)))
    if y.shape != p.y_shape:
        raise ValueError(f"output shape {y.shape} != {p.y_shape}")
    with _Session() as ses:
        ses.run(p.to_fwd.prim, [(_ARG_SRC, ses.wrap(p.w_user, w)), (_ARG_DST, p.w_fwd)],
                p.sp["to_fwd"])
        ses.run(p.prims["fwd"], [(_ARG_SRC, ses.wrap(p.mds["src"], x)), (_ARG_WEIGHTS, p.w_fwd),
                                 (_ARG_DST, ses.wrap(p.mds["dst"], y))], p.sp["fwd"])


def _run_backward(x, w, g, dx, dw, strides, padding):
    """``dx[...], dw[...]`` = gradients of ``sum(conv(x, w) * g)``; C-contiguous float32
    (``dx=None``: the kernel gradient only)."""
    p = _primitives(x.shape, w.shape, tuple(strides), tuple(map(tuple, padding)))
    dx_shape = None if dx is None else dx.shape
    if g.shape != p.y_shape or dx_shape not in (None, x.shape) or dw.shape != w.shape:
        raise ValueError(f"shapes x {x.shape} w {w.shape} g {g.shape} dx {dx_shape} dw {dw.shape}")
    with _Session() as ses:
        if dx is not None:
            ses.run(p.to_bwd.prim, [(_ARG_SRC, ses.wrap(p.w_user, w)), (_ARG_DST, p.w_bwd)],
                    p.sp["to_bwd"])
            ses.run(p.prims["bwd_data"], [(_ARG_DIFF_DST, ses.wrap(p.mds["diff_dst_d"], g)),
                                          (_ARG_WEIGHTS, p.w_bwd),
                                          (_ARG_DIFF_SRC, ses.wrap(p.mds["diff_src"], dx))],
                    p.sp["bwd_data"])
        ses.run(p.prims["bwd_weights"], [(_ARG_SRC, ses.wrap(p.mds["src_w"], x)),
                                         (_ARG_DIFF_DST, ses.wrap(p.mds["diff_dst_w"], g)),
                                         (_ARG_DIFF_WEIGHTS, p.dw_int)], p.sp["bwd_weights"])
        ses.run(p.from_dw.prim, [(_ARG_SRC, p.dw_int), (_ARG_DST, ses.wrap(p.w_user, dw))],
                p.sp["from_dw"])


# ----------------------------------------------------------------------------- XLA FFI handler
# A typed XLA FFI handler (api_version 1) written with ctypes: XLA passes its own buffers (no
# copies, unlike ``jax.pure_callback``), and a custom call, unlike a host callback, can be stored
# in the persistent compilation cache (train.precompile). Structs: xla/ffi/api/c_api.h.
class _FfiExtBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", c_int), ("next", c_void_p)]


class _FfiApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", c_void_p),
                ("major_version", c_int), ("minor_version", c_int)]


class _FfiMetadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _FfiApiVersion),
                ("traits", ctypes.c_uint32), ("state_type_id", c_int64)]


class _FfiMetadataExt(ctypes.Structure):
    _fields_ = [("extension_base", _FfiExtBase), ("metadata", ctypes.POINTER(_FfiMetadata))]


class _FfiBuffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", c_void_p),
                ("dtype", c_int), ("data", c_void_p), ("rank", c_int64),
                ("dims", ctypes.POINTER(c_int64))]


class _FfiList(ctypes.Structure):   # XLA_FFI_Args / XLA_FFI_Rets
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", c_void_p),
                ("size", c_int64), ("types", ctypes.POINTER(c_int)),
                ("items", ctypes.POINTER(ctypes.POINTER(_FfiBuffer)))]


class _FfiByteSpan(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_char_p), ("len", ctypes.c_size_t)]


class _FfiArray(ctypes.Structure):
    _fields_ = [("dtype", c_int), ("size", ctypes.c_size_t), ("data", ctypes.POINTER(c_int64))]


class _FfiAttrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", c_void_p),
                ("size", c_int64), ("types", ctypes.POINTER(c_int)),
                ("names", ctypes.POINTER(ctypes.POINTER(_FfiByteSpan))),
                ("attrs", ctypes.POINTER(c_void_p))]


class _FfiCallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_FfiExtBase)),
                ("api", c_void_p), ("ctx", c_void_p), ("stage", c_int),
                ("args", _FfiList), ("rets", _FfiList), ("attrs", _FfiAttrs),
                ("future", c_void_p)]


class _FfiErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", c_void_p),
                ("message", ctypes.c_char_p), ("errc", c_int)]


_FFI_HANDLER = ctypes.CFUNCTYPE(c_void_p, ctypes.POINTER(_FfiCallFrame))
_FFI_ERROR_CREATE = ctypes.CFUNCTYPE(c_void_p, ctypes.POINTER(_FfiErrorCreateArgs))
_FFI_F32, _FFI_S64, _FFI_ATTR_ARRAY = 11, 5, 1
_FFI_EXTENSION_METADATA, _FFI_STAGE_EXECUTE, _FFI_ERROR_INTERNAL = 1, 3, 13
_FFI_API_ERROR_CREATE_OFFSET = 48   # XLA_FFI_Api: struct_size, extension_start, api_version (24), internal_api


def _ffi_error(frame, message: str):
    """An XLA_FFI_Error* made by XLA's own XLA_FFI_Error_Create (XLA raises it as the op's error)."""
    fn_ptr = c_void_p.from_address(frame.api + _FFI_API_ERROR_CREATE_OFFSET).value
    args = _FfiErrorCreateArgs(ctypes.sizeof(_FfiErrorCreateArgs), None, message.encode()[:2000],
                               _FFI_ERROR_INTERNAL)
    return _FFI_ERROR_CREATE(fn_ptr)(byref(args))




class _View:
    """A float32 XLA_FFI_Buffer as the ``_run_*`` functions read it: ``shape`` and ``ptr`` (its
    row-major data); ``_Session.wrap`` also takes numpy arrays. A numpy view per buffer cost
    8-17 us, ~100 us per call, 2-4 % of an S@320 step (docs/bench_train.md §0j)."""
    __slots__ = ("shape", "ptr")

    def __init__(self, buf):
        if buf.dtype != _FFI_F32:
            raise TypeError(f"float32 buffer expected, got XLA dtype {buf.dtype}")
        self.shape, self.ptr = tuple(buf.dims[:buf.rank]), buf.data


def _conf(frame) -> tuple:
    attrs = frame.attrs
    for k in range(attrs.size):
        name = attrs.names[k].contents
        if attrs.types[k] == _FFI_ATTR_ARRAY and ctypes.string_at(name.ptr, name.len) == b"conf":
            arr = ctypes.cast(attrs.attrs[k], ctypes.POINTER(_FfiArray)).contents
            if arr.dtype != _FFI_S64 or arr.size != 6:
                break
            sh, sw, pt, pb, pl, pr = (int(arr.data[j]) for j in range(6))
            return (sh, sw), ((pt, pb), (pl, pr))
    raise ValueError("attribute conf (int64[6]: sh, sw, pt, pb, pl, pr) missing")


def _make_handler(body):
    def handler(frame_p):
        frame = frame_p.contents
        ext = frame.extension_start
        if ext and ext.contents.type == _FFI_EXTENSION_METADATA:
            meta = ctypes.cast(ext, ctypes.POINTER(_FfiMetadataExt)).contents.metadata.contents
            meta.api_version.major_version, meta.api_version.minor_version = 0, 1
            meta.traits = 0
            return None
        if frame.stage != _FFI_STAGE_EXECUTE:
            return None
        try:
            ins = [_View(frame.args.items[k].contents) for k in range(frame.args.size)]
            outs = [_View(frame.rets.items[k].contents) for k in range(frame.rets.size)]
            body(ins, outs, *_conf(frame))
            return None
        except Exception as e:  # noqa: BLE001 - reported to XLA as the op's error
            return _ffi_error(frame, f"damo_jax oneDNN conv: {type(e).__name__}: {e}")
    return _FFI_HANDLER(handler)


def _fwd_body(ins, outs, strides, padding):
    x, w = ins
    _run_forward(x, w, outs[0], strides, padding)


def _bwd_body(ins, outs, strides, padding):
    x, w, g = ins
    _run_backward(x, w, g, outs[0], outs[1], strides, padding)


def _bwd_weights_body(ins, outs, strides, padding):
    x, w, g = ins
    _run_backward(x, w, g, None, outs[0], strides, padding)


_TARGETS = {"damo_jax_onednn_conv_fwd": _fwd_body, "damo_jax_onednn_conv_bwd": _bwd_body,
            "damo_jax_onednn_conv_bwd_weights": _bwd_weights_body}
_NATIVE_SYMBOLS = {"damo_jax_onednn_conv_fwd": "damo_onednn_conv_fwd",
                   "damo_jax_onednn_conv_bwd": "damo_onednn_conv_bwd",
                   "damo_jax_onednn_conv_bwd_weights": "damo_onednn_conv_bwd_weights"}
_HANDLERS: dict = {}
_REGISTER_LOCK = threading.Lock()
_MAKE_PLAN = ctypes.CFUNCTYPE(c_void_p, ctypes.POINTER(c_int64))
_PLANS: dict = {}      # id -> _ConvPrimitives handed to the native handler (kept alive)


def _make_plan(key):
    """The native handler's callback on a conv shape it has not met: ``key`` int64[14] = x dims
    (NHWC), w dims (HWIO), conf (sh, sw, pt, pb, pl, pr) -> address of that shape's ``_Plan``
    (kept alive in ``_PLANS``), or NULL after logging the error."""
    try:
        k = [int(key[i]) for i in range(14)]
        p = _primitives(tuple(k[0:4]), tuple(k[4:8]), (k[8], k[9]), ((k[10], k[11]), (k[12], k[13])))
        _PLANS[id(p)] = p     # alive for the process, even if a concurrent miss built a twin
        return ctypes.addressof(p.plan)
    except Exception:  # noqa: BLE001 - reported to XLA as the op's error by the C handler
        log.exception("damo_jax oneDNN conv: building the primitives of shape key %s failed",
                      [int(key[i]) for i in range(14)])
        return None


def _load_native():
    """The native handler library, initialised; None (and why, logged once) when unavailable and
    ``$DAMO_JAX_ONEDNN_HANDLER`` allows the Python handler."""
    from damo_jax.models import onednn_native
    choice = onednn_native.handler_choice()
    if choice == "python":
        return None
    try:
        native = onednn_native.load()
    except OSError as e:
        if choice == "native":
            from damo_jax.errors import ConfigError
            raise ConfigError(f"environment variable {onednn_native.HANDLER_ENV}=native: the native "
                              f"oneDNN handler is unavailable: {e}") from e
        log.warning("oneDNN convs use the Python FFI handler (%s): every conv call then needs the "
                    "GIL, and Python threads running beside the model slow it down", e)
        return None
    lib, engine, stream = _runtime()
    addr = lambda f: ctypes.cast(f, c_void_p)  # noqa: E731
    _STATE["make_plan"] = cb = _MAKE_PLAN(_make_plan)
    native.damo_onednn_init(engine, stream, addr(lib.dnnl_memory_create),
                            addr(lib.dnnl_memory_destroy), addr(lib.dnnl_primitive_execute),
                            addr(lib.dnnl_stream_wait), addr(cb))
    return native


def handler_kind() -> str:
    """``"native"`` or ``"python"``: which FFI handler runs the oneDNN convs of this process
    (registering the targets if that has not happened yet)."""
    _register_targets()
    return "native" if _STATE.get("native") is not None else "python"


def native_plan_calls() -> int:
    """How often the native handler called back into Python (once per new conv shape); 0 with the
    Python handler."""
    native = _STATE.get("native")
    return 0 if native is None else int(native.damo_onednn_plan_calls())


def _register_targets() -> None:
    """Register the three FFI targets with XLA (once per process; before tracing a call): the
    native handlers of ``onednn_ffi.c`` when they load (``onednn_native``), else the ctypes ones."""
    if _HANDLERS:
        return
    with _REGISTER_LOCK:
        if _HANDLERS:
            return
        native = _load_native() if available() else None
        if native is not None:
            _STATE["native"] = native
        for name, body in _TARGETS.items():
            if native is not None:
                _HANDLERS[name] = h = getattr(native, _NATIVE_SYMBOLS[name])
            else:
                _HANDLERS[name] = h = _make_handler(body)
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(h), platform="cpu")
        _STATE["winograd_reason"] = reason = _winograd_missing(native)
        if reason is None:
            # its GEMMs use AVX-512 where oneDNN does (so ONEDNN_MAX_CPU_ISA caps both)
            native.damo_wino_set_avx512.restype = c_int
            _STATE["winograd_avx512"] = bool(native.damo_wino_set_avx512(int(onednn_has_avx512())))
            for name, symbol in _WINO_SYMBOLS.items():
                _HANDLERS[name] = h = getattr(native, symbol)
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(h), platform="cpu")


# ----------------------------------------------------------------------------- Winograd 3x3 (winograd_ffi.c)
_WINO_SYMBOLS = {"damo_jax_wino_conv_fwd": "damo_wino_conv_fwd",
                 "damo_jax_wino_conv_bwd": "damo_wino_conv_bwd",
                 "damo_jax_wino_conv_bwd_weights": "damo_wino_conv_bwd_weights"}
_AVX512_BIT = 0x20   # set in every dnnl_cpu_isa_avx512_* / avx10 value, in no avx2* one (dnnl_types.h)


def _winograd_missing(native) -> str | None:
    """Why the Winograd handlers cannot run in this process (None: they can)."""
    if native is None:
        return ("it needs the native FFI handler (" + (_STATE.get("error") or "the Python handler "
                "runs: no C compiler, or DAMO_JAX_ONEDNN_HANDLER=python") + ")")
    if not hasattr(native, "damo_wino_conv_fwd"):
        from damo_jax.models import onednn_native
        return "the native library was " + "; ".join(onednn_native.BUILD_NOTES or ["built without it"])
    if not native.damo_wino_supported():
        return "this CPU has no AVX2 + FMA (the Winograd kernels are x86-64 AVX2 code)"
    return None


def winograd_available() -> bool:
    """True when the Winograd 3x3 handlers run here (native handler built with OpenMP, x86-64 CPU
    with AVX2 + FMA); :func:`winograd_unavailable_reason` says why not."""
    if not available():
        return False
    _register_targets()
    return _STATE.get("winograd_reason") is None


def winograd_unavailable_reason() -> str | None:
    if not available():
        return unavailable_reason()
    _register_targets()
    return _STATE.get("winograd_reason")


def winograd_min_pixels() -> int:
    """Smallest ``batch * H * W`` routed to Winograd by ``model.conv3x3_impl`` (smaller convs are
    dominated by the per-call kernel transform and stay in oneDNN's direct kernels): 400 with the
    AVX2 GEMM kernels, 3200 with the AVX-512 ones (measured per S@320 shape, docs/bench_train.md
    §0zn: AVX2 wins from 8 x 10 x 10 on, AVX-512 from 8 x 20 x 20)."""
    _register_targets()
    return 3200 if _STATE.get("winograd_avx512") else 400


def onednn_has_avx512() -> bool:
    """Whether oneDNN runs AVX-512 kernels on this CPU (``dnnl_get_effective_cpu_isa``: honours
    ``ONEDNN_MAX_CPU_ISA``)."""
    lib, _, _ = _runtime()
    return bool(int(lib.dnnl_get_effective_cpu_isa()) & _AVX512_BIT)


def winograd_eligible(x, w, strides, padding, groups) -> bool:
    """A conv the Winograd handlers compute: float32, dense 3x3, stride 1, padding 1 on every side
    (any channel counts: the kernels pad them to multiples of 8 internally)."""
    return (x.dtype == jnp.float32 and w.dtype == jnp.float32 and groups == 1
            and tuple(w.shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
            and tuple(map(tuple, padding)) == ((1, 1), (1, 1)) and w.shape[2] == x.shape[3]
            and min(x.shape) > 0 and w.shape[3] > 0)


# ----------------------------------------------------------------------------- JAX
def supported(x, w, strides, padding, groups) -> bool:
    """float32 NHWC/HWIO conv, dense (``groups == 1``) or depthwise (``groups`` == input ==
    output channels), with a valid output (checked by callers for layout and dilation:
    ``conv_grad.supported``)."""
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return False
    if groups != 1 and not (w.shape[2] == 1 and groups == x.shape[3] == w.shape[3]):
        return False
    ho, wo = _out_hw(x.shape[1:3], w.shape[:2], strides, padding)
    return min(min(p) for p in padding) >= 0 and ho > 0 and wo > 0 and x.shape[0] > 0


def _out_struct(x, w, strides, padding):
    ho, wo = _out_hw(x.shape[1:3], w.shape[:2], strides, padding)
    return jax.ShapeDtypeStruct((x.shape[0], ho, wo, w.shape[3]), x.dtype)


def _conf_attr(strides, padding):
    (pt, pb), (pl, pr) = padding
    return np.array([strides[0], strides[1], pt, pb, pl, pr], np.int64)


ALGOS = ("direct", "winograd")


def _target(kind: str, algo: str) -> str:
    return f"damo_jax_{'wino' if algo == 'winograd' else 'onednn'}_conv_{kind}"


def _call_kwargs(strides, padding, algo) -> dict:
    # the Winograd handlers take no attributes (their one conv form is implied by the shapes)
    return {} if algo == "winograd" else {"conf": _conf_attr(strides, padding)}


def _forward_call(x, w, strides, padding, algo="direct"):
    _register_targets()
    return jax.ffi.ffi_call(_target("fwd", algo), _out_struct(x, w, strides, padding),
                            vmap_method="sequential")(x, w, **_call_kwargs(strides, padding, algo))


def conv(x, w, strides, padding, algo: str = "direct"):
    """``lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC/HWIO/NHWC)`` with
    forward, input gradient and kernel gradient computed by oneDNN (XLA FFI custom calls on CPU),
    or, ``algo="winograd"``, by the Winograd F(2x2, 3x3) handlers of ``winograd_ffi.c`` (only for
    :func:`winograd_eligible` convs where :func:`winograd_available`; a ``ValueError`` otherwise).

    x: (B, H, W, C) float32, w: (kh, kw, C, D) float32 (depthwise: (kh, kw, 1, C)),
    strides: (sh, sw),
    padding: ((top, bottom), (left, right)) -> (B, Ho, Wo, D) float32.
    """
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if algo == "winograd":
        if not winograd_eligible(x, w, strides, padding, 1):
            raise ValueError(f"Winograd conv: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, strides "
                             f"{strides}, padding {padding} is not a float32 3x3 stride-1 padding-1 "
                             f"dense conv")
        if not winograd_available():
            raise ValueError(f"Winograd conv unavailable: {winograd_unavailable_reason()}")
    return _conv(x, w, strides, padding, algo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, algo):
    return _forward_call(x, w, strides, padding, algo)


def _conv_fwd(x, w, strides, padding, algo):
    # symbolic_zeros=True: x / w arrive as CustomVJPPrimal(value, perturbed); an input that needs
    # no gradient (the image into the stem) gets no input-gradient computation
    y = _forward_call(x.value, w.value, strides, padding, algo)
    return y, (x.value, w.value, x.perturbed)


def _conv_bwd(strides, padding, algo, res, g):
    x, w, need_dx = res
    if isinstance(g, SymbolicZero):
        return jnp.zeros_like(x), jnp.zeros_like(w)
    _register_targets()
    kwargs = _call_kwargs(strides, padding, algo)
    w_struct = jax.ShapeDtypeStruct(w.shape, w.dtype)
    if not need_dx:
        dw = jax.ffi.ffi_call(_target("bwd_weights", algo), w_struct,
                              vmap_method="sequential")(x, w, g.astype(x.dtype), **kwargs)
        return jnp.zeros_like(x), dw
    dx, dw = jax.ffi.ffi_call(
        _target("bwd", algo), (jax.ShapeDtypeStruct(x.shape, x.dtype), w_struct),
        vmap_method="sequential")(x, w, g.astype(x.dtype), **kwargs)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd, symbolic_zeros=True)
