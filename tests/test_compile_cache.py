"""The train CLI's persistent XLA cache (``loop.enable_compile_cache``): where it lives, its size
bound (``DAMO_JAX_CACHE_MAX_GB``, least recently used entries evicted) and a bad bound as a user
error. Each case runs in a subprocess: the cache settings are process-global JAX config."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# compiles 8 different functions with the cache on (every compile stored: min time 0) and prints
# the settings and the bytes of the cache entries left on disk
SCRIPT = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import jax, jax.numpy as jnp
    from damo_jax.train.loop import enable_compile_cache
    enable_compile_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    for k in range(int(sys.argv[1])):
        jax.jit(lambda x, k=k: jnp.sin(x) * k + jnp.cumsum(x, axis=0) ** (k % 3 + 1)).lower(
            jnp.zeros((k + 3, 7))).compile()
    d = Path(jax.config.jax_compilation_cache_dir)
    entries = [p for p in d.iterdir() if p.is_file() and not p.name.endswith(("-atime", ".lock"))]
    print(json.dumps({"dir": str(d), "max_size": jax.config.jax_compilation_cache_max_size,
                      "entries": len(entries), "bytes": sum(p.stat().st_size for p in entries),
                      "largest": max((p.stat().st_size for p in entries), default=0)}))
""")


def _run(tmp_path, n=8, **env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COMPILATION_CACHE_DIR", "DAMO_JAX_CACHE_MAX_GB")}
    env.update(DAMO_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", **env_extra)
    return subprocess.run([sys.executable, "-c", SCRIPT, str(n)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_default_location_and_bound(tmp_path):
    proc = _run(tmp_path, n=2)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dir"] == str(tmp_path / "cache" / "xla")
    assert out["max_size"] == 2 * 2**30
    assert out["entries"] >= 2          # the two functions (and the small jitted ops beside them)


def test_the_bound_evicts_least_recently_used_entries(tmp_path):
    unbounded = json.loads(_run(tmp_path / "a", DAMO_JAX_CACHE_MAX_GB="1").stdout.strip().splitlines()[-1])
    assert unbounded["entries"] >= 8
    limit = 3 * unbounded["largest"]               # room for about three entries
    proc = _run(tmp_path / "b", DAMO_JAX_CACHE_MAX_GB=repr(limit / 2**30))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["max_size"] == pytest.approx(limit, abs=1)
    assert out["bytes"] <= limit and 1 <= out["entries"] < unbounded["entries"]


@pytest.mark.parametrize("bad", ["abc", "0", "-1"])
def test_a_bad_bound_is_one_error_line(tmp_path, bad):
    """Through the train CLI: exit 2, one line naming the variable, before any training."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(DAMO_JAX_CACHE=str(tmp_path / "cache"), DAMO_JAX_CACHE_MAX_GB=bad, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "damo_jax.train", "--config", "demo", "--workdir",
                           str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: DAMO_JAX_CACHE_MAX_GB="), proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_entries_written_without_the_bound_do_not_break_it(tmp_path):
    """A cache folder from before the bound (or from a process with ``JAX_COMPILATION_CACHE_DIR``):
    its entries have no ``-atime`` file, which JAX's bounded cache reads for every entry before each
    write — without the stamping in ``enable_compile_cache`` every new entry failed with a warning."""
    xla = tmp_path / "cache" / "xla"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "DAMO_JAX_CACHE"))}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(xla),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    old = subprocess.run([sys.executable, "-c", "import jax, jax.numpy as jnp; "
                          "jax.jit(lambda x: jnp.tanh(x) @ x.T).lower(jnp.zeros((5, 5))).compile()"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert old.returncode == 0, old.stderr
    before = {p.name for p in xla.glob("*-cache")}
    assert before and not list(xla.glob("*-atime"))         # written without the bound
    proc = _run(tmp_path, n=6)                               # the bounded cache, 4 new functions
    assert proc.returncode == 0, proc.stderr
    assert "Error writing persistent compilation cache" not in proc.stderr, proc.stderr[-2000:]
    after = {p.name for p in xla.glob("*-cache")}
    assert before < after and len(after - before) >= 4
    assert all((xla / (name[:-len("-cache")] + "-atime")).exists() for name in after)
