"""Shared test fixtures.

Golden conformance data (computed by the official PyTorch implementation) lives outside the repo
in ``../shared/golden`` relative to the repository root (override with ``DAMO_GOLDEN=/path``).
Tests that need it skip with a clear reason when the folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(os.environ.get("DAMO_GOLDEN", ROOT.parent / "shared" / "golden"))
# The train loop's child-process compile (damo_jax/train/precompile.py) pays a start-up per run:
# off for the suite's many short runs (and the CLI runs they start); tests/test_precompile.py
# switches it on where it is the subject.
os.environ.setdefault("DAMO_JAX_PRECOMPILE", "off")


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
