"""Shared test fixtures.

Golden conformance data (computed by the official PyTorch implementation) lives outside the repo
in ``../shared/golden`` relative to the repository root (override with ``DAMO_GOLDEN=/path``).
Tests that need it skip with a clear reason when the folder is absent.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(os.environ.get("DAMO_GOLDEN", ROOT.parent / "shared" / "golden"))
# The train loop's child-process compile (damo_jax/train/precompile.py) pays a start-up per run:
# off for the suite's many short runs (and the CLI runs they start); tests/test_precompile.py
# switches it on where it is the subject.
os.environ.setdefault("DAMO_JAX_PRECOMPILE", "off")
# The parity tests compare float32 results with float32 / float64 references (1e-5 .. 1e-3). On
# NVIDIA GPUs JAX's default precision runs float32 convolutions and matrix products in TF32 (10-bit
# mantissa), which is a speed setting, not the model's math: the suite pins full float32 precision
# (here and in the CLI processes it starts). On CPU float32 ops are full precision either way.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# OpenVINO's and nncf's usage telemetry posts to Google Analytics from a process it fork()s on
# import and on conversions: in a pytest-xdist worker that is a fork of JAX's multithreaded process
# holding the worker's channel to the controller (a suspect of a lost worker and a hung run). The
# product blocks it (damo_jax.inference.backends.import_openvino); the suite's own processes
# block it here, before any test can import openvino another way.
sys.modules.setdefault("openvino_telemetry", None)
if "jax" in sys.modules:    # imported before this file (a plugin): the variable came too late
    sys.modules["jax"].config.update("jax_default_matmul_precision",
                                     os.environ["JAX_DEFAULT_MATMUL_PRECISION"])


def golden_path(*parts: str) -> Path:
    """Path inside the golden folder; skips the calling test when the folder is absent."""
    if not GOLDEN.is_dir():
        pytest.skip(f"golden conformance data not found at {GOLDEN} (set DAMO_GOLDEN)")
    p = GOLDEN.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"golden file {p} is missing")
    return p


@pytest.fixture
def golden_dir() -> Path:
    return golden_path()


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with crash recovery that neither hangs nor re-runs the crash
    (tests/xdist_crash.py); other modes keep pytest-xdist's own scheduler."""
    from xdist_crash import make_scheduler
    return make_scheduler(config, log)


def pytest_testnodedown(node, error):
    """A crashed worker: say how its process ended (a signal or an exit status) in the log."""
    from xdist_crash import report_node_down
    report_node_down(node, error)
