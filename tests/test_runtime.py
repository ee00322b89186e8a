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


TRIM_SCRIPT = r"""
import ctypes, sys
from damo_jax import runtime
assert runtime.tune_cpu_allocator() is True
libc = ctypes.CDLL("libc.so.6")
if sys.argv[1] == "old":      # the threshold tune_cpu_allocator used before: the int maximum
    assert libc.mallopt(runtime.M_TRIM_THRESHOLD, 2**31 - 1) == 1
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes, libc.sbrk.argtypes = (ctypes.c_size_t,), (ctypes.c_void_p,), (ctypes.c_ssize_t,)
p = libc.malloc(5 << 29)      # 2.5 GiB from the heap (no mmap), never touched: no memory used
top = libc.sbrk(0)
libc.free(p)
print((top - libc.sbrk(0)) >> 20)   # MiB given back to the system by the free
"""


@needs_glibc
def test_tuned_allocator_never_trims_even_above_2_gib():
    """A freed block at the top of the heap stays mapped even when more than 2 GiB are free there
    (the S@320 batch-8 step's temp buffers: docs/bench_train.md §0s); the control shows the old
    ``2**31 - 1`` threshold does give it back, so the check can fail."""
    def given_back(mode):
        out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT, mode], check=True, capture_output=True,
                             text=True, timeout=60)
        return int(out.stdout.split()[-1])
    assert given_back("old") > 2000
    assert given_back("tuned") == 0


def test_tune_cpu_allocator_reports_support(monkeypatch):
    import damo_jax.runtime as runtime
    monkeypatch.setattr(runtime, "_libc", lambda: None)
    assert tune_cpu_allocator() is False  # unsupported platform: no-op, no exception


def _numpy_cpu_has_avx512f():
    """NumPy's own CPUID-based detection (independent of /proc/cpuinfo parsing), or None."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__
        except ImportError:
            return None
    return __cpu_features__.get("AVX512F")


def test_host_has_avx512_agrees_with_numpy_cpuid():
    from damo_jax.runtime import host_has_avx512
    expected = _numpy_cpu_has_avx512f()
    if expected is None:
        pytest.skip("this numpy does not expose its CPU feature table")
    assert host_has_avx512() is bool(expected)


@pytest.mark.parametrize("avx512", [True, False])
def test_cpu_compiler_options_follow_the_host(monkeypatch, avx512):
    import damo_jax.runtime as runtime
    monkeypatch.setattr(runtime, "host_has_avx512", lambda: avx512)
    assert runtime.cpu_compiler_options("cpu") == ({"xla_cpu_prefer_vector_width": 512} if avx512 else {})
    assert runtime.cpu_compiler_options("gpu") == {} and runtime.cpu_compiler_options("tpu") == {}


def test_cpu_compiler_options_keep_results():
    """The 512-bit preference (forced, so the check runs on AVX2 and AVX-512 hosts) and the host's
    own options compile and give the NumPy result; on AVX-512 hosts, bit-identical to the default
    build (the claim of ``runtime``'s docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from damo_jax.runtime import cpu_compiler_options

    x = np.linspace(-4.0, 4.0, 4099, dtype=np.float32)
    want = x.astype(np.float64) / (1.0 + np.exp(-x.astype(np.float64))) * 3.0 + np.roll(x, 7)

    def fn(x):
        return jax.nn.silu(x) * 3.0 + jnp.roll(x, 7)

    default = np.asarray(jax.jit(fn)(x))
    wide = np.asarray(jax.jit(fn, compiler_options={"xla_cpu_prefer_vector_width": 512})(x))
    host = np.asarray(jax.jit(fn, compiler_options=cpu_compiler_options() or None)(x))
    for got in (default, wide, host):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(wide, default)
    np.testing.assert_array_equal(host, default)


TUNE_RUNTIME_SCRIPT = r"""
import os, sys
os.environ.pop("XLA_FLAGS", None)
from damo_jax import runtime
runtime.host_has_avx512 = lambda: sys.argv[1] == "1"    # both host kinds on any host
first = runtime.tune_cpu_runtime()
import jax.numpy as jnp
float(jnp.ones(3).sum())
second = runtime.tune_cpu_runtime()
print(repr((first, second, os.environ.get("XLA_FLAGS", ""))))
"""


@needs_glibc
@pytest.mark.parametrize("avx512", [True, False])
def test_tune_cpu_runtime_sets_flags_only_before_backend_init(avx512):
    out = subprocess.run([sys.executable, "-c", TUNE_RUNTIME_SCRIPT, "1" if avx512 else "0"], check=True,
                         capture_output=True, text=True, timeout=120)
    first, second, flags = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 (our own repr)
    expected = ["--xla_cpu_prefer_vector_width=512"] if avx512 else []
    assert first == {"allocator": True, "xla_flags": expected}
    assert second == {"allocator": True, "xla_flags": []}
    assert flags == " ".join(expected)
    assert "already initialised" in out.stderr


def test_helpers_end_with_their_parent(tmp_path):
    """A trainer killed with -9 (or by the OOM killer) left its data-loader workers running,
    re-parented to init, holding memory and the parent's stdout pipe. ``exit_with_parent`` (called
    by every worker and the compile child) ends a helper within a poll interval of its parent."""
    import os
    import signal
    import subprocess
    import sys
    import time
    pid_file = tmp_path / "grandchild.pid"
    grandchild = ("import os, time, sys; from damo_jax.runtime import exit_with_parent; "
                  "exit_with_parent(0.1); open(sys.argv[1], 'w').write(str(os.getpid())); "
                  "time.sleep(600)")
    parent = ("import subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', {grandchild!r}, sys.argv[1]]); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", parent, str(pid_file)])
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(pid, 0)                     # still there?
        except ProcessLookupError:
            return
        try:                                    # reap it if it became our child (subreaper)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the helper outlived its parent by 10 s")
