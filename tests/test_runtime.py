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
