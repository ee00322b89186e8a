"""``model.bn_impl = "native"``: training-mode BatchNorm (+ ReLU, + a residual) as one native call
(``damo_jax/models/batchnorm_ffi.c``).

References: a float64 NumPy forward and its analytic gradient (independent of the code under
test), XLA's formulation (``bn_train`` + the activation in XLA), and the official model outputs
through the golden tests (which run the CPU default, ``auto`` = native here)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from damo_jax.errors import ConfigError
from damo_jax.models import batchnorm as bnmod
from damo_jax.models.batchnorm import BatchNorm, bn_add_native, bn_train, bn_train_native

EPS = 1e-3

pytestmark = pytest.mark.skipif(not bnmod.native_available(),
                                reason=f"native BatchNorm unavailable: {bnmod._native_state()['reason']}")


def ref64(x, res, scale, bias, relu, dz, g_mean, g_var):
    """float64: z = act(BN(x) + res), mean, var, and the gradients of <dz, z> + <g_mean, mean> +
    <g_var, var> with respect to x, res, scale, bias."""
    c = x.shape[-1]
    xs = x.reshape(-1, c).astype(np.float64)
    n = xs.shape[0]
    mean = xs.mean(0)
    var = ((xs - mean) ** 2).mean(0)
    inv = 1 / np.sqrt(var + EPS)
    xhat = (xs - mean) * inv
    v = xhat * scale + bias + (0 if res is None else res.reshape(-1, c))
    z = np.maximum(v, 0) if relu else v
    g = dz.reshape(-1, c).astype(np.float64) * ((v > 0) if relu else 1)
    dbias, dscale = g.sum(0), (g * xhat).sum(0)
    dx = scale * inv / n * (n * g - dbias - xhat * dscale) + g_mean / n + (xs - mean) * 2 * g_var / n
    return dict(z=z.reshape(x.shape), mean=mean, var=var, dx=dx.reshape(x.shape),
                dres=g.reshape(x.shape), dscale=dscale, dbias=dbias)


def xla_version(x, res, scale, bias, relu):
    y, m, v = bn_train(x, scale, bias, jnp.float32(EPS))
    y = y if res is None else y + res
    return (jax.nn.relu(y) if relu else y), m, v


def native_version(x, res, scale, bias, relu):
    if res is None:
        return bn_train_native(x, scale, bias, jnp.float32(EPS), int(relu))
    return bn_add_native(x, res, scale, bias, jnp.float32(EPS), int(relu))


def _case(shape, relu, with_res, seed):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.normal(50.0, 5.0, shape).astype(np.float32)   # large mean / std: cancellation-prone
    res = rng.normal(0.0, 1.0, shape).astype(np.float32) if with_res else None
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.normal(0.0, 1.0, c).astype(np.float32)
    dz = rng.normal(size=shape).astype(np.float32)
    g_mean, g_var = rng.normal(size=c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    ref = ref64(x, res, scale, bias, relu, dz, g_mean, g_var)
    if relu:   # no cotangent right at the kink, where float32 and float64 may pick different sides
        dz = np.where(np.abs(ref["z"] - 0) < 1e-3, 0, dz).astype(np.float32)
        ref = ref64(x, res, scale, bias, relu, dz, g_mean, g_var)
    return x, res, scale, bias, dz, g_mean, g_var, ref


def _run(fn, x, res, scale, bias, relu, dz, g_mean, g_var):
    if res is None:
        out, vjp = jax.vjp(lambda x, s, b: fn(x, None, s, b, relu), x, scale, bias)
        dx, dscale, dbias = vjp((dz, g_mean, g_var))
        dres = None
    else:
        out, vjp = jax.vjp(lambda x, r, s, b: fn(x, r, s, b, relu), x, res, scale, bias)
        dx, dres, dscale, dbias = vjp((dz, g_mean, g_var))
    got = dict(z=out[0], mean=out[1], var=out[2], dx=dx, dscale=dscale, dbias=dbias)
    if dres is not None:
        got["dres"] = dres
    return {k: np.asarray(v, np.float64) for k, v in got.items()}


# (shape, relu, residual): several threads and 64-row blocks (8 x 40 x 40), one thread (small),
# rows not a multiple of the block or of the team, one channel
CASES = [((8, 40, 40, 64), True, False), ((8, 40, 40, 64), False, False),
         ((8, 40, 40, 64), True, True), ((8, 40, 40, 64), False, True),
         ((3, 5, 7, 16), True, False), ((3, 5, 7, 16), True, True),
         ((2, 33, 17, 24), True, True), ((5, 37, 29, 3), False, False), ((4, 9, 11, 1), True, False)]


@pytest.mark.parametrize("shape,relu,with_res", CASES, ids=lambda v: str(v))
def test_native_matches_float64_and_is_no_less_accurate_than_xla(shape, relu, with_res):
    """Outputs and every gradient within 1e-5 of a float64 reference (relative to the largest
    entry) and no further from it than XLA's formulation, give or take float32 rounding (+ 5e-7,
    ~4 ulps: how the kernel's float32 block sums round depends on the instructions the compiler
    picks; built without FMA — GCC's baseline or "avx2" target, Clang — the one-channel case's
    dscale is 4.8e-7 from the reference against XLA's 2.6e-7, with FMA it is within 1e-7)."""
    x, res, scale, bias, dz, g_mean, g_var, ref = _case(shape, relu, with_res, seed=sum(shape))
    nat = _run(native_version, x, res, scale, bias, relu, dz, g_mean, g_var)
    xla = _run(xla_version, x, res, scale, bias, relu, dz, g_mean, g_var)
    assert set(nat) == set(xla) == set(ref) - ({"dres"} if res is None else set())
    for k in nat:
        size = max(np.abs(ref[k]).max(), 1e-30)
        e_nat = np.abs(nat[k] - ref[k]).max() / size
        e_xla = np.abs(xla[k] - ref[k]).max() / size
        assert e_nat <= 1e-5, (k, e_nat)
        assert e_nat <= e_xla + 5e-7, (k, e_nat, e_xla)


