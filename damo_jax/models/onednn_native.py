"""The native (C) XLA FFI handlers: the oneDNN convolutions (``onednn_ffi.c``), the Winograd 3x3
convolutions for AVX2 CPUs (``winograd_ffi.c``, OpenMP) and the training-mode BatchNorm
(``batchnorm_ffi.c``, OpenMP), all using ``xla_ffi.h``; compiled into one library on first use with
the system C compiler and cached. :mod:`damo_jax.models.onednn` falls
back to its ctypes (Python) handler when this cannot be built, :mod:`damo_jax.models.batchnorm` to
XLA's ops.

Why a native handler: the ctypes handler runs Python on every conv call and so needs the GIL; any
other Python thread running bytecode at the same time (a data-loading thread, a server, a GUI)
makes each call wait up to the interpreter's switch interval (5 ms). The C handler needs Python
only the first time it meets a conv shape (to build that shape's primitives).

Chosen by ``DAMO_JAX_ONEDNN_HANDLER``: ``auto`` (default: native when it builds, else Python),
``native`` (an error when it cannot be built), ``python`` (no native code: also no native
BatchNorm). The compiler is ``$CC`` or ``cc`` (GCC or Clang with OpenMP); the library goes to
``$DAMO_JAX_NATIVE_CACHE`` (default ``$XDG_CACHE_HOME/damo_jax`` or ``~/.cache/damo_jax``), named
by a hash of the sources and the compiler command, written atomically (concurrent processes may
race; each renames a complete file). A compile that fails leaves ``<name>.failed`` holding the
reason beside it, so later processes with the same sources and command skip the attempt (e.g. a
compiler without OpenMP: the BatchNorm handlers are then left out at once); delete it to retry.
No link-time dependency but libgomp (which oneDNN uses too): the oneDNN functions come from the
``libdnnl.so.3`` onednn.py loaded, as pointers.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(n)
                for n in ("onednn_ffi.c", "batchnorm_ffi.c", "winograd_ffi.c", "xla_ffi.h"))
HANDLER_ENV = "DAMO_JAX_ONEDNN_HANDLER"
HANDLER_CHOICES = ("auto", "native", "python")
_FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-fopenmp")


def handler_choice() -> str:
    """``$DAMO_JAX_ONEDNN_HANDLER`` (``auto`` when unset); a ``ConfigError`` (a ValueError) naming
    the variable when it holds anything else (the CLIs print it in one line, exit code 2)."""
    from damo_jax.errors import ConfigError
    value = os.environ.get(HANDLER_ENV, "auto").strip().lower() or "auto"
    if value not in HANDLER_CHOICES:
        raise ConfigError(f"environment variable {HANDLER_ENV}={value!r}: expected one of "
                          f"{', '.join(HANDLER_CHOICES)}")
    return value


def cache_dir() -> Path:
    env = os.environ.get("DAMO_JAX_NATIVE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "damo_jax"


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc) or shutil.which("gcc")


# the BatchNorm and Winograd handlers need OpenMP; where the compiler has none (e.g. clang without
# libomp) the library is built without them (the oneDNN convs keep their native handler, BatchNorm
# runs XLA's ops, 3x3 convs stay in oneDNN)
CONV_ONLY = (SOURCES[0], SOURCES[3])
_CONV_ONLY_FLAGS = tuple(f for f in _FLAGS if f != "-fopenmp")
BUILD_NOTES: list = []     # why the last build left the BatchNorm handlers out (one line), if it did


def _compile(cc: str, sources: tuple, flags: tuple) -> Path:
    source = b"\0".join(p.read_bytes() for p in sources)
    tag = hashlib.sha256(source + "\0".join((cc, *flags)).encode()).hexdigest()[:16]
    out_dir = cache_dir()
    target = out_dir / f"onednn_ffi-{tag}.so"
    if target.exists():
        return target
    names = ", ".join(p.name for p in sources)
    failed = target.with_suffix(".failed")    # the same sources and command failed before: not again
    try:
        reason = failed.read_text().strip()
    except OSError:
        reason = None
    if reason:
        raise OSError(f"{reason} (cached in {failed}; delete it to retry)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
        os.close(fd)
    except OSError as e:
        raise OSError(f"cache directory {out_dir}: {e}") from e
    try:
        proc = subprocess.run([cc, *flags, *(str(p) for p in sources if p.suffix == ".c"), "-o", tmp],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            first = (proc.stderr or proc.stdout).strip().splitlines()[:3]
            reason = f"{cc} failed on {names}: " + " | ".join(first)
            if proc.returncode > 0:           # a compile error, not a killed compiler (e.g. OOM):
                try:                          # each process would otherwise pay the failing compile
                    failed.write_text(reason + "\n")
                except OSError:
                    pass
            raise OSError(reason)
        os.replace(tmp, target)
    except subprocess.TimeoutExpired as e:
        raise OSError(f"{cc} timed out on {names}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def build() -> Path:
    """Path of the compiled handler library, compiling it if the cache lacks it; OSError with the
    reason (no compiler, compile error, unwritable cache) otherwise. When the full library does not
    compile but the conv handlers alone do (no OpenMP), that one, with the reason in
    ``BUILD_NOTES``."""
    cc = _compiler()
    if cc is None:
        raise OSError(f"no C compiler ({os.environ.get('CC') or 'cc'} / gcc not on PATH)")
    try:
        return _compile(cc, SOURCES, _FLAGS)
    except OSError as full_error:
        if str(full_error).startswith("cache directory"):
            raise
        try:
            target = _compile(cc, CONV_ONLY, _CONV_ONLY_FLAGS)
        except OSError:
            raise full_error from None
        BUILD_NOTES[:] = [f"built without the BatchNorm and Winograd handlers ({full_error})"]
        return target


def load() -> ctypes.CDLL:
    """The handler library (compiled if needed); OSError with the reason."""
    lib = ctypes.CDLL(str(build()))
    lib.damo_onednn_plan_calls.restype = ctypes.c_int64
    for name in ("damo_onednn_conv_fwd", "damo_onednn_conv_bwd", "damo_onednn_conv_bwd_weights"):
        getattr(lib, name).restype = ctypes.c_void_p
    if hasattr(lib, "damo_wino_supported"):
        lib.damo_wino_supported.restype = ctypes.c_int
    return lib
