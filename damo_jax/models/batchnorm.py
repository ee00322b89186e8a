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
float32 whatever ``dtype`` is (as flax's ``force_float32_reductions``)."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


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


class BatchNorm(nn.Module):
    """``nn.BatchNorm(use_fast_variance=False)`` over the last axis, with ``bn_train``'s gradient
    in training mode (see the module docstring). ``x``: ``(..., C)``; output in ``dtype``."""
    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        out_dtype = self.dtype or jnp.result_type(x, scale, bias)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
            return y.astype(out_dtype)
        y, mean, var = bn_train(x32, scale.astype(x32.dtype), bias.astype(x32.dtype),
                                jnp.asarray(self.epsilon, x32.dtype))
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y.astype(out_dtype)
