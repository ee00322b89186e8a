"""Which XLA FFI handler runs the oneDNN convs (damo_jax/models/onednn_native.py): the native one
compiled from ``onednn_ffi.c`` (no Python, so no GIL, per call) or the ctypes fallback.

References are ``lax.conv_general_dilated`` and ``jax.grad`` of it; the fallback and the
no-compiler cases run in child processes (the handler is chosen once per process).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from damo_jax.models import onednn, onednn_native
from damo_jax.models.cpu_ops import _NHWC_DIMS

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not onednn.available(),
    reason=f"oneDNN CPU path unavailable: {onednn.unavailable_reason() or jax.default_backend()}")


def _chain(conv):
    """Three convs (3x3 s1, 3x3 s2, 1x1) and a loss; odd sizes no other test uses."""
    def f(x, w1, w2, w3):
        y = conv(x, w1, (1, 1), ((1, 1), (1, 1)))
        y = conv(jnp.tanh(y), w2, (2, 2), ((1, 1), (1, 1)))
        y = conv(jnp.tanh(y), w3, (1, 1), ((0, 0), (0, 0)))
        return jnp.sum(y * y)
    return f


def _lax_conv(x, w, s, p):
    return lax.conv_general_dilated(x, w, s, p, dimension_numbers=_NHWC_DIMS)


def _inputs(seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(k[0], (2, 13, 11, 7)), jax.random.normal(k[1], (3, 3, 7, 9)) / 8,
            jax.random.normal(k[2], (3, 3, 9, 10)) / 9, jax.random.normal(k[3], (1, 1, 10, 6)) / 3)


def _check_grads(got, want):
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5,
                                   atol=1e-5 * float(np.abs(np.asarray(r)).max()))


def test_native_handler_runs_no_python_per_call(monkeypatch):
    """Once a conv shape's primitives exist, a call runs without Python: the callback count stays
    put and the Python bodies (made to raise here) are never entered; results match lax."""
    if onednn_native._compiler() is None:
        pytest.skip("no C compiler here: the native handler cannot be built")
    assert onednn.handler_kind() == "native"            # a compiler is there: it must build
    grad = jax.jit(jax.value_and_grad(_chain(onednn.conv), argnums=(0, 1, 2, 3)))
    ref = jax.jit(jax.value_and_grad(_chain(_lax_conv), argnums=(0, 1, 2, 3)))
    args = _inputs(0)
    jax.block_until_ready(grad(*args))                  # builds the shapes' primitives
    calls = onednn.native_plan_calls()
    assert calls >= 3                                   # at least one callback per new conv shape

    def no_python(*_a, **_k):
        raise AssertionError("the Python conv path ran")
    monkeypatch.setattr(onednn, "_run_forward", no_python)
    monkeypatch.setattr(onednn, "_run_backward", no_python)
    args = _inputs(1)
    (loss, grads), (loss_ref, grads_ref) = grad(*args), ref(*args)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    _check_grads(grads, grads_ref)
    assert onednn.native_plan_calls() == calls


_CHILD = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.WARNING)
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from damo_jax.models import onednn
    from damo_jax.models.cpu_ops import _NHWC_DIMS
    try:
        kind = onednn.handler_kind()
    except ValueError as e:   # ConfigError: a user mistake, one line on the CLI
        print(json.dumps({"error": f"{type(e).__name__}: {e}"})); sys.exit(0)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 10, 5))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 5, 8)) / 6
    g = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 5, 8))
    def loss(c):
        return lambda x, w: jnp.vdot(c(x, w, (2, 2), ((1, 1), (1, 1))), g)
    lax_conv = lambda x, w, s, p: lax.conv_general_dilated(x, w, s, p, dimension_numbers=_NHWC_DIMS)
    got = jax.jit(jax.grad(loss(onednn.conv), (0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(lax_conv), (0, 1)))(x, w)
    err = max(float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
              for a, b in zip(got, want))
    print(json.dumps({"kind": kind, "rel_err": err}))
""")


