"""CPU-friendly op formulations (damo_jax/models/cpu_ops.py), the ``model.depthwise_impl`` and
``model.pointwise_impl`` switches.

Checks: shifted-slice depthwise conv == grouped conv (values, dtypes, gradients, fallback), separable
cascaded SPP pools == the 5/9/13 max pools bit for bit, the impl resolution, and on the Ns model that
both formulations share one parameter tree, agree on the outputs, and that ``"conv"`` traces exactly
one grouped conv per depthwise layer (what the ONNX export relies on) while ``"taps"`` traces none;
1x1 convs as matrix products == the 1x1 conv (values, gradients, fallbacks), and on S and Ns that
``pointwise_impl="dot"`` leaves no 1x1 conv in the graph while the export config keeps every one.
"""
from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from damo_jax.config import load_config
from damo_jax.errors import ConfigError
from damo_jax.models import build_model, init_variables, with_depthwise_impl
from damo_jax.models.blocks import Opts
from damo_jax.models.cpu_ops import (depthwise_conv_taps, max_pool_same, pointwise_conv_dot,
                                     resolve_depthwise_impl, resolve_pointwise_impl, spp_max_pools)

NHWC = ("NHWC", "HWIO", "NHWC")


def _pair(shape, k, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((k, k, 1, shape[-1])).astype(dtype)
    return jnp.asarray(x), jnp.asarray(w)


def _both(x, w, stride, padding):
    kw = dict(dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, NHWC),
              feature_group_count=x.shape[-1])
    ref = lax.conv_general_dilated(x, w, (stride, stride), padding, **kw)
    got = depthwise_conv_taps(x, w, (stride, stride), padding, **kw)
    return ref, got


@pytest.mark.parametrize("shape,k,stride,padding", [
    ((2, 13, 11, 8), 5, 1, ((2, 2), (2, 2))),
    ((1, 16, 16, 24), 5, 2, ((2, 2), (2, 2))),
    ((1, 9, 14, 5), 3, 2, ((1, 1), (1, 1))),     # odd H, non-square
    ((1, 12, 12, 4), 3, 1, ((0, 2), (1, 0))),    # asymmetric padding
    ((1, 12, 10, 6), 3, 2, "SAME"),
    ((1, 7, 7, 3), 5, 1, "VALID"),
])
def test_depthwise_taps_matches_grouped_conv(shape, k, stride, padding):
    x, w = _pair(shape, k)
    ref, got = _both(x, w, stride, padding)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_depthwise_taps_float64_and_bfloat16():
    with jax.enable_x64(True):
        x, w = _pair((1, 10, 10, 6), 5, dtype=np.float64)
        ref, got = _both(x, w, 2, ((2, 2), (2, 2)))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-12, atol=1e-12)
    x, w = _pair((1, 10, 10, 6), 5)
    ref32, _ = _both(x, w, 1, ((2, 2), (2, 2)))
    _, got16 = _both(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), 1, ((2, 2), (2, 2)))
    assert got16.dtype == jnp.bfloat16  # accumulated in float32, returned in the input dtype
    np.testing.assert_allclose(np.asarray(got16, np.float32), np.asarray(ref32), rtol=0.05, atol=0.3)


def test_depthwise_taps_gradients_match():
    x, w = _pair((2, 12, 12, 8), 5, seed=3)

    def loss(fn, x, w):
        kw = dict(dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, NHWC),
                  feature_group_count=x.shape[-1])
        return (fn(x, w, (2, 2), ((2, 2), (2, 2)), **kw) ** 2).sum()

    g_ref = jax.grad(lambda x, w: loss(lax.conv_general_dilated, x, w), (0, 1))(x, w)
    g_taps = jax.grad(lambda x, w: loss(depthwise_conv_taps, x, w), (0, 1))(x, w)
    for a, b in zip(g_ref, g_taps):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-3)


