"""BatchNorm over NHWC maps with a hand-written training-mode gradient (SPEC §2.1).

``BatchNorm`` has the variables, initialisers, running-statistics rule and inference formula of
``flax.linen.BatchNorm(use_fast_variance=False)`` (params ``scale`` / ``bias``, batch_stats ``mean``
/ ``var``; biased batch variance, ``ra = momentum * ra + (1 - momentum) * batch``), so checkpoints,
``interop.convert``, ``reparam`` and EMA see the same tree. The difference is the training-mode
backward pass: ``bn_train`` is a ``jax.custom_vjp`` whose backward is the textbook closed form

    xhat = (x - mean) * inv,   inv = rsqrt(var + eps)
    dbias = sum(g),  dscale = sum(g * xhat)
    dx = scale * inv / n * (n * g - dbias - xhat * dscale)     (+ the terms of the mean / var outputs)

two reductions and one element-wise pass over ``x`` and ``g``, where differentiating the two-pass
statistics formula lets XLA emit ~6 reductions per BatchNorm (``jax.profiler`` of the S@320 step:
724 reduction fusions for 110 BatchNorms). Same function, same float32 statistics (two-pass
variance, as flax's ``use_fast_variance=False``); the gradients agree with autodiff of the flax
module to float32 rounding (``tests/test_batchnorm.py`` checks both against a float64 NumPy
reference). Statistics are reduced over every axis but the last (batch, H, W); they are computed in
float32 whatever ``dtype`` is (as flax's ``force_float32_reductions``).

``model.bn_impl`` chooses how training-mode BatchNorm runs (``BN_IMPLS``): ``"xla"`` as above;
``"native"`` as one call per BatchNorm (with the residual add and ReLU that follow it, if any)
into ``batchnorm_ffi.c``, the same function on every core (OpenMP), at least XLA's float32
accuracy (float64 accumulation) -- for BatchNorms followed by ReLU or no activation; those followed
by SiLU stay XLA's (which fuses the normalisation with the SiLU);
``"auto"``: native in a one-device CPU process where the native library builds (XLA:CPU runs the
statistics as small one-thread fusions while the other core idles: docs/bench_train.md §0zj),
else xla. Inference mode, and any dtype but float32, is always XLA's."""
from __future__ import annotations

import threading
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BN_IMPLS = ("auto", "xla", "native")


