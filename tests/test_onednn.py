"""``model.grad_impl = "onednn"``: dense convs of CPU train graphs in oneDNN through an XLA FFI
handler (damo_jax/models/onednn.py).

References are never the module's own numbers: ``lax.conv_general_dilated`` and ``jax.grad`` of
it (per conv kind and shape family of the released models, both strides, odd sizes), a float64
NumPy convolution, and whole T / S / Ns models on the native path. Also: the custom calls are in
the compiled graph (not silently the native op), the input gradient is skipped when nothing needs
it, errors inside the handler surface as Python exceptions, repeated runs are bit-identical, and
``auto`` picks oneDNN only where it applies.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from damo_jax.models import onednn
from damo_jax.models.conv_grad import make_conv_general_dilated
from damo_jax.models.cpu_ops import _NHWC_DIMS

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not onednn.available(),
    reason=f"oneDNN CPU path unavailable: {onednn.unavailable_reason() or jax.default_backend()}")

RTOL = 1e-5

# dense shape families of the seven models (see tests/test_conv_grad.py CASES), plus a 5x5 s2
# and an asymmetric padding
CASES = [
    ("dense3x3_s1", 2, 10, 10, 16, 24, 3, 1, (1, 1, 1, 1)),
    ("dense3x3_s2", 2, 10, 10, 16, 32, 3, 2, (1, 1, 1, 1)),
    ("dense3x3_s2_odd", 1, 9, 7, 8, 8, 3, 2, (1, 1, 1, 1)),
    ("dense1x1_s1", 2, 8, 8, 24, 40, 1, 1, (0, 0, 0, 0)),
    ("dense1x1_s2", 2, 10, 10, 16, 32, 1, 2, (0, 0, 0, 0)),
    ("focus3x3", 1, 8, 8, 12, 16, 3, 1, (1, 1, 1, 1)),
    ("dense5x5_s1", 1, 8, 8, 8, 8, 5, 1, (2, 2, 2, 2)),
    ("dense5x5_s2_odd", 1, 11, 9, 6, 10, 5, 2, (2, 2, 2, 2)),
    ("dense3x3_asym_pad", 1, 8, 9, 4, 8, 3, 2, (0, 1, 1, 0)),
]


def _pads(p):
    return ((p[0], p[1]), (p[2], p[3]))


def _data(case):
    name, b, h, w, cin, cout, k, s, p = case
    kx, kw = jax.random.split(jax.random.PRNGKey(zlib.crc32(name.encode())))
    x = jax.random.normal(kx, (b, h, w, cin))
    kernel = jax.random.normal(kw, (k, k, cin, cout)) / np.sqrt(k * k * cin)
    return x, kernel


def native(x, w, s, p):
    return lax.conv_general_dilated(x, w, (s, s), _pads(p), dimension_numbers=_NHWC_DIMS)


def fast(x, w, s, p):
    return make_conv_general_dilated(taps=False, onednn_convs=True)(
        x, w, (s, s), _pads(p), dimension_numbers=_NHWC_DIMS)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def conv_f64(x, w, s, p, depthwise=False):
    """Independent float64 NumPy reference: explicit sum over taps (NHWC, HWIO; ``depthwise``:
    kernel (kh, kw, 1, C), one filter per channel)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    (pt, pb), (pl, pr) = _pads(p)
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw = w.shape[:2]
    ho, wo = (xp.shape[1] - kh) // s + 1, (xp.shape[2] - kw) // s + 1
    y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + (ho - 1) * s + 1:s, j:j + (wo - 1) * s + 1:s, :]
            y += patch * w[i, j, 0] if depthwise else patch @ w[i, j]
    return y


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_forward_and_gradients_match_native(case):
    name, b, h, w, cin, cout, k, s, p = case
    x, kernel = _data(case)
    y = jax.jit(lambda x, w: fast(x, w, s, p))(x, kernel)
    y_native = native(x, kernel, s, p)
    assert y.shape == y_native.shape
    assert rel_err(y, conv_f64(x, kernel, s, p)) <= RTOL
    assert rel_err(y, y_native) <= RTOL
    g = jax.random.normal(jax.random.PRNGKey(7), y.shape)

    def grads(conv):
        return jax.jit(jax.grad(lambda x_, w_: jnp.vdot(conv(x_, w_, s, p), g), (0, 1)))(x, kernel)
    (dx, dw), (dx_n, dw_n) = grads(fast), grads(native)
    assert rel_err(dx, dx_n) <= RTOL, rel_err(dx, dx_n)
    assert rel_err(dw, dw_n) <= RTOL, rel_err(dw, dw_n)


