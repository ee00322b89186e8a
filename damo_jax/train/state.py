"""The training state: ONE pytree, its keys defined here and nowhere else.

The state is a plain dict (a ``TypedDict`` for readers and type checkers; plain dicts keep the
existing consumers — Orbax items, tests, benchmarks — working with ``state["params"]``):

student (always present)
    ``params``, ``batch_stats``   the model being trained (Flax variable trees);
    ``opt_state``                 optimizer state of ``params`` (gradient clipping applies here);
    ``ema_params``, ``ema_batch_stats``  EMA of the student (what evaluation / export use);
    ``step`` (int32 scalar), ``rng`` (PRNG key).
distillation (only when ``config.distill.teacher`` is set; SPEC §8)
    ``align_params``     ``{"level0": {"kernel": (C_s, C_t), "bias": (C_t,)}, ...}`` — the 1×1 align
                         convs, TRAINED (own optimizer state, weight decay on kernels only, not clipped:
                         the official code clips the student's parameters only);
    ``align_opt_state``  their optimizer state;
    ``teacher_params``, ``teacher_batch_stats``  the teacher's backbone + neck (no head), FROZEN:
                         not in any optimizer, no weight decay, no EMA, passed through every step
                         unchanged (bit-identical) and never written to checkpoints (reloaded from
                         ``distill.teacher_weights``; a fingerprint in the checkpoint meta guards it).

What a checkpoint holds: ``CHECKPOINT_KEYS`` (+ ``DISTILL_CHECKPOINT_KEYS`` when distilling) as the
``state`` item and the EMA as the ``ema`` item (damo_jax/train/checkpoint.py).
"""
from __future__ import annotations

import hashlib
from typing import Any, TypedDict

import jax
import numpy as np

STUDENT_KEYS = ("params", "batch_stats", "opt_state", "ema_params", "ema_batch_stats", "step", "rng")
ALIGN_KEYS = ("align_params", "align_opt_state")
TEACHER_KEYS = ("teacher_params", "teacher_batch_stats")
DISTILL_KEYS = ALIGN_KEYS + TEACHER_KEYS
# the ``state`` item of a checkpoint (EMA goes to the ``ema`` item, the teacher is not saved)
CHECKPOINT_KEYS = ("params", "batch_stats", "opt_state", "step", "rng")
DISTILL_CHECKPOINT_KEYS = ALIGN_KEYS


class TrainState(TypedDict, total=False):
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any
    ema_batch_stats: Any
    step: Any
    rng: Any
    align_params: Any
    align_opt_state: Any
    teacher_params: Any
    teacher_batch_stats: Any


def is_distill(state) -> bool:
    """True when the state carries a teacher and align convs."""
    return all(k in state for k in DISTILL_KEYS)


def check_state(state, where: str = "train state") -> None:
    """Raise KeyError naming the missing / unknown keys (a half-distill state is a bug)."""
    keys = set(state)
    missing = [k for k in STUDENT_KEYS if k not in keys]
    distill = [k for k in DISTILL_KEYS if k in keys]
    if distill and len(distill) != len(DISTILL_KEYS):
        missing += [k for k in DISTILL_KEYS if k not in keys]
    unknown = sorted(keys - set(STUDENT_KEYS) - set(DISTILL_KEYS))
    if missing or unknown:
        raise KeyError(f"{where}: missing keys {missing}, unknown keys {unknown}")


def checkpoint_keys(state) -> tuple[str, ...]:
    """Keys of ``state`` that go into the checkpoint's ``state`` item."""
    return CHECKPOINT_KEYS + (DISTILL_CHECKPOINT_KEYS if is_distill(state) else ())


def student_variables(state, ema: bool = True) -> dict:
    """``{"params", "batch_stats"}`` of the student (EMA by default): never the teacher."""
    p, s = ("ema_params", "ema_batch_stats") if ema else ("params", "batch_stats")
    return {"params": state[p], "batch_stats": state[s]}


def fingerprint(tree) -> str:
    """sha256 (16 hex) of a pytree's leaf paths, shapes, dtypes and bytes (host copies).

    Used to check that a resumed distillation run reloads the very teacher it started with."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
