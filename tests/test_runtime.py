"""damo_jax.runtime.tune_cpu_allocator: large freed blocks are reused instead of re-mmapped.

Runs in a subprocess (the setting is process-wide) and measures minor page faults of a second
48 MB malloc + memset after a free: glibc's default serves it with a fresh mmap (~12k faults),
the tuned allocator from the kept heap (≈0).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from damo_jax.runtime import _libc, tune_cpu_allocator

SCRIPT = r"""
import ctypes, resource, sys
from damo_jax.runtime import tune_cpu_allocator
if sys.argv[1] == "1":
    assert tune_cpu_allocator() is True
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 48 << 20
faults = []
for _ in range(3):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    libc.free(p)
print(min(faults[1:]))
"""

needs_glibc = pytest.mark.skipif(_libc() is None, reason="glibc mallopt not available (not Linux/glibc)")


def _second_alloc_faults(tuned: bool) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if tuned else "0"], check=True,
                         capture_output=True, text=True, timeout=60)
    return int(out.stdout.split()[-1])


@needs_glibc
def test_tuned_allocator_reuses_large_blocks():
    default, tuned = _second_alloc_faults(False), _second_alloc_faults(True)
    assert default > 5000, f"expected glibc to re-mmap a freed 48 MB block, got {default} faults"
    assert tuned < 500, f"tuned allocator still faults {tuned} pages on a reused 48 MB block"


def test_tune_cpu_allocator_reports_support(monkeypatch):
    import damo_jax.runtime as runtime
    monkeypatch.setattr(runtime, "_libc", lambda: None)
    assert tune_cpu_allocator() is False  # unsupported platform: no-op, no exception


def test_cpu_compiler_options_compile_and_keep_results():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from damo_jax.runtime import cpu_compiler_options, host_has_avx512

    assert cpu_compiler_options("gpu") == {} and cpu_compiler_options("tpu") == {}
    options = cpu_compiler_options("cpu")
    assert options == ({"xla_cpu_prefer_vector_width": 512} if host_has_avx512() else {})
    x = jnp.linspace(-4.0, 4.0, 4099, dtype=jnp.float32)

    def fn(x):
        return jax.nn.silu(x) * 3.0 + jnp.roll(x, 7)

    ref = jax.jit(fn)(x)
    got = jax.jit(fn, compiler_options=cpu_compiler_options() or None)(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


TUNE_RUNTIME_SCRIPT = r"""
import os, sys
os.environ.pop("XLA_FLAGS", None)
from damo_jax import runtime
first = runtime.tune_cpu_runtime()
import jax.numpy as jnp
float(jnp.ones(3).sum())
second = runtime.tune_cpu_runtime()
print(repr((first, second, os.environ.get("XLA_FLAGS", ""))))
"""


@needs_glibc
def test_tune_cpu_runtime_sets_flags_only_before_backend_init():
    from damo_jax.runtime import host_has_avx512

    out = subprocess.run([sys.executable, "-c", TUNE_RUNTIME_SCRIPT], check=True,
                         capture_output=True, text=True, timeout=120)
    first, second, flags = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 (our own repr)
    expected = ["--xla_cpu_prefer_vector_width=512"] if host_has_avx512() else []
    assert first == {"allocator": True, "xla_flags": expected}
    assert second == {"allocator": True, "xla_flags": []}
    assert flags == " ".join(expected)
    assert "already initialised" in out.stderr