def test_non_depthwise_convs_fall_back_unchanged():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 6)), jnp.float32)
    for w_shape, groups in [((3, 3, 6, 4), 1), ((3, 3, 2, 6), 3), ((1, 1, 1, 12), 6)]:
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        kw = dict(dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, NHWC),
                  feature_group_count=groups)
        ref = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), **kw)
        got = depthwise_conv_taps(x, w, (1, 1), ((1, 1), (1, 1)), **kw)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # dilation is not handled by taps either: must still equal the dilated conv
    x, w = _pair((1, 10, 10, 4), 3)
    kw = dict(dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, NHWC),
              feature_group_count=4, rhs_dilation=(2, 2))
    np.testing.assert_array_equal(
        np.asarray(depthwise_conv_taps(x, w, (1, 1), ((2, 2), (2, 2)), **kw)),
        np.asarray(lax.conv_general_dilated(x, w, (1, 1), ((2, 2), (2, 2)), **kw)))


def _conv_kw(x, w, **extra):
    return dict(dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, NHWC), **extra)


@pytest.mark.parametrize("shape,cout,stride", [
    ((2, 8, 8, 24), 40, 1),
    ((2, 10, 10, 16), 32, 2),
    ((1, 9, 7, 8), 12, 2),      # odd sizes: the last row / column is read at stride 2
    ((1, 5, 11, 3), 7, (1, 2)),  # non-square, anisotropic stride
])
def test_pointwise_dot_matches_1x1_conv(shape, cout, stride):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 1, shape[-1], cout)), jnp.float32)
    strides = (stride, stride) if isinstance(stride, int) else stride
    pad = ((0, 0), (0, 0))
    ref = lax.conv_general_dilated(x, w, strides, pad, **_conv_kw(x, w))
    got = pointwise_conv_dot(x, w, strides, pad, **_conv_kw(x, w))
    assert got.shape == ref.shape and got.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # independent float64 reference: y[b, i, j] = x[b, i*sh, j*sw] @ w[0, 0]
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)[0, 0]
    want = x64[:, ::strides[0], ::strides[1]] @ w64
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
    # gradients w.r.t. input and kernel: autodiff of the product == autodiff of the conv
    g = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)

    def grads(fn):
        return jax.grad(lambda x_, w_: jnp.vdot(fn(x_, w_, strides, pad, **_conv_kw(x_, w_)), g),
                        (0, 1))(x, w)
    for a, b in zip(grads(lax.conv_general_dilated), grads(pointwise_conv_dot)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)


def test_pointwise_dot_bfloat16_and_fallbacks():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((1, 6, 6, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((1, 1, 8, 4)), jnp.bfloat16)
    ref = lax.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)), **_conv_kw(x, w))
    got = pointwise_conv_dot(x, w, (1, 1), ((0, 0), (0, 0)), **_conv_kw(x, w))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                               rtol=0.02, atol=0.05)
    # not a plain 1x1 conv: passed to lax.conv_general_dilated unchanged (no dot_general)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 6)), jnp.float32)
    for w_shape, pad, extra in [((3, 3, 6, 4), ((1, 1), (1, 1)), {}),
                                ((1, 1, 6, 4), ((1, 1), (1, 1)), {}),          # padded 1x1
                                ((1, 1, 3, 6), ((0, 0), (0, 0)), {"feature_group_count": 2}),
                                ((1, 1, 6, 4), ((0, 0), (0, 0)), {"lhs_dilation": (2, 2)})]:
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        kw = _conv_kw(x, w, **extra)
        jaxpr = str(jax.make_jaxpr(lambda x, w: pointwise_conv_dot(x, w, (1, 1), pad, **kw))(x, w))
        assert "dot_general" not in jaxpr and "conv_general_dilated" in jaxpr, (w_shape, extra)
        np.testing.assert_array_equal(np.asarray(pointwise_conv_dot(x, w, (1, 1), pad, **kw)),
                                      np.asarray(lax.conv_general_dilated(x, w, (1, 1), pad, **kw)))