# depthwise convs of the nano models (groups == channels, multiplier 1): 3x3 / 5x5, strides 1 / 2
DW_CASES = [
    ("dw3x3_s1", 2, 10, 10, 16, 3, 1, (1, 1, 1, 1)),
    ("dw3x3_s2_odd", 1, 9, 7, 24, 3, 2, (1, 1, 1, 1)),
    ("dw5x5_s1", 2, 12, 12, 32, 5, 1, (2, 2, 2, 2)),
    ("dw5x5_s2", 1, 11, 10, 8, 5, 2, (2, 2, 2, 2)),
    ("dw3x3_asym_pad", 1, 8, 9, 8, 3, 2, (0, 1, 1, 0)),
]


@pytest.mark.parametrize("case", DW_CASES, ids=lambda c: c[0])
def test_depthwise_forward_and_gradients_match_native(case):
    name, b, h, w, c, k, s, p = case
    kx, kw = jax.random.split(jax.random.PRNGKey(zlib.crc32(name.encode())))
    x = jax.random.normal(kx, (b, h, w, c))
    kernel = jax.random.normal(kw, (k, k, 1, c)) / k

    def conv_with(fn):
        return lambda x_, w_: fn(x_, w_, (s, s), _pads(p), dimension_numbers=_NHWC_DIMS,
                                 feature_group_count=c)
    fast_dw = conv_with(make_conv_general_dilated(taps=True, onednn_convs=True))
    native_dw = conv_with(lax.conv_general_dilated)
    assert "damo_jax_onednn_conv_fwd" in str(jax.make_jaxpr(fast_dw)(x, kernel))
    y = jax.jit(fast_dw)(x, kernel)
    assert rel_err(y, conv_f64(x, kernel, s, p, depthwise=True)) <= RTOL
    assert rel_err(y, native_dw(x, kernel)) <= RTOL
    g = jax.random.normal(jax.random.PRNGKey(7), y.shape)

    def grads(conv):
        return jax.jit(jax.grad(lambda x_, w_: jnp.vdot(conv(x_, w_), g), (0, 1)))(x, kernel)
    (dx, dw), (dx_n, dw_n) = grads(fast_dw), grads(native_dw)
    assert rel_err(dx, dx_n) <= RTOL, rel_err(dx, dx_n)
    assert rel_err(dw, dw_n) <= RTOL, rel_err(dw, dw_n)


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_custom_calls_in_graph_and_input_gradient_skipped_when_unused():
    x, kernel = _data(CASES[1])
    g = jnp.ones((2, 5, 5, 32))
    both = _hlo(jax.grad(lambda x_, w_: jnp.vdot(fast(x_, w_, 2, (1, 1, 1, 1)), g), (0, 1)), x, kernel)
    assert "damo_jax_onednn_conv_bwd" in both and "damo_jax_onednn_conv_bwd_weights" not in both
    w_only = _hlo(jax.grad(lambda w_: jnp.vdot(fast(x, w_, 2, (1, 1, 1, 1)), g)), kernel)
    assert "damo_jax_onednn_conv_bwd_weights" in w_only
    assert "damo_jax_onednn_conv_bwd\"" not in w_only and "convolution" not in w_only
    dw = jax.jit(jax.grad(lambda w_: jnp.vdot(fast(x, w_, 2, (1, 1, 1, 1)), g)))(kernel)
    dw_n = jax.grad(lambda w_: jnp.vdot(native(x, w_, 2, (1, 1, 1, 1)), g))(kernel)
    assert rel_err(dw, dw_n) <= RTOL


def test_unsupported_inputs_keep_the_xla_path():
    """bfloat16, grouped convs other than depthwise (multiplier 1) and dilation never reach
    oneDNN."""
    conv = make_conv_general_dilated(taps=False, onednn_convs=True)
    x, w = jnp.ones((1, 8, 8, 8)), jnp.ones((3, 3, 8, 8))
    cases = {
        "bf16": lambda: conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), ((1, 1), (1, 1)),
                             dimension_numbers=_NHWC_DIMS),
        "groups": lambda: conv(x, jnp.ones((3, 3, 4, 8)), (1, 1), ((1, 1), (1, 1)),
                               dimension_numbers=_NHWC_DIMS, feature_group_count=2),
        "depthwise_multiplier_2": lambda: conv(x, jnp.ones((3, 3, 1, 16)), (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=_NHWC_DIMS, feature_group_count=8),
        "dilation": lambda: conv(x, w, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2),
                                 dimension_numbers=_NHWC_DIMS),
    }
    for name, f in cases.items():
        assert "damo_jax_onednn" not in str(jax.make_jaxpr(f)()), name


