"""Opt-in CPU runtime tuning for JAX inference: allocator, XLA:CPU compiler options.

Nothing here runs implicitly; the benchmarks and CLIs that run many forwards opt in.

* :func:`cpu_compiler_options` -> ``jax.jit(fn, compiler_options=...)`` options for the model
  forward: ``xla_cpu_prefer_vector_width=512`` on AVX-512 hosts (LLVM otherwise emits 256-bit code;
  the shifted-slice depthwise/SiLU loop fusions gain: Nm@416 -11%, Ns@416 -7%, T@640 -1%, outputs
  bit-identical). Tried and not adopted (no gain or slower, docs/bench_models.md): oneDNN
  (``xla_cpu_use_onednn``: HLO unchanged), XNNPACK graph fusion, YNNPACK eltwise fusion (swallows the
  depthwise taps: Ns 5x slower), ``xla_cpu_max_isa``, disabling YNNPACK convolutions.
* :func:`tune_cpu_allocator`: XLA:CPU allocates one temporary buffer per executable call for all
  intermediate activations (``compiled.memory_analysis().temp_size_in_bytes``: Nm@416 51 MB, T@640
  batch 4 ~150 MB). glibc serves blocks above its mmap threshold (dynamic, at most 32 MB) with a
  fresh ``mmap``, so such a buffer is page-faulted and zeroed again on every call (Nm: 12,400 minor
  faults per forward, measured with ``resource.getrusage``; XLA's worker threads also allocate from
  their own glibc arenas, which are trimmed on their own). The tuning makes glibc serve every block
  from one heap (one arena) and never trim it, so the buffer is reused from the second call on
  (Nm@416 batch 1: 25% less CPU time per forward; T@640 batch 4: 8%; batch-1 models whose buffers
  stay under 32 MB: no change). It changes ``malloc`` for the whole process (memory freed by any
  library stays reserved by the process). Same effect without code:
  ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615 MALLOC_ARENA_MAX=1`` at start-up.
* :func:`tune_cpu_runtime`: both, process-wide, for CLIs: the allocator, and the compiler options
  appended to ``XLA_FLAGS`` (read once, when the first computation initialises the backend, so it
  must run before that; jit calls that cannot take ``compiler_options`` then get them too).

The depthwise-conv / SPP formulations live in ``damo_jax/models/cpu_ops.py`` (``model.depthwise_impl``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# glibc <malloc.h> mallopt parameters
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024
# "never trim": mallopt takes an int, glibc stores the threshold as size_t, so -1 is SIZE_MAX. (The
# previous 2**31 - 1 trimmed a heap whose top had > 2 GiB free: the S@320 batch-8 step's 1.1 GB temp
# buffer, allocated again before the previous step's copy was freed, then trimmed and re-faulted:
# 269k minor faults and ~0.3 s extra in some steps, docs/bench_train.md §0s.)
KEEP_TRIM_THRESHOLD = -1


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
    """``enable=True``: glibc ``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, -1)`` (never) and
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


def _cpuinfo() -> dict:
    """The first CPU of ``/proc/cpuinfo`` as ``{field: value}`` (``flags`` split into a set);
    ``{"flags": set()}`` where it cannot be read (not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        lines = []
    info = dict((k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines))
    info["flags"] = frozenset(info.get("flags", "").split())
    return info


def host_has_avx512() -> bool:
    """True when ``/proc/cpuinfo`` lists ``avx512f`` (False where it cannot be read)."""
    return "avx512f" in _cpuinfo()["flags"]


def cpu_model() -> str:
    """The CPU every benchmark figure names: model name, family/model numbers (cloud hosts often
    report just "AMD EPYC") and the SIMD / int8 ISA flags that move XLA:CPU, oneDNN and
    onnxruntime speed, e.g. ``"AMD EPYC (family 25 model 17; avx2, avx512f, avx512_bf16,
    avx512_vnni)"``; ``platform.processor()`` / machine where ``/proc/cpuinfo`` cannot be read."""
    import platform
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    isa = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
                                "amx_int8") if f in info["flags"]) or "no AVX2"
    if "cpu family" in info and "model" in info:
        return f"{name} (family {info['cpu family']} model {info['model']}; {isa})"
    return f"{name} ({isa})"


def cpu_compiler_options(backend: str | None = None) -> dict:
    """XLA compiler options that speed up the model forward on CPU (``{}`` elsewhere or when none
    applies); pass them as ``jax.jit(fn, compiler_options=cpu_compiler_options())``."""
    import jax
    if (backend or jax.default_backend()) != "cpu":
        return {}
    return {"xla_cpu_prefer_vector_width": 512} if host_has_avx512() else {}


def tune_cpu_runtime() -> dict:
    """Process-wide CPU tuning for CLIs: :func:`tune_cpu_allocator` and the options of
    :func:`cpu_compiler_options` appended to ``XLA_FLAGS`` (CPU-only flags; other backends ignore
    them). Call before the first JAX computation (afterwards XLA_FLAGS is no longer read: a warning
    says so and only the allocator changes).
    Returns ``{"allocator": bool, "xla_flags": [flags added]}``."""
    from jax._src import xla_bridge

    result = {"allocator": tune_cpu_allocator(), "xla_flags": []}
    if xla_bridge.backends_are_initialized():
        log.warning("tune_cpu_runtime: JAX backends already initialised; XLA_FLAGS unchanged "
                    "(pass runtime.cpu_compiler_options() to jax.jit instead)")
        return result
    current = os.environ.get("XLA_FLAGS", "")
    for key, value in cpu_compiler_options("cpu").items():
        if f"--{key}=" not in current:
            flag = f"--{key}={value}"
            current = f"{current} {flag}".strip()
            result["xla_flags"].append(flag)
    os.environ["XLA_FLAGS"] = current
    return result


def make_mesh(devices=None, axis: str = "data"):
    """THE device mesh: 1-D over ``devices`` (default: all devices of all processes) named ``axis``.
    Training shards its batch over all devices; evaluation passes ``jax.local_devices()``."""
    import jax
    import numpy as np
    return jax.sharding.Mesh(np.asarray(jax.devices() if devices is None else list(devices)), (axis,))


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a helper process (a data-loader worker, the compile child): end it when its parent is
    gone. A parent killed by ``kill -9`` or the OOM killer ran no clean-up, and its workers lived on
    (re-parented to init, holding memory and the parent's stdout pipe) until killed by hand. A
    daemon thread polls ``os.getppid()``; stdlib only (the workers import no JAX)."""
    import threading
    import time
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