def _stats(x):
    """Per-channel batch mean and biased variance of ``x`` (float32, reduced over all but the last
    axis), two passes as flax's ``use_fast_variance=False``."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    return mean, var


@jax.custom_vjp
def bn_train(x, scale, bias, eps):
    """Training-mode BatchNorm: ``(y, mean, var)`` for float32 ``x`` of shape ``(..., C)``;
    ``scale``, ``bias``: ``(C,)``; ``eps``: a float32 scalar (its gradient is not computed: zero)."""
    return _bn_fwd(x, scale, bias, eps)[0]


def _bn_fwd(x, scale, bias, eps):
    mean, var = _stats(x)
    inv = jax.lax.rsqrt(var + eps)
    y = (x - mean) * (inv * scale) + bias
    return (y, mean, var), (x, mean, inv, scale, eps)


def _bn_bwd(res, cts):
    x, mean, inv, scale, eps = res
    g, g_mean, g_var = cts
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    xc = x - mean
    xhat = xc * inv
    dbias = jnp.sum(g, axes)
    dscale = jnp.sum(g * xhat, axes)
    dx = (scale * inv / n) * (n * g - dbias - xhat * dscale)
    # the mean / var outputs (running statistics): d mean / dx = 1/n, d var / dx = 2 (x - mean) / n
    dx = dx + g_mean / n + xc * (2.0 * g_var / n)
    return dx, dscale, dbias, jnp.zeros_like(eps)


bn_train.defvjp(_bn_fwd, _bn_bwd)


# ----------------------------------------------------------------------------- native (CPU)
_NATIVE: dict = {}
_NATIVE_LOCK = threading.Lock()


def _native_state() -> dict:
    """``{"ok": bool, "reason": str}``; on the first call builds / loads the native library
    (``onednn_native``) and registers its four BatchNorm FFI targets (plain and add forms, forward
    and backward)."""
    if _NATIVE:
        return _NATIVE
    with _NATIVE_LOCK:
        if _NATIVE:
            return _NATIVE
        from damo_jax.models import onednn_native
        try:
            if onednn_native.handler_choice() == "python":
                raise OSError(f"{onednn_native.HANDLER_ENV}=python (no native code)")
            lib = onednn_native.load()
            if not hasattr(lib, "damo_bn_fwd"):
                raise OSError("native library " + "; ".join(onednn_native.BUILD_NOTES or ["without BatchNorm"]))
            for symbol in ("damo_bn_fwd", "damo_bn_bwd", "damo_bn_add_fwd", "damo_bn_add_bwd"):
                target = symbol.replace("damo_", "damo_jax_", 1)
                fn = getattr(lib, symbol)
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
            _NATIVE.update(ok=True, reason="", lib=lib)
        except (OSError, AttributeError) as e:
            _NATIVE.update(ok=False, reason=str(e))
    return _NATIVE


def native_available() -> bool:
    """True when the native BatchNorm handlers build and load here."""
    return _native_state()["ok"]


def resolve_bn_impl(impl: str, backend: str | None = None) -> str:
    """``model.bn_impl`` -> ``"xla"`` or ``"native"``. ``"auto"``: native on a one-device CPU process
    where the native library builds, else xla; ``"native"`` asked for but unavailable (or off CPU)
    is a ``ConfigError`` with the reason; unknown values are ``ConfigError`` too."""
    from damo_jax.errors import ConfigError
    from damo_jax.models.cpu_ops import check_impl
    check_impl("bn_impl", impl, BN_IMPLS)
    if impl == "xla":
        return impl
    on_cpu = (backend or jax.default_backend()) == "cpu"
    if impl == "native":
        if not on_cpu:
            raise ConfigError("model.bn_impl='native': the native BatchNorm runs on CPU only")
        if not native_available():
            raise ConfigError(f"model.bn_impl='native': {_native_state()['reason']}")
        return impl
    return "native" if on_cpu and jax.device_count() == 1 and native_available() else "xla"


def describe_bn_impl(impl: str, dtype: str = "float32", backend: str | None = None) -> str:
    """One phrase for the train log: how this process runs training-mode BatchNorm."""
    if resolve_bn_impl(impl, backend) == "xla":
        return "BatchNorm: XLA's ops"
    if dtype != "float32":
        return f"BatchNorm: XLA's ops ({dtype}; the native path is float32 only)"
    return "BatchNorm (+ add + ReLU): native, one call each on every core (SiLU ones: XLA's ops)"


_ACTS = {None: 0, "identity": 0, "relu": 1}


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def bn_train_native(x, scale, bias, eps, act):
    """``bn_train`` (then ReLU when ``act == 1``) as one native call: ``(z, mean, var)`` for float32
    ``x`` of shape ``(..., C)``; same function and gradient, computed on every core."""
    return _native_fwd(x, scale, bias, eps, act)[0]


def _require_native():
    state = _native_state()          # registers the FFI targets on first use
    if not state["ok"]:
        from damo_jax.errors import ConfigError
        raise ConfigError(f"native BatchNorm unavailable: {state['reason']}")


def _native_call(target, x, outs: str, *operands, act: int):
    """One native BatchNorm FFI call; ``outs`` gives its results' shapes in order: ``f`` = ``x``'s
    (float32), ``v`` = ``(C,)``."""
    _require_native()
    shapes = {"f": x.shape, "v": x.shape[-1:]}
    return jax.ffi.ffi_call(target, tuple(jax.ShapeDtypeStruct(shapes[k], jnp.float32) for k in outs))(
        *operands, act=np.array([act], np.int64))


def _native_fwd(x, scale, bias, eps, act):
    z, mean, var, inv = _native_call("damo_jax_bn_fwd", x, "fvvv", x, scale, bias,
                                     jnp.asarray(eps, jnp.float32), act=act)
    return (z, mean, var), (x, mean, inv, scale, bias, eps)


def _native_bwd(act, res, cts):
    x, mean, inv, scale, bias, eps = res
    g, g_mean, g_var = cts
    dx, dscale, dbias = _native_call("damo_jax_bn_bwd", x, "fvv", x, mean, inv, scale, bias, g, g_mean,
                                     g_var, act=act)
    return dx, dscale, dbias, jnp.zeros_like(eps)


bn_train_native.defvjp(_native_fwd, _native_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def bn_add_native(x, res, scale, bias, eps, act):
    """``act(bn_train(x) + res)`` (ReLU when ``act == 1``) as one native call: ``(z, mean, var)``;
    ``res`` has ``x``'s shape. Its backward takes the ReLU mask from ``z`` and returns ``res``'s
    gradient (the masked cotangent) from the same call."""
    return _add_fwd(x, res, scale, bias, eps, act)[0]


def _add_fwd(x, res, scale, bias, eps, act):
    z, mean, var, inv = _native_call("damo_jax_bn_add_fwd", x, "fvvv", x, scale, bias,
                                     jnp.asarray(eps, jnp.float32), res, act=act)
    return (z, mean, var), (x, z, mean, inv, scale, eps)


def _add_bwd(act, res_, cts):
    x, z, mean, inv, scale, eps = res_
    g, g_mean, g_var = cts
    dx, dscale, dbias, dres = _native_call("damo_jax_bn_add_bwd", x, "fvvf", x, z, mean, inv, scale, g,
                                           g_mean, g_var, act=act)
    return dx, dres, dscale, dbias, jnp.zeros_like(eps)


bn_add_native.defvjp(_add_fwd, _add_bwd)


def _add(y, residual):
    return y if residual is None else y + residual


class BatchNorm(nn.Module):
    """``nn.BatchNorm(use_fast_variance=False)`` over the last axis, with ``bn_train``'s gradient
    in training mode (see the module docstring), plus ``residual`` when given, then the activation
    ``act`` (``None`` / relu / silu): ``act(BN(x) [+ residual])``, one native call when ``impl``
    resolves to native and ``act`` is ReLU or none (SiLU: XLA's ops). ``x``, ``residual``: ``(..., C)``; output in
    ``dtype``."""
    use_running_average: bool = False
    act: Any = None
    impl: str = "xla"
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, residual=None):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        out_dtype = self.dtype or jnp.result_type(x, scale, bias)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        from damo_jax.models.blocks import activation
        act = activation(self.act)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
            return act(_add(y.astype(out_dtype), residual))
        native = (x32.dtype == jnp.float32 and out_dtype == jnp.float32 and not self.is_initializing()
                  and (residual is None or residual.dtype == jnp.float32)
                  and resolve_bn_impl(self.impl) == "native")
        if native and self.act in _ACTS:
            eps, code = jnp.float32(self.epsilon), _ACTS[self.act]
            if residual is not None and code:
                y, mean, var = bn_add_native(x32, residual, scale, bias, eps, code)
            elif residual is None:
                y, mean, var = bn_train_native(x32, scale, bias, eps, code)
            else:                                   # + residual without an activation: in XLA
                y, mean, var = bn_train_native(x32, scale, bias, eps, 0)
                y = act(y + residual)
        else:   # XLA's ops; also for SiLU, which XLA fuses with the normalisation (a native BN
            # followed by an XLA SiLU was 2 % slower on the Ns step: docs/bench_train.md §0zj)
            y, mean, var = bn_train(x32, scale.astype(x32.dtype), bias.astype(x32.dtype),
                                    jnp.asarray(self.epsilon, x32.dtype))
            y = act(_add(y.astype(out_dtype), residual))
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
