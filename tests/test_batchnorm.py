"""``damo_jax.models.batchnorm``: the training-mode BatchNorm with a closed-form gradient.

References: a float64 NumPy forward with central finite differences (independent of any JAX
autodiff), and flax's ``nn.BatchNorm(use_fast_variance=False)`` differentiated by JAX (the
formulation it replaces: same variables, same numbers to float32 rounding)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from damo_jax.models.batchnorm import BatchNorm, bn_train

EPS = 1e-3


def np_bn(x, scale, bias, eps=EPS):
    """float64 reference: (y, mean, biased var) over all axes but the last."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    var = ((x - mean) ** 2).mean(axes)
    return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def test_gradient_matches_float64_finite_differences():
    """Directional derivatives of L = <r, y> + <a, mean> + <b, var> (every output of
    ``bn_train`` carries a cotangent) against central differences of the float64 NumPy forward."""
    rng = np.random.default_rng(0)
    shape = (2, 5, 4, 3)
    x = rng.normal(2.0, 1.5, shape)
    scale, bias = rng.uniform(0.5, 1.5, 3), rng.normal(0, 1, 3)
    r, a, b = rng.normal(size=shape), rng.normal(size=3), rng.normal(size=3)

    def loss64(x, scale, bias):
        y, m, v = np_bn(x, scale, bias)
        return (r * y).sum() + (a * m).sum() + (b * v).sum()

    def loss32(x, scale, bias):
        y, m, v = bn_train(x, scale, bias, jnp.float32(EPS))
        return jnp.sum(r * y) + jnp.sum(a * m) + jnp.sum(b * v)

    f32 = lambda t: jnp.asarray(t, jnp.float32)   # noqa: E731
    grads = jax.grad(loss32, argnums=(0, 1, 2))(f32(x), f32(scale), f32(bias))
    h = 1e-5
    for i, (arg, g) in enumerate(zip((x, scale, bias), grads)):
        for _ in range(3):
            v = rng.normal(size=arg.shape)
            args_p = [x, scale, bias]
            args_m = [x, scale, bias]
            args_p[i] = arg + h * v
            args_m[i] = arg - h * v
            fd = (loss64(*args_p) - loss64(*args_m)) / (2 * h)
            ad = float(np.sum(np.asarray(g, np.float64) * v))
            assert abs(ad - fd) <= 1e-4 * max(1.0, abs(fd)), (i, ad, fd)


def test_forward_matches_float64():
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 0.1, (4, 8, 8, 16))     # large mean / std: the case two-pass variance is for
    scale, bias = rng.uniform(0.5, 1.5, 16), rng.normal(0, 1, 16)
    y, m, v = bn_train(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32),
                       jnp.asarray(bias, jnp.float32), jnp.float32(EPS))
    ry, rm, rv = np_bn(x, scale, bias)
    np.testing.assert_allclose(np.asarray(m), rm, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(v), rv, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(y), ry, atol=5e-4 * np.abs(ry).max())


def _flax_bn(train, momentum=0.9, dtype=jnp.float32):
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=EPS,
                        dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                        bias_init=nn.initializers.constant(1e-4))


