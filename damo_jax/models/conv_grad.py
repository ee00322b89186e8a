"""Convolution gradients for XLA:CPU train graphs, selected by ``model.grad_impl``: matmul-shaped
ops (below) or oneDNN (``onednn.py``).

XLA:CPU (jax 0.10.2) computes the gradient of a convolution with respect to its kernel as a
"backward-filter" convolution that runs 4-25x slower than the forward of the same convolution
(measured per shape in docs/bench_train.md). The same numbers written as matrix products run close
to forward speed:

* 1x1 kernel, any stride: ``dW = einsum('bhwc,bhwd->cd', x[:, ::s, ::s], g)`` — one GEMM
  contracting over batch and space (S@320 64->64 at 80x80, batch 8: 289 ms -> 18 ms, 1.5x forward);
* kxk kernel, stride 1 or 2: ``dW[i, j] = einsum(pad(x)[:, i::s, j::s][:, :Ho, :Wo], g)`` per
  tap, computed per cache-sized block of output rows of one image as one GEMM of the block's
  im2col matrix (the k*k tap slices side by side) with the block's cotangent
  (:func:`kernel_grad_dense`; whole-tensor per-tap GEMMs made XLA:CPU transpose every tap's
  operand: 3x3 64->64 at 80x80 150 ms -> 38-52 ms, native 45-47 ms);
* depthwise (``feature_group_count == C``): per-tap multiply-reductions over cache-sized blocks
  of rows (:func:`kernel_grad_depthwise`; the native grouped backward-filter conv is 10-30x
  slower, the unblocked reductions 4-5x); input gradient as the forward op applied to the
  dilated, padded cotangent with the flipped kernel (:func:`input_grad_depthwise`).

The input gradient of dense convolutions stays XLA's own (a forward-style convolution that runs at
forward speed on XLA:CPU). 1x1 convs whose forward is a matrix product (``model.pointwise_impl``,
``cpu_ops.py``) get their input gradient from autodiff of that product (a GEMM).

``grad_impl`` (config ``model.grad_impl``, :func:`resolve_grad_impl`):

* ``"native"`` — ``lax.conv_general_dilated`` (or the depthwise taps) differentiated by JAX;
* ``"matmul"`` — :func:`conv_general_dilated_matmul_grad`: a ``jax.custom_vjp`` whose primal is the
  *same* forward op as the native path (same parameters, same forward op and outputs -- bit-identical
  per conv; in a whole model XLA may fuse the depthwise taps differently next to another backward,
  a last-bit difference; the forward op itself is chosen by ``depthwise_impl`` /
  ``pointwise_impl``) and
  whose backward uses the formulations above;
* ``"onednn"`` — dense convs (``groups == 1``, any kernel size and stride, float32: the 3x3, 1x1,
  Focus and RepConv-branch convs) and depthwise convs (groups == input == output channels) run
  forward, input gradient and kernel gradient in oneDNN through XLA FFI custom calls
  (``onednn.py``; 1.3-4x faster per conv than XLA:CPU, same function to float32 rounding,
  ~1e-6 relative; docs/bench_train.md §0g, §0k); other grouped convs keep ``"matmul"``;
* ``"auto"`` — on CPU ``"onednn"`` when ``libdnnl.so.3`` loads and the process sees one device,
  else ``"matmul"``; ``"native"`` on GPU/TPU (they keep XLA's native gradients).

Only train graphs use them. Folded deploy graphs (``deploy=True`` / ``"reparam"``) never take
gradients: their dense k x k convs run in oneDNN's forward when ``model.dense_impl`` resolves to
``"onednn"`` (:func:`resolve_dense_impl`; the one-device CPU default), every other conv as the
native op; exporters set ``dense_impl = "conv"``, so exported graphs never contain the custom VJP
or a oneDNN call.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from damo_jax.errors import ConfigError
from damo_jax.models import onednn
from damo_jax.models.cpu_ops import (_NHWC_DIMS, _is_unit, check_impl, depthwise_conv_taps,
                                     pointwise_conv_dot)

GRAD_IMPLS = ("auto", "native", "matmul", "onednn")
DENSE_IMPLS = ("auto", "conv", "onednn")
CONV3X3_IMPLS = ("auto", "direct", "winograd")
#: convs with fewer input channels stay direct under "auto": the stem's 12-channel 3x3 conv
#: measured 0.94x (forward) / 1.05x (kernel gradient) of oneDNN's time (docs/bench_train.md §0zn)
WINOGRAD_MIN_CHANNELS = 16


def _resolve_onednn(key: str, impl: str, choices: tuple, elsewhere: str, cpu_fallback: str,
                    backend: str | None, auto_needs_native: bool = False) -> str:
    """Shared rule of the ``model.*_impl`` keys with a oneDNN choice: explicit values as given
    (``"onednn"`` only when the library loads, else ``ConfigError`` with the reason); ``"auto"`` ->
    ``elsewhere`` off CPU, ``"onednn"`` in a one-device CPU process where it loads (the FFI custom
    call has no partitioning rule for a mesh) and, with ``auto_needs_native``, where the native
    (GIL-free) FFI handler runs (``onednn.handler_kind()``), else ``cpu_fallback``."""
    check_impl(key, impl, choices)
    if impl == "onednn":
        if not onednn.available():
            raise ConfigError(f"model.{key}='onednn': {onednn.unavailable_reason()}")
        return impl
    if impl != "auto":
        return impl
    if (backend or jax.default_backend()) != "cpu":
        return elsewhere
    if jax.device_count() != 1 or not onednn.available():
        return cpu_fallback
    if auto_needs_native and onednn.handler_kind() != "native":
        return cpu_fallback
    return "onednn"


def resolve_grad_impl(impl: str, backend: str | None = None) -> str:
    """``"auto"`` / ``"native"`` / ``"matmul"`` / ``"onednn"`` -> the one that runs (``backend``
    defaults to ``jax.default_backend()``, read when the model is traced).

    ``"auto"``: ``"native"`` off CPU; on CPU ``"onednn"`` when ``libdnnl.so.3`` loads and the
    process sees one device, else ``"matmul"``.
    Unknown values, and ``"onednn"`` asked for explicitly but unavailable, raise ``ConfigError``
    (a ``ValueError``) with the reason."""
    return _resolve_onednn("grad_impl", impl, GRAD_IMPLS, "native", "matmul", backend)


def resolve_dense_impl(impl: str, backend: str | None = None) -> str:
    """``"auto"`` / ``"conv"`` / ``"onednn"`` -> ``"conv"`` or ``"onednn"``: how the dense k x k
    convs (``groups == 1``, ``k > 1``) of a folded inference graph (``deploy=True`` / ``"reparam"``)
    run. ``"auto"``: ``"onednn"`` on a one-device CPU process where ``libdnnl.so.3`` loads (the
    kernels official PyTorch runs on CPU, on AVX2 and AVX-512 hosts alike) and the native FFI
    handler runs (inference is often embedded in threaded Python programs: the ``ctypes`` fallback
    needs the GIL per conv, a T@640 forward 53 -> 1014 ms beside one busy Python thread), else
    ``"conv"`` (XLA's op; exporters always use ``"conv"``). Unknown values, and ``"onednn"`` asked
    for explicitly but unavailable, raise ``ConfigError``."""
    return _resolve_onednn("dense_impl", impl, DENSE_IMPLS, "conv", "conv", backend,
                           auto_needs_native=True)


def resolve_conv3x3_impl(impl: str, backend: str | None = None) -> str:
    """``model.conv3x3_impl`` -> ``"direct"`` or ``"winograd"``: how the 3x3 stride-1 padding-1
    dense convs that run in oneDNN (``grad_impl`` / ``dense_impl`` resolved to ``"onednn"``) are
    computed -- oneDNN's direct kernels, or Winograd F(2x2, 3x3) (``models/winograd_ffi.c``: forward,
    input and kernel gradient; the same function to float32 rounding, relative differences ~5e-7).
    ``"auto"``: ``"winograd"`` in a one-device CPU process where its handlers run (native handler,
    x86-64 with AVX2 + FMA), else ``"direct"``. ``"winograd"`` asked for but unavailable, and
    unknown values, raise ``ConfigError``. ``"winograd"`` routes every such conv; ``"auto"`` only
    those worth it (at least ``WINOGRAD_MIN_CHANNELS`` input channels and
    ``onednn.winograd_min_pixels()`` batch x H x W: :func:`winograd_route`);
    measured on the S@320 step's convs (docs/bench_train.md §0zn): with AVX2 (oneDNN's best ISA on
    AVX2-only CPUs, or capped by ``ONEDNN_MAX_CPU_ISA``) 1.2-1.8x less time per conv than oneDNN,
    the S@320 train step 1.674 -> 1.443 s; with AVX-512 0.9-1.5x per conv, the step 1.169 ->
    1.091 s."""
    check_impl("conv3x3_impl", impl, CONV3X3_IMPLS)
    if impl == "winograd":   # winograd_available() is False, with oneDNN's reason, without oneDNN
        if not onednn.winograd_available():
            raise ConfigError(f"model.conv3x3_impl='winograd': {onednn.winograd_unavailable_reason()}")
        return impl
    if impl == "direct":
        return impl
    if ((backend or jax.default_backend()) != "cpu" or jax.device_count() != 1
            or not onednn.winograd_available()):
        return "direct"
    return "winograd"


def describe_grad_impl(impl: str, dtype: str = "float32", backend: str | None = None,
                       conv3x3_impl: str = "auto") -> str:
    """One phrase for the train log: how this process runs the train graph's convs and their
    gradients (``model.grad_impl`` resolved; for oneDNN, which FFI handler: ``native`` runs without
    Python, ``python`` needs the GIL per call; and whether ``conv3x3_impl`` puts 3x3 convs in
    Winograd)."""
    resolved = resolve_grad_impl(impl, backend)
    if resolved == "onednn":
        if dtype != "float32":
            return f"convs: XLA ({dtype}; the oneDNN path is float32 only)"
        wino = (", 3x3 convs as Winograd F(2x2,3x3)"
                if resolve_conv3x3_impl(conv3x3_impl, backend) == "winograd" else "")
        return f"convs: oneDNN, {onednn.handler_kind()} FFI handler{wino}"
    return {"native": "convs: XLA's own ops and gradients",
            "matmul": "convs: XLA, kernel gradients as matmuls"}[resolved]


# ----------------------------------------------------------------------------- forward (primal)
_FORWARD_OPS = {"conv": lax.conv_general_dilated, "taps": depthwise_conv_taps,
                "dot": pointwise_conv_dot}


def _forward(x, w, strides, padding, groups, form):
    """The forward op exactly as the native path runs it (``form``: ``"conv"``, ``"taps"`` for
    depthwise shifted slices, ``"dot"`` for 1x1 matrix products; ``cpu_ops.py``)."""
    return _FORWARD_OPS[form](x, w, strides, padding, dimension_numbers=_NHWC_DIMS,
                              feature_group_count=groups)


def _tap_slices(xp, kh, kw, strides, out_hw):
    """``{(i, j): xp[:, i::sh, j::sw, :][:, :Ho, :Wo]}`` for every kernel tap."""
    (sh, sw), (ho, wo) = strides, out_hw
    b, _, _, c = xp.shape
    return {(i, j): lax.slice(xp, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                              (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)}


def _pad_input(x, padding):
    """Zero-pad ``x`` (B, H, W, C) by ``((top, bottom), (left, right))`` (negative: crop)."""
    (top, bottom), (left, right) = padding
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0),
                                                (0, 0, 0)))


def _row_block_sum(x, g, kernel_hw, strides, padding, row_bytes, budget, block_fn, init):
    """``sum`` over blocks of ``rb`` output rows of one image of ``block_fn(xb, gb)``, where ``xb``
    (1, (rb-1)*sh+kh, Wp, C) are the zero-padded input rows the block reads and ``gb`` (1, rb, Wo, D)
    its cotangent rows (a ``fori_loop`` over B * ceil(Ho / rb) blocks, carry ``init``).

    ``rb = budget // row_bytes(Wp)`` (at least 1, at most Ho): blocks sized for a core's cache, so
    the k*k tap slices of a block are cut from cached data instead of streaming (and, for GEMM
    operands, transposing) whole tensors k*k times. The last block may run past Ho: its extra
    cotangent rows are zero and add nothing."""
    kh, _ = kernel_hw
    sh, _ = strides
    b, ho, wo, d = g.shape
    xp = _pad_input(x, padding)
    wp, c = xp.shape[2], xp.shape[3]
    rb = max(1, min(ho, budget // row_bytes(wp)))
    nblk = -(-ho // rb)
    in_rows = (rb - 1) * sh + kh
    if nblk * rb != ho:
        g = jnp.pad(g, ((0, 0), (0, nblk * rb - ho), (0, 0), (0, 0)))
    need = (nblk * rb - 1) * sh + kh
    if need > xp.shape[1]:
        xp = jnp.pad(xp, ((0, 0), (0, need - xp.shape[1]), (0, 0), (0, 0)))

    def body(k, acc):
        img, blk = k // nblk, k % nblk
        xb = lax.dynamic_slice(xp, (img, blk * rb * sh, 0, 0), (1, in_rows, wp, c))
        gb = lax.dynamic_slice(g, (img, blk * rb, 0, 0), (1, rb, wo, d))
        return acc + block_fn(xb, gb, rb)
    return lax.fori_loop(0, b * nblk, body, init)


# bytes per block of the kernel gradients (see _row_block_sum), measured best on XLA:CPU (Zen 4,
# 2026-12-03): dense -- the block's im2col matrix (rb*Wo, kh*kw*C); depthwise -- input + cotangent rows
_DENSE_BLOCK_BYTES = 2 * 1024 * 1024
_DEPTHWISE_BLOCK_BYTES = 512 * 1024


def kernel_grad_dense(x, g, kernel_hw, strides, padding):
    """dL/dW (kh, kw, C, D) of a dense NHWC/HWIO conv from input ``x`` (B, H, W, C) and output
    cotangent ``g`` (B, Ho, Wo, D).

    1x1: one ``(B*Ho*Wo, C)^T @ (B*Ho*Wo, D)`` GEMM. kxk: per block of output rows of one image
    (:func:`_row_block_sum`), the block's im2col matrix (rb*Wo, kh*kw*C) -- its k*k tap slices
    concatenated on channels -- times the block's cotangent (rb*Wo, D), accumulated in float32.
    Whole-tensor per-tap GEMMs make XLA:CPU transpose each tap's operand at a fraction of memory
    speed (3x3 64->64 at 80x80, batch 8, Zen 4: 150 ms; native backward-filter conv 45 ms; blocked
    im2col 38 ms)."""
    kh, kw = kernel_hw
    dims = (((0, 1, 2), (0, 1, 2)), ((), ()))
    c, d = x.shape[3], g.shape[3]
    if (kh, kw) == (1, 1):
        tap = _tap_slices(_pad_input(x, padding), 1, 1, strides, g.shape[1:3])[(0, 0)]
        return lax.dot_general(tap, g, dims, preferred_element_type=jnp.float32)[None, None]
    wo = g.shape[2]

    def block(xb, gb, rb):
        taps = _tap_slices(xb, kh, kw, strides, (rb, wo))
        cols = jnp.concatenate([taps[(i, j)] for i in range(kh) for j in range(kw)], axis=-1)
        return lax.dot_general(cols, gb, dims,
                               preferred_element_type=jnp.float32).reshape(kh, kw, c, d)
    return _row_block_sum(x, g, kernel_hw, strides, padding,
                          lambda wp: 4 * wo * kh * kw * c, _DENSE_BLOCK_BYTES, block,
                          jnp.zeros((kh, kw, c, d), jnp.float32))


def kernel_grad_depthwise(x, g, kernel_hw, strides, padding):
    """dL/dW (kh, kw, 1, C) of a depthwise conv: per-tap ``sum_{b,h,w} slice * g``, accumulated in
    float32 over blocks of output rows of one image (:func:`_row_block_sum`).

    Unblocked, each of the k*k tap reductions streams the whole input and cotangent from memory
    (XLA:CPU, Zen 4, 5x5 96 ch at 80x80, batch 8: 190-225 ms); per block of ~512 KB the taps
    re-read the cache (41 ms; PyTorch/oneDNN channels-last: 42 ms)."""
    kh, kw = kernel_hw
    sh, _ = strides
    c = g.shape[3]
    wo = g.shape[2]

    def block(xb, gb, rb):
        taps = _tap_slices(xb.astype(jnp.float32), kh, kw, strides, (rb, wo))
        gb = gb.astype(jnp.float32)
        return jnp.stack([jnp.stack([jnp.sum(taps[(i, j)] * gb, axis=(0, 1, 2))
                                     for j in range(kw)]) for i in range(kh)])
    dw = _row_block_sum(x, g, kernel_hw, strides, padding,
                        lambda wp: 4 * c * (wo + sh * wp), _DEPTHWISE_BLOCK_BYTES, block,
                        jnp.zeros((kh, kw, c), jnp.float32))
    return dw[:, :, None, :]


def input_grad_depthwise(g, w, in_hw, strides, padding, form):
    """dL/dx (B, H, W, C) of a depthwise conv as a stride-1 depthwise conv (the ``form`` op) of
    the cotangent ``g`` (B, Ho, Wo, C) -- dilated by the stride and padded -- with the kernel
    flipped: ``dx[n] = sum_i gd[n + p - i] w[i]``. (Autodiff of the taps forward pads and adds
    k*k cotangent copies instead: 2.3-4x slower on XLA:CPU.)"""
    kh, kw = w.shape[:2]
    (sh, sw), (h, wdt) = strides, in_hw
    (top, _), (left, _) = padding
    ho, wo = g.shape[1:3]
    gd = lax.pad(g, jnp.zeros((), g.dtype),
                 ((0, 0, 0), (kh - 1 - top, h + top - 1 - (ho - 1) * sh, sh - 1),
                  (kw - 1 - left, wdt + left - 1 - (wo - 1) * sw, sw - 1), (0, 0, 0)))
    return _forward(gd, w[::-1, ::-1], (1, 1), ((0, 0), (0, 0)), w.shape[3], form)


# ----------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_matmul_grad(x, w, strides, padding, groups, form):
    return _forward(x, w, strides, padding, groups, form)


def _conv_fwd(x, w, strides, padding, groups, form):
    return _forward(x, w, strides, padding, groups, form), (x, w)


def _conv_bwd(strides, padding, groups, form, res, g):
    x, w = res
    kh, kw = w.shape[:2]
    if groups == 1:
        dw = kernel_grad_dense(x, g, (kh, kw), strides, padding)
        # input gradient by autodiff of the forward op (a forward-style conv; 1x1 as dot: a GEMM)
        _, vjp_x = jax.vjp(lambda x_: _forward(x_, w, strides, padding, groups, form), x)
        (dx,) = vjp_x(g)
    else:
        dw = kernel_grad_depthwise(x, g, (kh, kw), strides, padding)
        dx = input_grad_depthwise(g, w, x.shape[1:3], strides, padding, form).astype(x.dtype)
    return dx, dw.astype(w.dtype)


_conv_matmul_grad.defvjp(_conv_fwd, _conv_bwd)


def supported(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1) -> bool:
    """True for 2-D NHWC/HWIO convs, no dilation, explicit padding, dense or depthwise."""
    if lhs.ndim != 4 or rhs.ndim != 4 or batch_group_count != 1 or isinstance(padding, str):
        return False
    if not (_is_unit(lhs_dilation) and _is_unit(rhs_dilation)):
        return False
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if tuple(dims) != tuple(_NHWC_DIMS):
        return False
    c = lhs.shape[3]
    depthwise = feature_group_count == c and rhs.shape[2] == 1 and rhs.shape[3] == c
    return feature_group_count == 1 or depthwise


def winograd_route(conv3x3_impl: str, backend: str | None = None) -> str | None:
    """What ``make_conv_general_dilated(winograd=...)`` takes for ``model.conv3x3_impl``: None
    (direct), ``"all"`` (asked for explicitly: every eligible conv) or ``"sized"`` (``auto``: the
    convs worth it)."""
    if resolve_conv3x3_impl(conv3x3_impl, backend) == "direct":
        return None
    return "all" if conv3x3_impl == "winograd" else "sized"


def make_conv_general_dilated(*, taps: bool, pointwise: bool = False, onednn_convs: bool = False,
                              winograd: str | None = None):
    """A ``lax.conv_general_dilated``-compatible callable (what ``flax.linen.Conv`` takes as
    ``conv_general_dilated``) whose forward is the native op (``depthwise_conv_taps`` for
    depthwise convs when ``taps``, ``pointwise_conv_dot`` for 1x1 convs when ``pointwise``) and
    whose gradients come from :func:`_conv_bwd`. Unsupported configurations (dilation, other
    groupings, other layouts) fall back to the native op. ``onednn_convs``: dense
    and depthwise convs (:func:`onednn.supported`, float32) run forward and backward in oneDNN
    (:func:`onednn.conv`); with ``winograd`` too (:func:`winograd_route`), 3x3 stride-1
    padding-1 dense convs (:func:`onednn.winograd_eligible`) run as Winograd F(2x2, 3x3)
    (``algo="winograd"``): all of them (``"all"``) or those with at least
    ``WINOGRAD_MIN_CHANNELS`` input channels and ``onednn.winograd_min_pixels()`` batch x H x W
    (``"sized"``)."""
    def conv_general_dilated_matmul_grad(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                         rhs_dilation=None, dimension_numbers=None,
                                         feature_group_count=1, batch_group_count=1,
                                         precision=None, preferred_element_type=None):
        if (precision is not None or preferred_element_type is not None
                or not supported(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                 dimension_numbers, feature_group_count, batch_group_count)):
            native = (depthwise_conv_taps if taps else
                      pointwise_conv_dot if pointwise else lax.conv_general_dilated)
            return native(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                          rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                          feature_group_count=feature_group_count,
                          batch_group_count=batch_group_count, precision=precision,
                          preferred_element_type=preferred_element_type)
        strides = tuple(int(s) for s in window_strides)
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if (onednn_convs
                and onednn.supported(lhs, rhs, strides, pads, feature_group_count)):
            worth_it = winograd == "all" or (
                lhs.shape[3] >= WINOGRAD_MIN_CHANNELS
                and lhs.shape[0] * lhs.shape[1] * lhs.shape[2] >= onednn.winograd_min_pixels())
            algo = ("winograd" if winograd and worth_it
                    and onednn.winograd_eligible(lhs, rhs, strides, pads, feature_group_count)
                    else "direct")
            return onednn.conv(lhs, rhs, strides, pads, algo)
        form = ("taps" if taps and feature_group_count > 1 else
                "dot" if pointwise and rhs.shape[:2] == (1, 1) and feature_group_count == 1
                and not any(pads[0] + pads[1]) else "conv")
        return _conv_matmul_grad(lhs, rhs, strides, pads, int(feature_group_count), form)
    return conv_general_dilated_matmul_grad


conv_general_dilated_matmul_grad = make_conv_general_dilated(taps=False)
