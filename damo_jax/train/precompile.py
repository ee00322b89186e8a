"""Compile the training update step in a child process, then load it from the persistent cache.

Why (measured on a 2-core AMD EPYC, AVX2, DAMO-YOLO-Ns demo config at 192, batch 8; commands and
numbers in docs/bench_train.md §0c): a process that has compiled the update step ITSELF runs it
1.3-1.5x slower than a fresh process that loads the same executable from the persistent compilation
cache (60-step CLI runs back to back: 9.2 vs 12.2 img/s; synthetic-batch step: 9.2 vs 12.0 img/s,
the same executable serialised in the compiling process and loaded in a new one). Serialising and
re-loading the executable inside the compiling process does not help (7.9 vs 7.9 img/s): the
slowdown is a property of the process after XLA:CPU's compilation, not of the executable. So, on the
CPU backend with one process and a persistent cache, the train loop has a child process
(``python -m damo_jax.train.precompile``) build the same run from the same config, lower and
compile the same jitted ``update_fn`` (same shapes, shardings and donation, so the same cache key:
the key hashes the HLO with debug info stripped, the compile options and the XLA flags) and exit;
the training process traces (lowers) the same step while the child compiles (on a multi-core host
the two overlap) and then loads the child's executable from the cache (measured cost before the
overlap: the child's set-up, 3-4 s after its imports, plus the load, 11-28 s, against a step 1.3x
faster for the whole run).

Switch: ``train.precompile`` = ``auto`` (default: the above on CPU, one process, cache on) | ``on``
(also on other backends) | ``off``. If the child fails, or the training process still misses the
cache, it compiles in-process as before (a warning says so): never worse than without.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

CHILD_ENV = "DAMO_JAX_PRECOMPILE_CHILD"
MODES = ("auto", "on", "off")
TIMEOUT_S = 3 * 3600


def mode(cfg) -> str:
    """``train.precompile``; the environment variable DAMO_JAX_PRECOMPILE (auto | on | off) wins
    (the test suite sets ``off``: its hundred short runs would each pay the child's start-up)."""
    m = (os.environ.get("DAMO_JAX_PRECOMPILE") or str(cfg.train.get("precompile", "auto"))).lower()
    if m not in MODES:
        from damo_jax.errors import UserError
        raise UserError(f"config train.precompile={m!r}: expected one of {', '.join(MODES)}")
    return m


def wanted(cfg) -> bool:
    """True when the step should be compiled by a child process (see the module docstring)."""
    m = mode(cfg)
    if m == "off" or os.environ.get(CHILD_ENV) or jax.process_count() > 1:
        return False
    if m == "auto" and jax.default_backend() != "cpu":
        return False
    return bool(cache_dir())


def cache_dir() -> str | None:
    """The persistent compilation cache folder of this process (None: no cache)."""
    return jax.config.jax_compilation_cache_dir or None


class Child:
    """A running child (:func:`start_child`); :meth:`wait` gives (succeeded, seconds since start)."""

    def __init__(self, cfg, batch: dict, log_path: Path):
        self.tmp = Path(tempfile.mkdtemp(prefix="damo_jax_precompile_"))
        spec = {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()}
        (self.tmp / "job.pkl").write_bytes(pickle.dumps({"cfg": cfg, "batch": spec}))
        # the same folder and the same size bound: entries a child writes without the bound lack the
        # `-atime` files the parent's bounded cache needs (every later write of the parent fails)
        env = dict(os.environ, **{CHILD_ENV: "1", "JAX_COMPILATION_CACHE_DIR": str(cache_dir()),
                                  "JAX_COMPILATION_CACHE_MAX_SIZE": str(jax.config.jax_compilation_cache_max_size)})
        self.t0 = time.perf_counter()
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "damo_jax.train.precompile", str(self.tmp)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait(self) -> tuple[bool, float]:
        try:
            code = self.proc.wait(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - self.t0)))
            return code == 0, time.perf_counter() - self.t0
        except subprocess.TimeoutExpired:
            return False, time.perf_counter() - self.t0
        finally:
            self.stop()

    def stop(self) -> None:
        """Kill the child if it still runs and remove its job folder (also when the parent's own
        tracing failed or was interrupted: the child compiled on alone and left the folder)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_child(cfg, batch: dict, log_path: Path) -> Child:
    """Start the child for ``cfg`` (the run's resolved config) and the first ``batch`` (only its
    shapes and dtypes travel; output to ``log_path``) and return at once: the caller lowers the
    step meanwhile (the two overlap on a multi-core host) and then calls ``wait()``."""
    return Child(cfg, batch, log_path)


def main(argv=None) -> int:
    """Child: ``python -m damo_jax.train.precompile JOB_DIR`` (JOB_DIR/job.pkl from the parent)."""
    from damo_jax import runtime
    runtime.tune_cpu_runtime()                       # the parent's XLA_FLAGS are inherited as they are
    runtime.exit_with_parent()                       # a parent killed with -9: stop compiling

    from damo_jax.train import loop

    job_dir = Path((argv or sys.argv[1:])[0])
    job = pickle.loads((job_dir / "job.pkl").read_bytes())
    t0 = time.perf_counter()
    run, state = loop.setup(job["cfg"], job_dir / "run", progress=False)
    update = loop.build_update(run)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=run.data_sharding)
             for k, (shape, dtype) in job["batch"].items()}
    t1 = time.perf_counter()
    update.lower(state, batch).compile()
    run.ckpts.close()
    print(f"precompile: set-up {t1 - t0:.1f}s, update step compiled in {time.perf_counter() - t1:.1f}s "
          f"into {jax.config.jax_compilation_cache_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
