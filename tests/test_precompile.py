"""The update step compiled in a child process and loaded from the persistent cache
(``damo_jax/train/precompile.py``, ``train.precompile``): when it applies, that the training process
really loads the child's executable (a cache hit, not a second compile), and that every failure
falls back to compiling in-process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from damo_jax.config import load_config
from damo_jax.errors import UserError
from damo_jax.train import loop, precompile
from test_multiprocess import CONFIG   # the tiny demo:64 run (SGD, batch 4)
from train_setup import write_tiny_config

ROOT = Path(__file__).resolve().parent.parent


def test_mode_and_when_it_applies(monkeypatch):
    cfg = load_config("ns")
    monkeypatch.delenv("DAMO_JAX_PRECOMPILE", raising=False)
    monkeypatch.delenv(precompile.CHILD_ENV, raising=False)
    assert precompile.mode(cfg) == "auto"
    monkeypatch.setattr(precompile, "cache_dir", lambda: None)
    assert not precompile.wanted(cfg)                         # nothing to carry the executable
    monkeypatch.setattr(precompile, "cache_dir", lambda: "/tmp/some_cache")
    assert precompile.wanted(cfg) == (jax.default_backend() == "cpu")
    cfg.train.precompile = "off"
    assert not precompile.wanted(cfg)
    cfg.train.precompile = "on"
    assert precompile.wanted(cfg)
    monkeypatch.setenv(precompile.CHILD_ENV, "1")          # never recursively from the child
    assert not precompile.wanted(cfg)
    monkeypatch.delenv(precompile.CHILD_ENV)
    monkeypatch.setenv("DAMO_JAX_PRECOMPILE", "off")       # the environment wins
    assert not precompile.wanted(cfg)
    monkeypatch.setenv("DAMO_JAX_PRECOMPILE", "sometimes")
    with pytest.raises(UserError, match="train.precompile"):
        precompile.mode(cfg)


class _Run:
    def __init__(self, cfg, workdir):
        self.cfg, self.workdir, self.lines = cfg, Path(workdir), []

    def info(self, msg):
        self.lines.append(msg)


def test_a_failed_child_falls_back_to_compiling_here(monkeypatch, tmp_path):
    cfg = load_config("ns")
    cfg.train.precompile = "on"
    monkeypatch.delenv("DAMO_JAX_PRECOMPILE", raising=False)
    monkeypatch.setattr(precompile, "cache_dir", lambda: str(tmp_path / "xla"))
    class FailedChild:
        def wait(self):
            return False, 1.0

    monkeypatch.setattr(precompile, "start_child", lambda *a, **k: FailedChild())
    update = jax.jit(lambda s, b: (s["x"] + 1, b["y"] * 2))
    run = _Run(cfg, tmp_path)
    compiled = loop.compile_first(update, {"x": np.float32(1)}, {"y": np.float32(3)}, run)   # here
    assert [float(v) for v in compiled({"x": np.float32(1)}, {"y": np.float32(3)})] == [2.0, 6.0]
    assert any("failed" in line and "precompile.log" in line for line in run.lines), run.lines


def test_cli_run_loads_the_childs_executable(tmp_path):
    """A real CLI run with a fresh cache: the child compiles, the trainer's compile is a cache hit.
    The cache is the CLI's own, size-bounded one (``DAMO_JAX_CACHE``): the child writes its entries
    under the same bound, i.e. with the ``-atime`` files without which every later write of the
    parent fails (a warning each time, nothing cached)."""
    config = write_tiny_config(tmp_path, "mp_tiny.py", CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "DAMO_JAX_"))}
    env.update(JAX_PLATFORMS="cpu", DAMO_JAX_CACHE=str(tmp_path / "cache"),
               XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
               DAMO_JAX_PRECOMPILE="auto")       # the environment wins over the config's "off"
    proc = subprocess.run([sys.executable, "-m", "damo_jax.train", "--config", str(config),
                           "--workdir", str(tmp_path / "run"), "--no-progress", "--config.train.max_steps=2",
                           "--config.data.val_split="],        # no evaluation: not the subject here
                          cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "update step compiled in a subprocess" in proc.stderr, proc.stderr[-3000:]
    assert "loaded from the persistent cache" in proc.stderr, proc.stderr[-3000:]
    child_log = (tmp_path / "run" / "precompile.log").read_text()
    assert "update step compiled in" in child_log, child_log[-2000:]
    assert "done: 2 steps" in proc.stderr
    assert "Error writing persistent compilation cache" not in proc.stderr, proc.stderr[-3000:]
    entries = sorted((tmp_path / "cache" / "xla").glob("*-cache"))
    assert entries
    assert [e.name for e in entries if not e.with_name(e.name[:-6] + "-atime").exists()] == []


def test_the_child_writes_under_the_parents_size_bound(monkeypatch, tmp_path):
    """The child gets the parent's cache folder and size bound: an entry it writes without the
    bound has no ``-atime`` file and breaks every later write of the parent's bounded cache."""
    seen = {}

    class FakePopen:
        def __init__(self, cmd, stdout=None, stderr=None, env=None):
            seen.update(env)

    monkeypatch.setattr(precompile.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(precompile, "cache_dir", lambda: str(tmp_path / "xla"))
    previous = jax.config.jax_compilation_cache_max_size
    jax.config.update("jax_compilation_cache_max_size", 123456789)
    try:
        child = precompile.start_child(load_config("ns"), {"image": np.zeros((2, 8, 8, 3), np.float32)},
                                       tmp_path / "precompile.log")
    finally:
        jax.config.update("jax_compilation_cache_max_size", previous)
    shutil.rmtree(child.tmp, ignore_errors=True)
    assert seen["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "xla")
    assert seen["JAX_COMPILATION_CACHE_MAX_SIZE"] == "123456789"
    assert seen[precompile.CHILD_ENV] == "1"
