"""Winograd F(2x2, 3x3) convolutions (``damo_jax/models/winograd_ffi.c``, ``model.conv3x3_impl``).

References are never the kernels' own numbers: ``lax.conv_general_dilated`` and ``jax.vjp`` of it,
a float64 NumPy convolution (tests/test_onednn.py ``conv_f64``), and whole T / S / Ns models on the
native path. Covered: forward, input gradient and kernel gradient per shape family of the released
models' 3x3 stride-1 convs, plus edge cases of the tiling (odd sizes, 1x1 maps, one image) and of
the channel padding (counts that are not multiples of 8 or 16); bit-identical repeats; the custom
calls really are in the graph; which convs ``winograd=True`` routes and which stay in oneDNN;
``model.conv3x3_impl`` resolution and its errors.
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

from damo_jax.errors import ConfigError
from damo_jax.models import conv_grad, onednn
from damo_jax.models.conv_grad import make_conv_general_dilated, resolve_conv3x3_impl
from damo_jax.models.cpu_ops import _NHWC_DIMS

sys.path.insert(0, str(Path(__file__).parent))
from test_onednn import conv_f64, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not onednn.available() or not onednn.winograd_available(),
    reason="Winograd handlers unavailable: "
           f"{(onednn.winograd_unavailable_reason() if onednn.available() else onednn.unavailable_reason()) or jax.default_backend()}")

RTOL = 1e-5
PAD = ((1, 1), (1, 1))

# (name, batch, H, W, C, K): S@320 families scaled down in batch / size (88->128, 128->68 at 40x40,
# 256->192 at 10x10, ...), tiling edges (odd H / W, 1x1 and 1xW maps, a single 2x2 tile) and
# channel padding (C or K not multiples of 8, K % 16 == 8 for the 8-wide GEMM tail)
CASES = [
    ("s_88to128", 2, 12, 12, 88, 128),
    ("s_128to68", 1, 10, 10, 128, 68),
    ("s_256to192_small_map", 3, 4, 4, 256, 192),
    ("odd_hw", 2, 7, 9, 16, 24),
    ("one_by_one", 3, 1, 1, 16, 8),
    ("one_row", 1, 1, 7, 24, 40),
    ("single_tile", 1, 2, 2, 8, 8),
    ("c_not_mult8", 2, 5, 6, 20, 32),
    ("k_not_mult8", 1, 6, 5, 16, 12),
    ("tiny_channels", 1, 3, 4, 3, 5),
]


def _data(case):
    name, b, h, w, c, k = case
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(zlib.crc32(name.encode())), 3)
    x = jax.random.normal(kx, (b, h, w, c))
    kernel = jax.random.normal(kw, (3, 3, c, k)) / np.sqrt(9 * c)
    g = jax.random.normal(kg, (b, h, w, k))
    return x, kernel, g


def _native(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), PAD, dimension_numbers=_NHWC_DIMS,
                                    precision=lax.Precision.HIGHEST)


def _wino(x, w):
    return onednn.conv(x, w, (1, 1), PAD, "winograd")


def _vjp(f, x, w, g):
    y, pull = jax.vjp(f, x, w)
    return (y,) + pull(g)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_forward_and_gradients_match_native(case):
    x, w, g = _data(case)
    y, dx, dw = jax.jit(lambda x, w, g: _vjp(_wino, x, w, g))(x, w, g)
    y_n, dx_n, dw_n = jax.jit(lambda x, w, g: _vjp(_native, x, w, g))(x, w, g)
    assert rel_err(y, conv_f64(x, w, 1, (1, 1, 1, 1))) <= RTOL
    assert rel_err(y, y_n) <= RTOL
    assert rel_err(dx, dx_n) <= RTOL, rel_err(dx, dx_n)
    assert rel_err(dw, dw_n) <= RTOL, rel_err(dw, dw_n)


def test_float64_references_of_both_gradients():
    """The gradients against float64 NumPy (not XLA): dx = the 'same' conv of g with the kernel
    rotated 180 degrees and its channels swapped; dw[a, b] = sum over pixels of the shifted input
    times g."""
    x, w, g = _data(CASES[3])
    _, dx, dw = jax.jit(lambda x, w, g: _vjp(_wino, x, w, g))(x, w, g)
    w_rot = np.asarray(w, np.float64)[::-1, ::-1].transpose(0, 1, 3, 2)
    assert rel_err(dx, conv_f64(g, w_rot, 1, (1, 1, 1, 1))) <= RTOL
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, wd = x.shape[1:3]
    gd = np.asarray(g, np.float64)
    dw_ref = np.stack([np.stack([np.einsum("nhwc,nhwk->ck", xp[:, a:a + h, b:b + wd], gd)
                                 for b in range(3)]) for a in range(3)])
    assert rel_err(dw, dw_ref) <= RTOL


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


def test_routing_in_the_graph_and_kernel_gradient_only_for_inputs_without_gradient():
    """``winograd="sized"`` (``auto``) routes 3x3 stride-1 padding-1 convs of >= 16 input channels
    and enough pixels to the Winograd custom calls; stride 2, other padding, 1x1, the 12-channel
    stem and small maps stay in oneDNN (``"all"`` routes those last two too). An input that needs
    no gradient (the image) gets the kernel-gradient-only call."""
    conv = make_conv_general_dilated(taps=False, onednn_convs=True, winograd="sized")

    def call(x, w, s=1, pad=PAD):
        return conv(x, w, (s, s), pad, dimension_numbers=_NHWC_DIMS)

    side = int(np.ceil(np.sqrt(onednn.winograd_min_pixels())))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, side, side, 16))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 16))
    both = _hlo(jax.grad(lambda x, w: (call(x, w) ** 2).sum(), (0, 1)), x, w)
    assert "damo_jax_wino_conv_fwd" in both and "damo_jax_wino_conv_bwd\"" in both.replace(
        "damo_jax_wino_conv_bwd_weights", "")
    only_w = _hlo(jax.grad(lambda w: call(x, w).sum()), w)
    assert "damo_jax_wino_conv_bwd_weights" in only_w
    assert "damo_jax_wino_conv_bwd\"" not in only_w.replace("damo_jax_wino_conv_bwd_weights", "")
    _, dw = jax.jit(jax.grad(lambda x, w: call(x, w).sum(), (0, 1)))(x, w)
    dw_only = jax.jit(jax.grad(lambda w: call(x, w).sum()))(w)
    assert rel_err(dw_only, dw) <= RTOL
    stem_x = jax.random.normal(jax.random.PRNGKey(3), (1, side, side, 12))
    stem_w = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 12, 16))
    small_x = x[:, :side // 2, :side // 2]
    for args in [(x, w, 2), (x, w, 1, ((0, 2), (1, 1))),
                 (x, jax.random.normal(jax.random.PRNGKey(2), (1, 1, 16, 16)), 1, ((0, 0), (0, 0))),
                 (stem_x, stem_w), (small_x, w)]:
        hlo = _hlo(lambda x, w: call(x, w, *args[2:]), *args[:2])
        assert "damo_jax_wino" not in hlo and "damo_jax_onednn_conv_fwd" in hlo
    every = make_conv_general_dilated(taps=False, onednn_convs=True, winograd="all")
    for args in [(stem_x, stem_w), (small_x, w)]:
        hlo = _hlo(lambda x, w: every(x, w, (1, 1), PAD, dimension_numbers=_NHWC_DIMS), *args)
        assert "damo_jax_wino_conv_fwd" in hlo


def test_repeated_runs_are_bit_identical():
    x, w, g = _data(CASES[0])
    f = jax.jit(lambda x, w, g: _vjp(_wino, x, w, g))
    first, second = f(x, w, g), f(x, w, g)
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_calls_are_value_errors():
    x = jnp.ones((1, 4, 4, 8))
    with pytest.raises(ValueError, match="not a float32 3x3 stride-1 padding-1"):
        onednn.conv(x, jnp.ones((3, 3, 8, 8)), (2, 2), PAD, "winograd")
    with pytest.raises(ValueError, match="algo must be one of"):
        onednn.conv(x, jnp.ones((3, 3, 8, 8)), (1, 1), PAD, "fft")


def test_resolve(monkeypatch):
    assert resolve_conv3x3_impl("direct") == "direct"
    assert resolve_conv3x3_impl("winograd") == "winograd"
    assert resolve_conv3x3_impl("auto", "gpu") == "direct"
    assert resolve_conv3x3_impl("auto", "cpu") == "winograd"
    monkeypatch.setattr(onednn, "winograd_available", lambda: False)
    assert resolve_conv3x3_impl("auto", "cpu") == "direct"
    monkeypatch.undo()
    assert "Winograd" in conv_grad.describe_grad_impl("onednn", "float32", "cpu", conv3x3_impl="auto")
    with pytest.raises(ConfigError, match="model.conv3x3_impl"):
        resolve_conv3x3_impl("fft")


_CHILD = textwrap.dedent("""
    import json, sys
    from damo_jax.errors import ConfigError
    from damo_jax.models import onednn
    from damo_jax.models.conv_grad import resolve_conv3x3_impl
    out = {"auto": resolve_conv3x3_impl("auto", "cpu"), "isa_avx512": onednn.onednn_has_avx512()}
    try:
        out["winograd"] = resolve_conv3x3_impl("winograd", "cpu")
        out["min_pixels"] = onednn.winograd_min_pixels()
    except ConfigError as e:
        out["error"] = str(e)
    print(json.dumps(out))
