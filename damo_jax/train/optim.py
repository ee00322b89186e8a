"""Optimisation recipe of DAMO-YOLO (SPEC §9.1): lr schedule, weight-decay mask, optimizer, EMA.

Everything here is a pure function of its arguments (no global state), so the train step can call it
under ``jax.jit`` and the tests can compare it with plain numpy formulas.

* ``lr_at(it, ...)`` / ``make_lr_schedule(...)`` — quadratic warmup from 0, cosine to
  ``base·min_lr_ratio``, constant over the no-augmentation tail; per iteration ``it`` (0-based).
* ``decay_mask(params, batch_stats)`` — True for conv kernels and the head's per-level ``scales``
  scalars, False for every bias and every norm-layer parameter (SPEC §9.1 weight-decay grouping).
* ``make_optimizer(train_cfg, lr_schedule, mask)`` — SGD Nesterov with COUPLED L2 decay
  (PyTorch ``SGD(weight_decay=...)``: grad += wd·param before momentum) for T/S/M/L, AdamW (decoupled)
  for the nano models.
* ``ema_decay(it)`` / ``ema_update(ema, new, it)`` — ``d(it) = decay·(1 − exp(−it/tau))``; the first
  update (it = 0) is a copy. Applied to params AND batch_stats.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

PyTree = Any

# Module names whose parameters are normalisation affine parameters (never decayed).
_NORM_NAME_HINTS = ("bn", "norm", "batchnorm", "layernorm", "groupnorm")


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------------
def lr_at(it, *, base_lr: float, total_steps: int, warmup_steps: int, no_aug_steps: int,
          min_lr_ratio: float):
    """Learning rate of iteration ``it`` (0-based), SPEC §9.1. Works on ints, numpy and jax arrays.

    it < W:           base · (it / W)²
    it ≥ T − Na:      base · min_lr_ratio
    otherwise:        min + 0.5 · (base − min) · (1 + cos(π · (it − W) / (T − W − Na)))
    """
    it = jnp.asarray(it, jnp.float32)
    min_lr = base_lr * min_lr_ratio
    warm = base_lr * (it / max(warmup_steps, 1)) ** 2
    cos_len = max(total_steps - warmup_steps - no_aug_steps, 1)
    cosine = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(math.pi * (it - warmup_steps) / cos_len))
    lr = jnp.where(it < warmup_steps, warm, cosine)
    return jnp.where(it >= total_steps - no_aug_steps, min_lr, lr)


def make_lr_schedule(*, base_lr: float, total_steps: int, warmup_steps: int, no_aug_steps: int,
                     min_lr_ratio: float) -> Callable:
    """``step -> lr`` (an optax schedule) with the constants of one run bound."""
    def schedule(step):
        return lr_at(step, base_lr=base_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                     no_aug_steps=no_aug_steps, min_lr_ratio=min_lr_ratio)
    return schedule


def schedule_from_config(train_cfg, *, steps_per_epoch: int, global_batch: int) -> tuple[Callable, dict]:
    """The schedule of a run and its constants (base_lr, total/warmup/no-aug steps) for logging."""
    consts = dict(
        base_lr=float(train_cfg.base_lr_per_img) * global_batch,
        total_steps=int(train_cfg.epochs) * steps_per_epoch,
        warmup_steps=int(round(float(train_cfg.warmup_epochs) * steps_per_epoch)),
        no_aug_steps=int(round(float(train_cfg.no_aug_epochs) * steps_per_epoch)),
        min_lr_ratio=float(train_cfg.min_lr_ratio),
    )
    return make_lr_schedule(**consts), consts


# --------------------------------------------------------------------------------------------------
# Weight-decay mask
# --------------------------------------------------------------------------------------------------
def _norm_module_paths(batch_stats: PyTree | None) -> set[tuple[str, ...]]:
    """Paths of the modules that own running statistics (i.e. BatchNorm layers)."""
    if batch_stats is None:
        return set()
    leaves = jax.tree_util.tree_leaves_with_path(batch_stats)
    return {tuple(_key_str(k) for k in path[:-1]) for path, _ in leaves}


def _key_str(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _is_decayed(path: tuple[str, ...], norm_paths: set[tuple[str, ...]]) -> bool:
    name, module = path[-1], path[:-1]
    if name == "bias":
        return False
    if module in norm_paths:
        return False
    last = module[-1].lower() if module else ""
    return not any(last == h or last.startswith(h + "_") or last.endswith("_" + h) for h in _NORM_NAME_HINTS)


def decay_mask(params: PyTree, batch_stats: PyTree | None = None) -> PyTree:
    """Bool pytree like ``params``: True where weight decay applies (SPEC §9.1).

    Decayed: conv kernels and any other non-bias, non-norm parameter (the head's per-level ``scales``
    scalars). Not decayed: every ``bias``; every parameter of a module that owns batch statistics
    (BatchNorm ``scale``/``bias``) or whose name says it is a norm layer (``bn``, ``*_norm`` ...).
    """
    norm_paths = _norm_module_paths(batch_stats)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _is_decayed(tuple(_key_str(k) for k in path), norm_paths), params)


# --------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------
def make_optimizer(train_cfg, lr_schedule, mask: PyTree) -> optax.GradientTransformation:
    """SGD (Nesterov, coupled L2) or AdamW (decoupled), both with the same decay ``mask``.

    ``lr_schedule``: a float or an optax schedule of the optimizer's own update count. The trainer
    passes 1.0 and multiplies the updates by ``lr(state["step"])`` itself (identical arithmetic:
    optax applies the lr as one final multiply by −lr in both optimizers).

    ``train_cfg.optimizer``: "sgd" | "adamw". Optional global-norm clipping (``grad_clip`` > 0)
    comes first, as ``clip_grad_norm_`` before ``optimizer.step()`` in PyTorch.
    """
    kind = str(train_cfg.optimizer).lower()
    wd = float(train_cfg.weight_decay)
    if kind == "sgd":
        core = optax.chain(
            optax.add_decayed_weights(wd, mask=mask),
            optax.sgd(lr_schedule, momentum=float(train_cfg.momentum), nesterov=bool(train_cfg.nesterov)),
        )
    elif kind == "adamw":
        b1, b2 = (float(b) for b in train_cfg.adam_betas)
        core = optax.adamw(lr_schedule, b1=b1, b2=b2, eps=float(train_cfg.adam_eps),
                           weight_decay=wd, mask=mask)
    else:
        from damo_jax.config import CHOICES       # the one list validate_recipe checks too
        raise ValueError(f"config train.optimizer={train_cfg.optimizer!r}: expected one of "
                         f"{', '.join(CHOICES['train', 'optimizer'])}")
    clip = float(getattr(train_cfg, "grad_clip", 0.0) or 0.0)
    if clip > 0:
        return optax.chain(optax.clip_by_global_norm(clip), core)
    return core


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------
def ema_decay(it, decay: float = 0.9998, tau: float = 2000.0):
    """``decay · (1 − exp(−it / tau))``; 0 at it = 0 (so the first update copies the model)."""
    it = jnp.asarray(it, jnp.float32)
    return decay * -jnp.expm1(-it / tau)  # expm1: no cancellation for small it in float32


def ema_update(ema: PyTree, new: PyTree, it, decay: float = 0.9998, tau: float = 2000.0) -> PyTree:
    """``d·ema + (1 − d)·new`` leaf-wise with ``d = ema_decay(it)``; non-float leaves take ``new``."""
    d = ema_decay(it, decay, tau)

    def mix(e, n):
        if not jnp.issubdtype(jnp.asarray(n).dtype, jnp.floating):
            return n
        return (d * e + (1.0 - d) * n).astype(n.dtype)

    return jax.tree.map(mix, ema, new)


def count_decayed(mask: PyTree, params: PyTree) -> Mapping[str, int]:
    """Number of tensors / elements with and without decay, for the start-of-run log line."""
    flags = jax.tree.leaves(mask)
    sizes = [int(jnp.size(p)) for p in jax.tree.leaves(params)]
    return dict(
        decayed_tensors=sum(flags), plain_tensors=len(flags) - sum(flags),
        decayed_elems=sum(s for f, s in zip(flags, sizes) if f),
        plain_elems=sum(s for f, s in zip(flags, sizes) if not f))