def test_handler_errors_surface_as_exceptions():
    """A failure inside the FFI handler becomes the op's XLA error (a Python exception naming it),
    not a crash or a silent garbage result."""
    onednn._register_targets()
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    call = jax.ffi.ffi_call("damo_jax_onednn_conv_fwd", jax.ShapeDtypeStruct((1, 4, 4, 2), jnp.float32))
    with pytest.raises(Exception, match="attribute conf"):
        jax.block_until_ready(jax.jit(lambda x, w: call(x, w))(x, w))
    bad = np.array([1, 1, 0, 0, 0, 0], np.int64)   # no padding: the output would be 2x2, not 4x4
    with pytest.raises(Exception, match="output shape"):
        jax.block_until_ready(jax.jit(lambda x, w: call(x, w, conf=bad))(x, w))


def test_repeated_runs_are_bit_identical():
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 24, 24, 32))
    w = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 32, 48)) / 17
    g = jax.random.normal(jax.random.PRNGKey(5), (4, 24, 24, 48))
    f = jax.jit(jax.grad(lambda x_, w_: jnp.vdot(fast(x_, w_, 1, (1, 1, 1, 1)), g), (0, 1)))
    a, b = f(x, w), f(x, w)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("key, elsewhere, cpu_fallback", [("grad_impl", "native", "matmul"),
                                                          ("dense_impl", "conv", "conv")])
def test_resolve(monkeypatch, key, elsewhere, cpu_fallback):
    """``model.grad_impl`` (train graphs) and ``model.dense_impl`` (folded inference graphs):
    oneDNN only in a one-device CPU process with the library (inference graphs: and the native
    handler); explicit ``onednn`` without the library, and unknown values, are errors."""
    from damo_jax.models import conv_grad
    resolve = getattr(conv_grad, f"resolve_{key}")
    assert resolve("onednn", "cpu") == "onednn"
    assert resolve(cpu_fallback, "cpu") == cpu_fallback
    assert resolve("auto", "gpu") == elsewhere
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    monkeypatch.setattr(onednn, "handler_kind", lambda: "native")
    assert resolve("auto", "cpu") == "onednn"
    # the ctypes fallback handler (no C compiler) needs the GIL per conv: inference graphs keep
    # XLA's convs then, train graphs still gain from oneDNN
    monkeypatch.setattr(onednn, "handler_kind", lambda: "python")
    assert resolve("auto", "cpu") == ("onednn" if key == "grad_impl" else "conv")
    monkeypatch.setattr(onednn, "handler_kind", lambda: "native")
    monkeypatch.setattr(jax, "device_count", lambda *a: 2)   # a mesh: host work can't be split
    assert resolve("auto", "cpu") == cpu_fallback
    monkeypatch.setattr(onednn, "available", lambda: False)
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    assert resolve("auto", "cpu") == cpu_fallback
    with pytest.raises(ValueError, match=f"{key}='onednn'"):
        resolve("onednn", "cpu")
    with pytest.raises(ValueError, match=f"model.{key} must be one of"):
        resolve("bogus", "cpu")


@pytest.mark.parametrize("name", ["t", "s", "ns"])
def test_full_model_gradient_matches_native(name):
    """All parameters' and the input's gradients of a whole model (every dense and depthwise
    conv in oneDNN, its direct kernels: ``model.conv3x3_impl = "direct"``; the Winograd ones are
    tests/test_winograd.py's) against the all-native model, within 1e-5 relative per tensor. BatchNorm uses its running
    statistics here: in train mode this randomly initialised model on a 2-image 64x64 batch
    amplifies any float32 re-ordering of a sum by 1e3-1e4 (the same native model compiled with and
    without XLA's optimisations differs by 3e-3; tests/test_conv_grad.py), which would hide a real
    error rather than find one. Measured 2026-12-03: largest error 2.5e-6."""
    check_full_model_gradient(name, conv3x3_impl="direct")