""")


def _child(**env):
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_auto_is_winograd_with_avx2_kernels_where_onednn_runs_avx2():
    """oneDNN capped to AVX2 (what an AVX2-only CPU runs; oneDNN reads the cap once, at load: a
    child process): ``auto`` resolves to Winograd, with the AVX2 GEMM kernels and their size
    threshold (an AVX-512 host keeps its AVX-512 ones uncapped)."""
    assert _child(ONEDNN_MAX_CPU_ISA="AVX2") == {"auto": "winograd", "isa_avx512": False,
                                                  "winograd": "winograd", "min_pixels": 400}


_CAPPED_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import test_winograd
    from damo_jax.models import onednn
    for case in test_winograd.CASES:
        test_winograd.test_forward_and_gradients_match_native(case)
    test_winograd.test_float64_references_of_both_gradients()
    print(json.dumps({"avx512_gemms": onednn._STATE.get("winograd_avx512")}))
""")


def test_avx2_kernels_match_native_in_a_capped_child():
    """The per-shape checks above with the AVX2 GEMM kernels (an AVX-512 host otherwise only runs
    its AVX-512 ones for 32-wide panels): oneDNN capped to AVX2 in a child process, which caps the
    Winograd GEMMs too."""
    proc = subprocess.run([sys.executable, "-c", _CAPPED_CHILD, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"avx512_gemms": False}


def test_explicit_winograd_without_the_native_handler_is_a_config_error():
    out = _child(DAMO_JAX_ONEDNN_HANDLER="python")
    assert out["auto"] == "direct"
    assert "model.conv3x3_impl='winograd'" in out["error"] and "native FFI handler" in out["error"]


@pytest.mark.parametrize("name", ["t", "s"])   # Ns has no 3x3 stride-1 dense conv
def test_full_model_gradient_matches_native(name):
    """Every 3x3 stride-1 conv as Winograd (``conv3x3_impl = "winograd"``; the rest in oneDNN), the whole
    model's parameter and input gradients against the all-native model, 1e-5 relative per tensor
    (tests/test_onednn.py's check, which keeps oneDNN's direct kernels)."""
    from test_onednn import check_full_model_gradient
    hlo = check_full_model_gradient(name, conv3x3_impl="winograd")
    assert "damo_jax_wino_conv_bwd" in hlo


def test_deploy_graph_3x3_convs_as_winograd_match_xla():
    """The folded T inference graph (``dense_impl`` onednn) with its 3x3 stride-1 convs as
    Winograd against the same graph with XLA's convs: same scores and boxes within float32
    rounding, and the Winograd forward really is in the compiled graph."""
    from damo_jax.models import build_model, init_variables, with_depthwise_impl
    from damo_jax.models.reparam import fuse

    variables = fuse(init_variables(build_model("t"), jax.random.PRNGKey(0)), "t", fuse_bn=True)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 96, 128, 3), maxval=255.0)
    outs = {}
    for impl in ("conv", "onednn"):
        cfg = with_depthwise_impl("t", "auto", None, impl)
        cfg.model.conv3x3_impl = "winograd"
        m = build_model(cfg, deploy=True)
        f = jax.jit(lambda v, x_, m=m: m.apply(v, x_))
        hlo = f.lower(variables, x).compile().as_text()
        assert ("damo_jax_wino_conv_fwd" in hlo) == (impl == "onednn")
        outs[impl] = f(variables, x)
    for key in ("scores", "boxes"):
        a, b = np.asarray(outs["onednn"][key]), np.asarray(outs["conv"][key])
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