def _child(tmp_path, **env):
    run_env = dict(os.environ, DAMO_JAX_NATIVE_CACHE=str(tmp_path / "native"), **env)
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=run_env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_python_handler_on_request(tmp_path):
    out, _ = _child(tmp_path, DAMO_JAX_ONEDNN_HANDLER="python")
    assert out["kind"] == "python"
    assert out["rel_err"] < 1e-5


def test_without_a_compiler_auto_falls_back_and_native_is_an_error(tmp_path):
    """No compiler on PATH and an empty library cache: ``auto`` warns and uses the Python handler
    (same results); ``native`` fails naming the variable."""
    empty = tmp_path / "bin"
    empty.mkdir()
    no_cc = {"PATH": str(empty), "CC": str(empty / "cc")}
    out, err = _child(tmp_path, DAMO_JAX_ONEDNN_HANDLER="auto", **no_cc)
    assert out["kind"] == "python" and out["rel_err"] < 1e-5
    assert "Python FFI handler" in err and "no C compiler" in err
    out, _ = _child(tmp_path, DAMO_JAX_ONEDNN_HANDLER="native", **no_cc)
    assert out["error"].startswith("ConfigError: ")
    assert "DAMO_JAX_ONEDNN_HANDLER=native" in out["error"] and "no C compiler" in out["error"]


def test_compile_errors_are_reported(tmp_path, monkeypatch):
    bad = tmp_path / "broken.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(onednn_native, "SOURCES", (bad,))
    monkeypatch.setattr(onednn_native, "CONV_ONLY", (bad,))
    monkeypatch.setenv("DAMO_JAX_NATIVE_CACHE", str(tmp_path / "cache"))
    if onednn_native._compiler() is None:
        pytest.skip("no C compiler here")
    with pytest.raises(OSError, match="broken.c"):
        onednn_native.build()
    assert not list((tmp_path / "cache").glob("*.tmp"))      # no half-written file left behind


def test_handler_variable_is_validated(monkeypatch):
    monkeypatch.setenv("DAMO_JAX_ONEDNN_HANDLER", "fast")
    with pytest.raises(ValueError, match="DAMO_JAX_ONEDNN_HANDLER='fast'"):
        onednn_native.handler_choice()
    monkeypatch.setenv("DAMO_JAX_ONEDNN_HANDLER", " Native ")
    assert onednn_native.handler_choice() == "native"


def test_train_log_names_the_conv_path(monkeypatch):
    """The train log's set-up line says how convs run, and for oneDNN which handler."""
    from damo_jax.models import conv_grad
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    monkeypatch.setattr(onednn, "handler_kind", lambda: "python")
    monkeypatch.setattr(onednn, "winograd_available", lambda: False)   # as with the Python handler
    assert conv_grad.describe_grad_impl("auto", "float32", "cpu") == "convs: oneDNN, python FFI handler"
    monkeypatch.setattr(onednn, "handler_kind", lambda: "native")
    monkeypatch.setattr(onednn, "winograd_available", lambda: True)
    assert conv_grad.describe_grad_impl("auto", "float32", "cpu") == (
        "convs: oneDNN, native FFI handler, 3x3 convs as Winograd F(2x2,3x3)")
    assert conv_grad.describe_grad_impl("auto", "float32", "cpu", conv3x3_impl="direct") == (
        "convs: oneDNN, native FFI handler")
    assert "float32 only" in conv_grad.describe_grad_impl("auto", "bfloat16", "cpu")
    assert conv_grad.describe_grad_impl("auto", "float32", "gpu") == "convs: XLA's own ops and gradients"
    assert "matmul" in conv_grad.describe_grad_impl("matmul", "float32", "cpu")


