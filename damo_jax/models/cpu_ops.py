"""CPU-friendly formulations of ops XLA:CPU runs slowly, selected by ``model.depthwise_impl`` and
``model.pointwise_impl``.

XLA:CPU (jax 0.10.2) runs grouped convolutions with ``feature_group_count == C`` 10-40x slower than
the same arithmetic written as k*k shifted (strided) slices of the padded input times per-channel
weights, which XLA fuses into one loop nest; likewise the SPP's 5/9/13 max pools (``reduce_window``)
are ~30x slower than the exactly equal cascade of separable 5-wide maxima (pool9 = pool5(pool5),
pool13 = pool5(pool9); a kxk max = 1xk max of a kx1 max). Measurements: docs/bench_models.md.
On GPU/TPU the native ops are the fast form and exporters want one grouped ``Conv`` / ``MaxPool``
node each, so the formulation is selectable (``Opts.depthwise_impl``, config ``model.depthwise_impl``):

* ``"conv"`` — native ops: ``lax.conv_general_dilated`` with groups, ``nn.max_pool`` 5/9/13
  (what ONNX export must use: ``damo_jax.models.with_depthwise_impl(cfg, "conv", "conv", "conv")``);
* ``"taps"`` — :func:`depthwise_conv_taps` and :func:`spp_max_pools` with ``separable=True``;
* ``"auto"`` — ``"taps"`` when the default backend at trace time is CPU, else ``"conv"``.

Parameters are untouched (flax ``nn.Conv`` with kernel ``[kh, kw, 1, C]`` and ``bias`` ``[C]``; only
its ``conv_general_dilated`` callable changes), so conversion, fusion and checkpoints do not depend
on the choice. Depthwise results agree with the conv form to float32 rounding (different summation
order); the pools are bit-identical.

1x1 convolutions (``groups == 1``, no padding or dilation, any stride) run 1.4-3.5x faster on
XLA:CPU as one matrix product ``x[:, ::s, ::s] (B*Ho*Wo, C) @ w[0, 0] (C, D)`` than as a
``conv_general_dilated`` (measured 2026-12-03 on an AMD EPYC Zen 4, batch 8: 64->64 at 80x80
17.3 -> 4.9 ms, 128->128 at 40x40 6.1 -> 2.4 ms; identical outputs), and the gradients autodiff
gives for the product are GEMMs too. ``model.pointwise_impl``:

* ``"conv"`` — ``lax.conv_general_dilated`` (exporters: one ONNX ``Conv`` node per 1x1 conv);
* ``"dot"`` — :func:`pointwise_conv_dot`;
* ``"auto"`` — ``"dot"`` when the default backend at trace time is CPU, else ``"conv"``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from damo_jax.errors import ConfigError

DEPTHWISE_IMPLS = ("auto", "conv", "taps")
POINTWISE_IMPLS = ("auto", "conv", "dot")

# NHWC activations, HWIO kernels, NHWC outputs: flax's dimension numbers for 4-D inputs.
_NHWC_DIMS = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                      out_spec=(0, 3, 1, 2))


def check_impl(key: str, impl: str, choices: tuple) -> None:
    """``ConfigError`` (one line, the CLI's exit 2) unless ``impl`` is one of ``choices``;
    ``key`` is the ``model.*`` config key that named it."""
    if impl not in choices:
        raise ConfigError(f"model.{key} must be one of {choices}, got {impl!r}")


def _resolve(key: str, impl: str, choices: tuple, on_cpu: str, elsewhere: str,
             backend: str | None) -> str:
    check_impl(key, impl, choices)
    if impl != "auto":
        return impl
    return on_cpu if (backend or jax.default_backend()) == "cpu" else elsewhere


def resolve_depthwise_impl(impl: str, backend: str | None = None) -> str:
    """``"auto"`` / ``"conv"`` / ``"taps"`` -> ``"conv"`` or ``"taps"`` (``backend`` defaults to
    ``jax.default_backend()``, read when the model is traced)."""
    return _resolve("depthwise_impl", impl, DEPTHWISE_IMPLS, "taps", "conv", backend)


def resolve_pointwise_impl(impl: str, backend: str | None = None) -> str:
    """``"auto"`` / ``"conv"`` / ``"dot"`` -> ``"conv"`` or ``"dot"`` (``backend`` defaults to
    ``jax.default_backend()``, read when the model is traced)."""
    return _resolve("pointwise_impl", impl, POINTWISE_IMPLS, "dot", "conv", backend)


def _is_unit(values) -> bool:
    return values is None or all(int(v) == 1 for v in values)


def _taps_supported(lhs, rhs, dimension_numbers, feature_group_count, lhs_dilation,
                    rhs_dilation) -> bool:
    """True for a 2-D NHWC/HWIO depthwise conv with channel multiplier 1 and no dilation."""
    if lhs.ndim != 4 or rhs.ndim != 4:
        return False
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    channels = lhs.shape[3]
    return (tuple(dims) == tuple(_NHWC_DIMS) and rhs.shape[2] == 1 and channels > 1
            and feature_group_count == channels and rhs.shape[3] == channels
            and _is_unit(lhs_dilation) and _is_unit(rhs_dilation))


def depthwise_conv_taps(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                        dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                        precision=None, preferred_element_type=None):
    """Same signature and result as ``lax.conv_general_dilated``.

    Depthwise convs (``lhs`` (B, H, W, C) NHWC, ``rhs`` (kh, kw, 1, C) HWIO,
    ``feature_group_count == C``, no dilation) are computed as
    ``sum_{i,j} pad(lhs)[:, i::sh, j::sw, :][:Ho, :Wo] * rhs[i, j, 0]``, accumulated in at least
    float32 and returned in ``preferred_element_type`` or ``lhs.dtype``. Anything else is passed
    to ``lax.conv_general_dilated`` unchanged.
    """
    if batch_group_count != 1 or not _taps_supported(lhs, rhs, dimension_numbers,
                                                     feature_group_count, lhs_dilation,
                                                     rhs_dilation):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    kh, kw = rhs.shape[:2]
    sh, sw = (int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
    (top, bottom), (left, right) = ((int(lo), int(hi)) for lo, hi in padding)
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    x = jnp.pad(lhs.astype(acc_dtype), ((0, 0), (top, bottom), (left, right), (0, 0)))
    w = rhs.astype(acc_dtype)
    b, hp, wp, c = x.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ValueError(f"depthwise_conv_taps: empty output for input {lhs.shape}, kernel "
                         f"{rhs.shape}, strides {(sh, sw)}, padding {padding}")
    acc = None
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                            (1, sh, sw, 1)) * w[i, j, 0]
            acc = tap if acc is None else acc + tap
    return acc.astype(out_dtype)


def pointwise_supported(lhs, rhs, padding, lhs_dilation=None, rhs_dilation=None,
                        dimension_numbers=None, feature_group_count=1,
                        batch_group_count=1) -> bool:
    """True for a 2-D NHWC/HWIO 1x1 conv without groups, padding or dilation."""
    if (lhs.ndim != 4 or rhs.ndim != 4 or tuple(rhs.shape[:2]) != (1, 1)
            or feature_group_count != 1 or batch_group_count != 1 or isinstance(padding, str)):
        return False
    if any(int(v) != 0 for pair in padding for v in pair):
        return False
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return (tuple(dims) == tuple(_NHWC_DIMS) and _is_unit(lhs_dilation)
            and _is_unit(rhs_dilation))


def pointwise_conv_dot(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                       dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                       precision=None, preferred_element_type=None):
    """Same signature and result as ``lax.conv_general_dilated``.

    1x1 convs (``lhs`` (B, H, W, C) NHWC, ``rhs`` (1, 1, C, D) HWIO, no groups, padding or
    dilation, strides (sh, sw)) are computed as one ``dot_general`` of
    ``lhs[:, ::sh, ::sw, :]`` (B, Ho, Wo, C) with ``rhs[0, 0]`` (C, D) -> (B, Ho, Wo, D).
    Anything else is passed to ``lax.conv_general_dilated`` unchanged.
    """
    if not pointwise_supported(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                               feature_group_count, batch_group_count):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    sh, sw = (int(s) for s in window_strides)
    x = lhs
    if (sh, sw) != (1, 1):
        b, h, w, c = lhs.shape
        x = lax.slice(lhs, (0, 0, 0, 0), (b, h, w, c), (1, sh, sw, 1))
    return lax.dot_general(x, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=preferred_element_type)


def max_pool_same(x, k: int):
    """Stride-1 kxk max pool with -inf padding k//2 (odd k) of NHWC ``x``, one ``reduce_window``
    (flax keyword call form, which jax2onnx turns into one ``MaxPool``)."""
    return nn.max_pool(x, window_shape=(k, k), strides=(1, 1), padding="SAME")


def max_pool_same_separable(x, k: int):
    """Same values as :func:`max_pool_same` as a kx1 then a 1xk window max."""
    pad = k // 2  # a Python -inf init makes these ``reduce_window_max`` (an array init would not)
    y = lax.reduce_window(x, -jnp.inf, lax.max, (1, k, 1, 1), (1, 1, 1, 1),
                          ((0, 0), (pad, pad), (0, 0), (0, 0)))
    return lax.reduce_window(y, -jnp.inf, lax.max, (1, 1, k, 1), (1, 1, 1, 1),
                             ((0, 0), (0, 0), (pad, pad), (0, 0)))


def spp_max_pools(x, sizes, *, separable: bool) -> list:
    """Stride-1 same-size max pools of ``x`` for each (odd) size in ``sizes``, in that order.

    ``separable=False``: one ``max_pool_same`` per size (the official graph). ``separable=True``:
    pools of increasing size computed from the previous one (pool_b = pool_{b-a+1}(pool_a), exact
    for max with -inf padding), each as separable kx1 / 1xk maxima; bit-identical results.
    """
    for k in sizes:
        if k % 2 != 1:
            raise ValueError(f"SPP pool sizes must be odd, got {tuple(sizes)}")
    if not separable:
        return [max_pool_same(x, k) for k in sizes]
    pooled, prev, prev_k = {}, x, 1
    for k in sorted(set(sizes)):
        prev = max_pool_same_separable(prev, k - prev_k + 1) if k > 1 else prev
        pooled[k], prev_k = prev, k
    return [pooled[k] for k in sizes]