@pytest.mark.parametrize("resolve,key,on_cpu,other,bad", [
    (resolve_depthwise_impl, "depthwise_impl", "taps", "conv", "winograd"),
    (resolve_pointwise_impl, "pointwise_impl", "dot", "conv", "im2col")])
def test_resolve_impl(resolve, key, on_cpu, other, bad):
    """``auto`` picks the CPU formulation on CPU only; explicit values pass through on any
    backend; unknown values are ConfigErrors naming the key, from the resolver and from Opts."""
    assert resolve("auto", "cpu") == on_cpu
    assert resolve("auto", "gpu") == other
    assert resolve("auto", "tpu") == other
    assert resolve(other, "cpu") == other
    assert resolve(on_cpu, "gpu") == on_cpu
    assert resolve("auto") == (on_cpu if jax.default_backend() == "cpu" else other)
    for call in (lambda: resolve(bad), lambda: Opts(**{key: bad})):
        with pytest.raises(ConfigError, match=f"model.{key} must be one of"):
            call()


def test_pointwise_impl_config():
    cfg = with_depthwise_impl("s", "conv", "conv")
    assert (cfg.model.depthwise_impl, cfg.model.pointwise_impl) == ("conv", "conv")
    assert load_config("s").model.pointwise_impl == "auto"
    with pytest.raises(ValueError, match="pointwise_impl"):
        with_depthwise_impl("s", "conv", "bogus")
    legacy = load_config("s")  # configs saved before the key existed default to "auto"
    del legacy.model["pointwise_impl"]
    assert build_model(legacy).backbone.opts.pointwise_impl == "auto"


def _count_1x1(jaxpr, counts):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            counts["conv1x1" if eqn.invars[1].aval.shape[:2] == (1, 1) else "conv_other"] += 1
        elif eqn.primitive.name == "dot_general":
            counts["dot"] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _count_1x1(sub, counts)
    return counts


@pytest.mark.parametrize("name", ["s", "ns"])
def test_pointwise_dot_model_structure_and_outputs(name):
    """``pointwise_impl="dot"``: every 1x1 conv of the train and deploy graphs becomes one
    dot_general (none left), other convs untouched, same variables, outputs within float32
    rounding; the export config keeps them all as convs."""
    from damo_jax.models.reparam import fuse
    key = jax.random.PRNGKey(0)
    cfg_conv, cfg_dot = with_depthwise_impl(name, "conv", "conv"), with_depthwise_impl(name, "conv", "dot")
    for c in (cfg_conv, cfg_dot):   # the XLA train path (grad_impl "onednn" runs dense convs in oneDNN)
        c.model.grad_impl = "matmul"
    variables = init_variables(build_model(cfg_conv), key)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables,
                           init_variables(build_model(cfg_dot), key))
    fused = fuse(variables, name, fuse_bn=True)
    images = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 64, 3), maxval=255.0)
    for deploy, v in ((False, variables), (True, fused)):
        outs, counts = {}, {}
        for impl, cfg in (("conv", cfg_conv), ("dot", cfg_dot)):
            model = build_model(cfg, deploy=deploy)

            def fn(v, x, model=model):
                out = model.apply(v, x)
                return {k: out[k] for k in ("scores", "boxes")}
            counts[impl] = _count_1x1(jax.make_jaxpr(fn)(v, images).jaxpr,
                                      {"conv1x1": 0, "conv_other": 0, "dot": 0})
            outs[impl] = jax.jit(fn)(v, images)
        assert counts["conv"]["conv1x1"] > 0 and counts["dot"]["conv1x1"] == 0, counts
        assert counts["dot"]["conv_other"] == counts["conv"]["conv_other"], counts
        assert counts["dot"]["dot"] - counts["conv"]["dot"] == counts["conv"]["conv1x1"], counts
        for k in outs["conv"]:
            np.testing.assert_allclose(np.asarray(outs["dot"][k]), np.asarray(outs["conv"][k]),
                                       rtol=1e-4, atol=1e-4, err_msg=f"deploy={deploy} {k}")


