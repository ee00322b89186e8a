"""Helpers of the distillation tests: the tiny training config and random teacher weights.

``random_teacher_npz`` writes an official-layout state dict (``.npz``) of a model with random
weights WITHOUT compiling ``model.init`` (shapes from ``jax.eval_shape``, values from numpy), so
the tests do not pay for an init compile of a second model.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from damo_jax.config import load_config
from train_setup import CLASSES, shared_dir


def tiny_cfg():
    """The tiny CLI test config (Ns, 64×64, batch 4, SGD) with the 2 classes of the test data."""
    cfg = load_config(str(shared_dir() / "tiny.py"))
    cfg.model.head["num_classes"] = len(CLASSES)
    cfg.model.class_names = CLASSES
    return cfg


def random_variables(name: str, num_classes: int, seed: int = 0) -> dict:
    """Random variables of model ``name``: N(0, 0.1²) weights, BN scale 1, mean 0, var 1."""
    from damo_jax.models import build_model
    cfg = load_config(name)
    cfg.model.head["num_classes"] = num_classes
    model = build_model(cfg)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def make(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "var":
            return np.ones(s.shape, np.float32)
        if name in ("mean", "bias"):
            return (0.01 * rng.standard_normal(s.shape)).astype(np.float32)
        if name == "scale":
            return np.ones(s.shape, np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(make, dict(shapes))


def random_teacher_npz(path: Path, name: str, num_classes: int, seed: int = 0) -> Path:
    from damo_jax.interop.convert import to_torch_state_dict
    cfg = load_config(name)
    cfg.model.head["num_classes"] = num_classes
    np.savez(path, **to_torch_state_dict(random_variables(name, num_classes, seed), cfg))
    return Path(path)