def test_relu_propagates_nan_like_xla():
    """A non-finite input stays non-finite through the native BN + ReLU (as XLA's max(y, 0)), so
    the train step's non-finite guard still sees it; the gradient of a NaN'd channel is NaN too."""
    x, res, scale, bias, dz, g_mean, g_var, _ = _case((2, 8, 8, 4), True, True, seed=7)
    x = x.copy()
    x[0, 3, 3, 1] = np.nan
    for fn in (native_version, xla_version):
        z = np.asarray(fn(jnp.asarray(x), jnp.asarray(res), scale, bias, True)[0])
        assert np.isnan(z[..., 1]).all() and np.isfinite(z[..., [0, 2, 3]]).all(), fn.__name__
    nat = _run(native_version, x, res, scale, bias, True, dz, g_mean, g_var)
    assert np.isnan(nat["dscale"][1]) and np.isfinite(nat["dscale"][[0, 2, 3]]).all()


@pytest.mark.parametrize("act", ["relu", "silu", None])
@pytest.mark.parametrize("with_res", [False, True])
def test_module_native_matches_xla(act, with_res):
    """``BatchNorm(impl="native")`` against ``impl="xla"``: same variables, outputs, running
    statistics and gradients (parameters, input, residual) within float32 rounding; inference mode
    identical (both XLA)."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(3.0, 2.0, (4, 12, 12, 32)), jnp.float32)
    res = jnp.asarray(rng.normal(size=x.shape), jnp.float32) if with_res else None
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def module(impl, train=True):
        return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=EPS, act=act, impl=impl,
                         bias_init=nn.initializers.constant(0.1))

    variables = module("xla").init(jax.random.PRNGKey(0), x, res)
    jax.tree.map(np.testing.assert_array_equal, variables, module("native").init(jax.random.PRNGKey(0), x, res))

    def run(impl):
        def f(params, x, res):
            y, upd = module(impl).apply({"params": params, "batch_stats": variables["batch_stats"]}, x, res,
                                        mutable=["batch_stats"])
            return jnp.vdot(y, w), (y, upd["batch_stats"])
        argnums = (0, 1, 2) if with_res else (0, 1)
        return jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(variables["params"], x, res)

    (l_x, (y_x, st_x)), g_x = run("xla")
    (l_n, (y_n, st_n)), g_n = run("native")
    np.testing.assert_allclose(np.asarray(y_n), np.asarray(y_x), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), st_n, st_x)
    for a, b in zip(jax.tree.leaves(g_n), jax.tree.leaves(g_x)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), np.abs(a - b).max() / np.abs(b).max()
    yi_x = module("xla", False).apply(variables, x, res)
    yi_n = module("native", False).apply(variables, x, res)
    np.testing.assert_array_equal(np.asarray(yi_n), np.asarray(yi_x))


def test_native_is_one_call_per_batchnorm_in_the_train_graph():
    """The train graph of a ReLU model runs its BN + add + ReLU sites as native calls: the lowered
    step holds the native targets and (RepConv / residual sites) the fused add variant."""
    from damo_jax.config import load_config
    from damo_jax.models import build_model, init_variables
    cfg = load_config("t")
    cfg.model.bn_impl = "native"
    model = build_model(cfg)
    v = init_variables(model, jax.random.PRNGKey(0))
    x = jnp.zeros((1, 64, 64, 3))

    def loss(p):
        out, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(out["scores"])
    text = jax.jit(jax.grad(loss)).lower(v["params"]).as_text()
    for target in ("damo_jax_bn_fwd", "damo_jax_bn_bwd", "damo_jax_bn_add_fwd", "damo_jax_bn_add_bwd"):
        assert target in text, target
    cfg.model.bn_impl = "xla"
    xla_model = build_model(cfg)

    def loss_x(p):
        out, _ = xla_model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                 mutable=["batch_stats"])
        return jnp.sum(out["scores"])
    assert "damo_jax_bn" not in jax.jit(jax.grad(loss_x)).lower(v["params"]).as_text()


def test_resolve_bn_impl(monkeypatch):
    assert bnmod.resolve_bn_impl("xla") == "xla"
    assert bnmod.resolve_bn_impl("auto", backend="gpu") == "xla"
    assert bnmod.resolve_bn_impl("native", backend="cpu") == "native"
    with pytest.raises(ConfigError, match="model.bn_impl"):
        bnmod.resolve_bn_impl("fast")
    with pytest.raises(ConfigError, match="CPU only"):
        bnmod.resolve_bn_impl("native", backend="gpu")
    monkeypatch.setattr(jax, "device_count", lambda *a: 2)      # a mesh: XLA's ops
    assert bnmod.resolve_bn_impl("auto", backend="cpu") == "xla"


def test_python_handler_choice_means_no_native_batchnorm(monkeypatch):
    """``DAMO_JAX_ONEDNN_HANDLER=python`` (no native code in this process): ``auto`` is XLA's ops,
    ``native`` a one-line ConfigError naming the variable."""
    monkeypatch.setattr(bnmod, "_NATIVE", {})
    monkeypatch.setenv("DAMO_JAX_ONEDNN_HANDLER", "python")
    assert bnmod.resolve_bn_impl("auto", backend="cpu") == "xla"
    with pytest.raises(ConfigError, match="DAMO_JAX_ONEDNN_HANDLER=python"):
        bnmod.resolve_bn_impl("native", backend="cpu")


def test_train_log_names_the_batchnorm_path():
    assert bnmod.describe_bn_impl("xla") == "BatchNorm: XLA's ops"
    assert "native" in bnmod.describe_bn_impl("native", "float32", "cpu")
    assert "float32 only" in bnmod.describe_bn_impl("native", "bfloat16", "cpu")
    assert bnmod.describe_bn_impl("auto", "float32", "gpu") == "BatchNorm: XLA's ops"