def check_full_model_gradient(name: str, conv3x3_impl: str) -> str:
    """The check of :func:`test_full_model_gradient_matches_native` with ``model.conv3x3_impl =
    conv3x3_impl``; returns the compiled fast graph's HLO text."""
    from damo_jax.config import load_config
    from damo_jax.models import build_model, init_variables

    def model(grad_impl):
        cfg = load_config(name)
        cfg.model.grad_impl = grad_impl
        cfg.model.pointwise_impl = "conv"
        cfg.model.conv3x3_impl = conv3x3_impl
        return build_model(cfg)
    m_native, m_fast = model("native"), model("onednn")
    v = init_variables(m_native, jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), maxval=255.0)
    kc, kr = jax.random.split(jax.random.PRNGKey(2))

    def make(m):
        def f(params, x):
            out = m.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=False)
            return (jnp.vdot(out["cls_logits_flat"], jax.random.normal(kc, out["cls_logits_flat"].shape))
                    + jnp.vdot(out["reg_logits_flat"], jax.random.normal(kr, out["reg_logits_flat"].shape)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    hlo = make(m_fast).lower(v["params"], x).compile().as_text()
    assert "damo_jax_onednn_conv_bwd" in hlo
    (l_n, (gp_n, gx_n)), (l_f, (gp_f, gx_f)) = make(m_native)(v["params"], x), make(m_fast)(v["params"], x)
    assert abs(float(l_f) - float(l_n)) <= RTOL * abs(float(l_n))
    assert rel_err(gx_f, gx_n) <= RTOL
    leaves_n = jax.tree_util.tree_leaves_with_path(gp_n)
    leaves_f = jax.tree_util.tree_leaves(gp_f)
    assert len(leaves_n) == len(leaves_f)
    bad = [(jax.tree_util.keystr(p), rel_err(f, n)) for (p, n), f in zip(leaves_n, leaves_f)
           if rel_err(f, n) > RTOL]
    assert not bad, bad
    return hlo


_AVX2_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import test_onednn
    from damo_jax.models import onednn
    lib = onednn._runtime()[0]
    test_onednn.check_full_model_gradient("ns", conv3x3_impl="direct")
    print(json.dumps({"isa": lib.dnnl_get_effective_cpu_isa()}))
""")
_DNNL_CPU_ISA_AVX2 = 0x7     # dnnl_cpu_isa_avx2 (oneDNN's dnnl_types.h)


def test_full_model_gradient_matches_native_with_onednn_capped_to_avx2():
    """The Ns whole-model check above with oneDNN capped to AVX2, as an AVX2-only CPU runs it:
    other kernels, weight layouts (8-channel blocks, 24-channel padded ones) and GEMM-based
    convolutions (depthwise 5x5 kernel gradients on the 4x4 and 2x2 maps) that an AVX-512 host never
    takes otherwise, so that CI on an AVX-512 host checks their gradients too (the threading
    fault that path once had is tests/test_onednn_handler.py's; Ns has no 3x3 stride-1 dense conv
    for the Winograd kernels, whose AVX2 path tests/test_winograd.py checks capped). In a child process:
    oneDNN reads ``ONEDNN_MAX_CPU_ISA`` once, when it loads; the child checks that the cap took."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    proc = subprocess.run([sys.executable, "-c", _AVX2_CHILD, str(Path(__file__).parent)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"isa": _DNNL_CPU_ISA_AVX2}


@pytest.mark.parametrize("name", ["t", "ns"])
def test_deploy_graph_dense_convs_in_onednn_match_native(name):
    """The fully folded inference graph with its k x k dense convs in oneDNN (``dense_impl``
    ``onednn``, the CPU default) against the same graph with XLA's convs: same scores and boxes
    within float32 rounding; the oneDNN forward is really in the compiled graph, and the exporters'
    config (``export.common.export_config``) keeps every conv XLA's own op (no custom call in an
    exported graph)."""
    from damo_jax.models import build_model, init_variables, with_depthwise_impl
    from damo_jax.models.reparam import fuse
    from export.common import export_config

    variables = fuse(init_variables(build_model(name), jax.random.PRNGKey(0)), name, fuse_bn=True)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 96, 128, 3), maxval=255.0)
    outs, hlos = {}, {}
    for impl in ("conv", "onednn"):
        m = build_model(with_depthwise_impl(name, "auto", None, impl), deploy=True)
        f = jax.jit(lambda v, x_, m=m: m.apply(v, x_))
        hlos[impl] = f.lower(variables, x).compile().as_text()
        outs[impl] = f(variables, x)
    assert "damo_jax_onednn_conv_fwd" in hlos["onednn"]
    assert "damo_jax_onednn" not in hlos["conv"]
    for key in ("scores", "boxes"):
        a, b = np.asarray(outs["onednn"][key]), np.asarray(outs["conv"][key])
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
    exp = build_model(export_config(name), deploy=True)
    hlo = jax.jit(lambda v, x_: exp.apply(v, x_)).lower(variables, x).as_text()
    assert "damo_jax_onednn" not in hlo and "custom_call" not in hlo