def _ours(train, momentum=0.9, dtype=jnp.float32):
    return BatchNorm(use_running_average=not train, momentum=momentum, epsilon=EPS, dtype=dtype,
                     param_dtype=jnp.float32, bias_init=nn.initializers.constant(1e-4))


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (50.0, 5.0)])
def test_module_matches_flax_batchnorm(mean, std):
    """Same variable tree and initial values, same training outputs and running statistics, same
    inference outputs (bit for bit: the same formula), gradients of a SiLU'd output equal to
    autodiff of flax's module within float32 rounding — and no further from a float64 reference."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(mean, std, (4, 10, 10, 24)), jnp.float32)
    r = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    ref_vars = _flax_bn(True).init(jax.random.PRNGKey(0), x)
    our_vars = _ours(True).init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(ref_vars) == jax.tree.structure(our_vars)
    jax.tree.map(np.testing.assert_array_equal, ref_vars, our_vars)
    params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 24), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=24), jnp.float32)}
    stats = {"mean": jnp.asarray(rng.normal(size=24), jnp.float32),
             "var": jnp.asarray(rng.uniform(0.5, 2, 24), jnp.float32)}

    def loss(module):
        def f(p, x):
            y, upd = module.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
            return jnp.sum(nn.silu(y) * r), (y, upd["batch_stats"])
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (l_ref, (y_ref, st_ref)), g_ref = loss(_flax_bn(True))(params, x)
    (l_our, (y_our, st_our)), g_our = loss(_ours(True))(params, x)
    np.testing.assert_allclose(np.asarray(y_our), np.asarray(y_ref), atol=2e-5, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), st_our, st_ref)
    # float64 reference gradient of the same loss (NumPy forward, analytic chain through SiLU)
    x64, s64, b64, r64 = (np.asarray(t, np.float64) for t in (x, params["scale"], params["bias"], r))
    y64, m64, v64 = np_bn(x64, s64, b64)
    sig = 1 / (1 + np.exp(-y64))
    gy = r64 * (sig + y64 * sig * (1 - sig))
    n = x64.size // x64.shape[-1]
    inv = 1 / np.sqrt(v64 + EPS)
    xhat = (x64 - m64) * inv
    ref = {"bias": gy.sum((0, 1, 2)), "scale": (gy * xhat).sum((0, 1, 2))}
    ref["x"] = s64 * inv / n * (n * gy - ref["bias"] - xhat * ref["scale"])
    ours = {"scale": g_our[0]["scale"], "bias": g_our[0]["bias"], "x": g_our[1]}
    flax_ = {"scale": g_ref[0]["scale"], "bias": g_ref[0]["bias"], "x": g_ref[1]}
    for k in ref:
        scale_k = np.abs(ref[k]).max()
        np.testing.assert_allclose(np.asarray(ours[k]), np.asarray(flax_[k]), atol=1e-5 * scale_k)
        err_ours = np.abs(np.asarray(ours[k], np.float64) - ref[k]).max() / scale_k
        err_flax = np.abs(np.asarray(flax_[k], np.float64) - ref[k]).max() / scale_k
        assert err_ours <= 2 * err_flax + 1e-6, (k, err_ours, err_flax)
    # inference: the same formula as flax's, bit for bit
    for dtype in (jnp.float32, jnp.bfloat16):
        yi_ref = _flax_bn(False, dtype=dtype).apply({"params": params, "batch_stats": stats}, x)
        yi_our = _ours(False, dtype=dtype).apply({"params": params, "batch_stats": stats}, x)
        assert yi_our.dtype == yi_ref.dtype == dtype
        np.testing.assert_array_equal(np.asarray(yi_our, np.float32), np.asarray(yi_ref, np.float32))


def test_bfloat16_training_computes_statistics_in_float32():
    """bf16 activations: statistics and gradient in float32, output and input gradient in bf16,
    close to the float32 module."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(3.0, 2.0, (2, 6, 6, 8)), jnp.float32)
    variables = _ours(True).init(jax.random.PRNGKey(0), x)

    def f(module, x):
        y, upd = module.apply(variables, x, mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) ** 2), upd

    (l32, u32), g32 = jax.value_and_grad(lambda x: f(_ours(True), x), has_aux=True)(x)
    (l16, u16), g16 = jax.value_and_grad(lambda x: f(_ours(True, dtype=jnp.bfloat16), x),
                                         has_aux=True)(x.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    assert u16["batch_stats"]["mean"].dtype == jnp.float32
    np.testing.assert_allclose(float(l16), float(l32), rtol=2e-2)
    np.testing.assert_allclose(np.asarray(u16["batch_stats"]["var"]), np.asarray(u32["batch_stats"]["var"]),
                               rtol=2e-2)
