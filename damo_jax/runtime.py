"""Opt-in, process-level CPU runtime tuning for JAX inference (``tune_cpu_allocator``).

XLA:CPU allocates one temporary buffer per executable call for all intermediate activations
(``compiled.memory_analysis().temp_size_in_bytes``: Nm@416 51 MB, S@640 ~60 MB, T@640 20 MB). glibc
serves blocks above its mmap threshold (dynamic, at most 32 MB) with a fresh ``mmap``, so such a
buffer is page-faulted and zeroed again on every call (Nm: 12,400 minor faults per forward,
measured with ``resource.getrusage``; batched calls have several times larger buffers, and
XLA's worker threads allocate from their own glibc arenas, which are trimmed on their own).
:func:`tune_cpu_allocator` makes glibc serve every block from one heap (one arena) and never trim
it, so the buffer is reused from the second call on (Nm@416 batch 1: 25% less CPU time per
forward; T@640 batch 4: 8%; batch-1 models whose buffers stay under 32 MB: no change). It changes
``malloc`` for the whole process (memory freed by any library stays reserved by the process), which
is why nothing calls it implicitly: the benchmarks, and applications that run many forwards
(``predict``/``eval`` style loops), opt in. The same effect without code:
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_ARENA_MAX=1`` in the environment at
start-up. Call it before the first JAX computation (the arena limit only binds threads that have
not allocated yet).

No XLA compiler flag of jax 0.10.2 was found to speed up these models on CPU (oneDNN, XNNPACK graph
fusion, YNN eltwise fusion, 512-bit vector preference: measured, docs/bench_models.md), so there is
no flag helper here; the depthwise / SPP formulations live in ``damo_jax/models/cpu_ops.py``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# glibc <malloc.h> mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 (musl and other libcs have no mallopt)
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def tune_cpu_allocator(enable: bool = True) -> bool:
    """``enable=True``: glibc ``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2**31-1)`` and
    ``mallopt(M_ARENA_MAX, 1)`` (one heap, never trimmed); ``False``: mmap / trim back to glibc's
    default values (its dynamic mmap-threshold adaptation stays off once touched; the arena limit
    stays). Returns True when applied, False where unsupported (not
    Linux/glibc), in which case nothing changes."""
    libc = _libc()
    if libc is None:
        log.info("tune_cpu_allocator: no glibc mallopt on this platform; nothing changed")
        return False
    mmap_max, trim = (0, KEEP_TRIM_THRESHOLD) if enable else (DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD)
    ok = libc.mallopt(M_MMAP_MAX, mmap_max) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1
    if enable:
        ok = libc.mallopt(M_ARENA_MAX, 1) == 1 and ok
    if not ok:
        log.warning("tune_cpu_allocator: mallopt refused the setting")
    return ok