def test_compiler_without_openmp_keeps_the_native_conv_handler(tmp_path, monkeypatch):
    """A compiler that rejects ``-fopenmp`` (clang without libomp): the library is built without the
    BatchNorm handlers, the conv handlers stay native, and BUILD_NOTES says why (the native
    BatchNorm then reports it and ``auto`` uses XLA's ops)."""
    import ctypes
    import shutil
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler here")
    wrapper = tmp_path / "cc-no-openmp"
    calls = tmp_path / "calls"
    wrapper.write_text(f"#!/bin/sh\necho x >> {calls}\n"
                       "for a in \"$@\"; do [ \"$a\" = -fopenmp ] && "
                       "{ echo 'unsupported option -fopenmp' >&2; exit 1; }; done\n"
                       f"exec {gcc} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("DAMO_JAX_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onednn_native, "BUILD_NOTES", [])
    built = onednn_native.build()
    lib = ctypes.CDLL(str(built))
    assert hasattr(lib, "damo_onednn_conv_fwd") and not hasattr(lib, "damo_bn_fwd")
    assert len(onednn_native.BUILD_NOTES) == 1 and "-fopenmp" in onednn_native.BUILD_NOTES[0]
    assert len(calls.read_text().split()) == 2           # the failing full build, the conv-only one
    # a later process (same sources, same compiler) does not try the failing compile again
    monkeypatch.setattr(onednn_native, "BUILD_NOTES", [])
    assert onednn_native.build() == built
    assert len(calls.read_text().split()) == 2
    assert "-fopenmp" in onednn_native.BUILD_NOTES[0] and "delete it to retry" in onednn_native.BUILD_NOTES[0]


_SCRATCHPAD_CHILD = textwrap.dedent("""
    import ctypes, json, threading
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from damo_jax.models import onednn
    from damo_jax.models.cpu_ops import _NHWC_DIMS
    # a depthwise 5x5 conv on a 4x4 map: with oneDNN capped to AVX2 its kernel gradient is the
    # GEMM-based implementation, whose im2col buffer is a scratchpad
    c, pad = 16, ((2, 2), (2, 2))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, c)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(5, 5, 1, c)), jnp.float32)
    def loss(conv):
        return lambda x, w: jnp.sum(conv(x, w) ** 2)
    ours = jax.jit(jax.grad(loss(lambda x, w: onednn.conv(x, w, (1, 1), pad)), (0, 1)))
    lax_conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=_NHWC_DIMS,
                                                     feature_group_count=c)
    want = [np.asarray(v) for v in jax.jit(jax.grad(loss(lax_conv), (0, 1)))(x, w)]
    errs = []
    def call():
        got = ours(x, w)
        errs.append(max(float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())
                        for a, b in zip(got, want)))
    call()                         # the primitives are built here (this thread or XLA's)...
    for _ in range(3):             # ...and executed from other threads afterwards
        t = threading.Thread(target=call)
        t.start()
        t.join()
    p = onednn._primitives((2, 4, 4, c), (5, 5, 1, c), (1, 1), pad)
    lib = onednn._runtime()[0]
    name = ctypes.c_char_p()
    lib.dnnl_primitive_desc_query(p.pds["bwd_weights"], 8, 0, ctypes.byref(name))  # impl_info_str
    print(json.dumps({"kind": onednn.handler_kind(), "errs": errs, "impl": name.value.decode(),
                      "scratchpad_bytes": p.sp["bwd_weights"][1]}))
""")


@pytest.mark.parametrize("handler", ["native", "python"])
def test_scratchpad_primitives_run_on_any_thread(tmp_path, handler):
    """oneDNN's default ("library") scratchpad of its GEMM-based convolutions lives per thread, in
    the thread that created the primitive; XLA runs the custom calls on whichever thread it likes,
    so that primitive once segfaulted on a NULL im2col buffer (oneDNN capped to AVX2, as an
    AVX2-only CPU runs it: an Ns training step at 128 px). The primitives now take the
    scratchpad from us (``scratchpad_mode = user``): built on one thread, run from three others,
    the gradients match ``lax``'s."""
    env = dict(os.environ, DAMO_JAX_NATIVE_CACHE=str(tmp_path / "native"), ONEDNN_MAX_CPU_ISA="AVX2",
               DAMO_JAX_ONEDNN_HANDLER=handler)
    proc = subprocess.run([sys.executable, "-c", _SCRATCHPAD_CHILD], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kind"] == handler
    assert "gemm" in out["impl"] and out["scratchpad_bytes"] > 0, out   # the case is exercised
    assert len(out["errs"]) == 4 and max(out["errs"]) < 1e-5, out