@pytest.mark.parametrize("sizes", [(5, 9, 13), (9, 5, 13), (3,), (1, 5), (3, 7, 7)])
def test_separable_spp_pools_are_bit_identical(sizes):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 11, 9, 5)), jnp.float32)
    ref = spp_max_pools(x, sizes, separable=False)
    got = spp_max_pools(x, sizes, separable=True)
    assert len(got) == len(sizes)
    for k, a, b in zip(sizes, ref, got):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=f"pool {k}")
    np.testing.assert_array_equal(np.asarray(ref[0]), np.asarray(max_pool_same(x, sizes[0])))
    with pytest.raises(ValueError, match="odd"):
        spp_max_pools(x, (4,), separable=True)


def test_with_depthwise_impl_copies_and_validates():
    cfg = load_config("ns")
    assert cfg.model.depthwise_impl == "auto"
    conv_cfg = with_depthwise_impl(cfg, "conv")
    assert conv_cfg.model.depthwise_impl == "conv" and cfg.model.depthwise_impl == "auto"
    with pytest.raises(ValueError, match="depthwise_impl"):
        with_depthwise_impl(cfg, "bogus")
    bad = with_depthwise_impl(cfg, "conv")
    bad.model.depthwise_impl = "bogus"
    with pytest.raises(ValueError, match="depthwise_impl"):
        build_model(bad)
    legacy = load_config("ns")  # configs saved before the key existed default to "auto"
    del legacy.model["depthwise_impl"]
    assert build_model(legacy).backbone.opts.depthwise_impl == "auto"


def _count_ops(jaxpr, counts):
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated" and eqn.params["feature_group_count"] > 1:
            counts["grouped_conv"] += 1
        elif name == "reduce_window_max":
            counts["max_pool"] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _count_ops(sub, counts)
    return counts


def test_ns_model_conv_and_taps_agree():
    """Same variables for both forms; outputs within float32 rounding; op structure as exported."""
    cfg_conv, cfg_taps = with_depthwise_impl("ns", "conv"), with_depthwise_impl("ns", "taps")
    for c in (cfg_conv, cfg_taps):   # the XLA path (grad_impl "onednn" runs these convs in oneDNN)
        c.model.grad_impl = "matmul"
    key = jax.random.PRNGKey(0)
    v_conv = init_variables(build_model(cfg_conv), key)
    v_taps = init_variables(build_model(cfg_taps), key)
    jax.tree_util.tree_map(np.testing.assert_array_equal, v_conv, v_taps)

    images = jax.random.uniform(jax.random.PRNGKey(1), (1, 64, 96, 3), maxval=255.0)
    outs = {}
    for name, cfg in (("conv", cfg_conv), ("taps", cfg_taps)):
        model = build_model(cfg)

        def fn(v, x, model=model):
            out = model.apply(v, x)
            return {k: out[k] for k in ("scores", "boxes", "dfl")}
        counts = _count_ops(jax.make_jaxpr(fn)(v_conv, images).jaxpr,
                            {"grouped_conv": 0, "max_pool": 0})
        outs[name] = jax.jit(fn)(v_conv, images)
        if name == "conv":  # 15 backbone Mob blocks + 4 neck Mob blocks + 5 neck down-samplers
            assert counts == {"grouped_conv": 24, "max_pool": 3}, counts
        else:               # no grouped conv; SPP pools as 3 x (kx1, 1xk) windows
            assert counts == {"grouped_conv": 0, "max_pool": 6}, counts
    for key_ in outs["conv"]:
        np.testing.assert_allclose(np.asarray(outs["taps"][key_]), np.asarray(outs["conv"][key_]),
                                   rtol=1e-4, atol=1e-4, err_msg=key_)
