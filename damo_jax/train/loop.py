"""The main job: ``python -m damo_jax.train --config s [--data SPEC] [--workdir DIR] [--runlocal]
[--config.train.epochs=3 ...]``.

Sections (big_vision style, read top to bottom):

0. CLI: :mod:`damo_jax.cli.train` (``damo-jax train``; config, ``--config.<key>=value`` overrides).
1. Devices: optional ``jax.distributed.initialize()``, a 1-D ``Mesh`` over all devices ("data").
2. Data: train / val datasets, run lengths (steps per epoch, warmup, no-aug tail, total).
3. State: model init, optional fine-tuning weights, optimizer, EMA copy — one plain dict pytree
   ``{params, batch_stats, opt_state, ema_params, ema_batch_stats, step, rng}``, replicated; when
   distilling also the align convs, their optimizer state and the frozen teacher (keys defined in
   ``damo_jax/train/state.py``, distillation in ``damo_jax/train/distill.py``).
4. ``update_fn(state, batch) -> (state, metrics)``: forward (train mode), AlignOTA on stop-gradient
   predictions, targets, loss, grads, optimizer, EMA, step += 1, non-finite guard. ONE ``jax.jit``
   with ``donate_argnums=0``; the batch is sharded on "data", so BN statistics and the loss
   normalisers are over the global batch.
5. Loop: auto-resume, log, evaluate (EMA) every N epochs, checkpoint (last k + best AP), and at the
   end ``curves.png``, ``predictions.png`` and a summary line.

Exit codes: 0 done, 3 non-finite loss/gradients (the run stops before a checkpoint of the bad step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from damo_jax import distributed
from damo_jax.errors import ConfigError
from damo_jax.data_pipelines.quality import format_summary
from damo_jax.models import conv_grad
from damo_jax.models.batchnorm import describe_bn_impl
from damo_jax.train import checkpoint
from damo_jax.train import distill as distill_lib
from damo_jax.train import optim
from damo_jax.train import precompile
from damo_jax.train import state as state_lib
from damo_jax.train.log import TrainLog, plot_curves

log = logging.getLogger("damo_jax.train.loop")
EXIT_NONFINITE = 3
# Test hooks (host side only, so the compiled step is the same program with and without them):
# NAN: before the update of this global step, the parameters are multiplied by NaN (a corrupted
#      state, as a diverging run produces); HANG: before this step the process prints a line and
#      sleeps, so a test can ``kill -9`` it at a known point.
NAN_STEP_ENV = "DAMO_JAX_TEST_NAN_STEP"
HANG_STEP_ENV = "DAMO_JAX_TEST_HANG_AT_STEP"
# ... and one that sends this process SIGINT from inside a weakref finalizer before step N, where
#     Python swallows the KeyboardInterrupt (as in JAX's garbage-collection callback).
LOST_SIGINT_STEP_ENV = "DAMO_JAX_TEST_LOST_SIGINT_AT_STEP"
# ... and one that hangs inside the evaluation after step N (an interrupt during an evaluation).
HANG_EVAL_ENV = "DAMO_JAX_TEST_HANG_IN_EVAL_AT_STEP"


def _test_hooks(state: dict, step: int) -> dict:
    if os.environ.get(HANG_STEP_ENV) == str(step):
        print(f"[test hook] hanging before step {step}", flush=True)
        while True:
            time.sleep(1.0)
    if os.environ.get(LOST_SIGINT_STEP_ENV) == str(step):
        import gc
        import signal
        import weakref
        print(f"[test hook] SIGINT from a finalizer before step {step}", flush=True)
        victim = type("Victim", (), {})()
        weakref.finalize(victim, lambda: (os.kill(os.getpid(), signal.SIGINT), sum(range(10))))
        del victim
        gc.collect()
    if os.environ.get(NAN_STEP_ENV) == str(step):
        print(f"[test hook] injecting NaN parameters before step {step}", flush=True)
        state = dict(state, params=jax.jit(lambda p: jax.tree.map(lambda x: x * jnp.nan, p))(state["params"]))
    return state


class NonFiniteError(RuntimeError):
    """The loss or the gradients of a step were NaN/Inf; the state of that step was discarded."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or a scheduler's stop (SIGTERM), raised in the main thread."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: the signal of an interrupt the train CLI's handler received and raised (``None``: none). A
#: KeyboardInterrupt raised while Python runs a garbage-collection or weakref callback (JAX's
#: ``_xla_gc_callback`` during tracing/compiling) is printed as "Exception ignored" and lost: the
#: loop then raises it again after the step (:func:`check_interrupted`).
INTERRUPT: dict = {"signum": None}


def check_interrupted() -> None:
    """Raise :class:`Interrupted` for an interrupt that was received but swallowed."""
    signum = INTERRUPT["signum"]
    if signum is not None:
        INTERRUPT["signum"] = None
        raise Interrupted(signum)


# ==================================================================================================
# 0. CLI
# ==================================================================================================
def parse_args(argv=None):
    """(config, args) of the train command line: :func:`damo_jax.cli.train.parse_args`."""
    from damo_jax.cli.train import parse_args as cli_parse_args
    return cli_parse_args(argv, prog="python -m damo_jax.train")


# ==================================================================================================
# 1. Devices
# ==================================================================================================
def multihost_requested(multihost: bool, env=os.environ) -> bool:
    """See :func:`damo_jax.distributed.requested`."""
    return distributed.requested(multihost, env)


def maybe_init_distributed(multihost: bool) -> None:
    """``jax.distributed.initialize()`` (:func:`damo_jax.distributed.initialize`): auto-detected on
    TPU pods, SLURM and Open MPI; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
    distributed.initialize(multihost)


def make_mesh() -> Mesh:
    from damo_jax.runtime import make_mesh as mesh_over
    return mesh_over()


CACHE_MAX_GB = 2.0      # default bound of the persistent XLA cache (DAMO_JAX_CACHE_MAX_GB)


def enable_compile_cache() -> None:
    """Persistent XLA cache in ``$DAMO_JAX_CACHE/xla`` (default ``~/.cache/damo_jax/xla``): restarts
    and resumes skip compilation. Bounded to ``DAMO_JAX_CACHE_MAX_GB`` GiB (default 2; the least
    recently used entries go first; an S@640 step is a few MB); env JAX_COMPILATION_CACHE_DIR wins
    (then JAX's own settings apply)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    text = os.environ.get("DAMO_JAX_CACHE_MAX_GB", str(CACHE_MAX_GB))
    try:
        max_gb = float(text)
        if not max_gb > 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"DAMO_JAX_CACHE_MAX_GB={text!r}: expected a size in GiB > 0") from None
    cache = Path(os.environ.get("DAMO_JAX_CACHE", Path.home() / ".cache" / "damo_jax")) / "xla"
    _stamp_unbounded_entries(cache)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    jax.config.update("jax_compilation_cache_max_size", int(max_gb * 2**30))


def _stamp_unbounded_entries(cache: Path) -> None:
    """Give every entry of ``cache`` the ``-atime`` file that JAX's bounded cache reads for each entry
    before it writes a new one: entries written without a bound (by damo_jax before the bound existed,
    or by a process with ``JAX_COMPILATION_CACHE_DIR`` set) have none, and one such entry makes every
    later write fail with a warning. The entry's modification time stands in for its last use."""
    if not cache.is_dir():
        return
    import filelock
    try:
        with filelock.FileLock(str(cache / ".lockfile"), timeout=30):
            for entry in cache.glob("*-cache"):
                atime = entry.with_name(entry.name[:-len("-cache")] + "-atime")
                try:
                    if not atime.exists():
                        atime.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
                except FileNotFoundError:               # evicted meanwhile by a process without the lock
                    continue
    except (OSError, filelock.Timeout) as err:          # the cache is an optimisation: never fatal
        log.warning("compilation cache %s: could not stamp old entries (%s)", cache, err)


# ==================================================================================================
# 2. Data
# ==================================================================================================
@dataclasses.dataclass(frozen=True)
class RunLength:
    steps_per_epoch: int
    total_steps: int          # of the lr schedule (epochs · steps_per_epoch)
    warmup_steps: int
    no_aug_start_step: int    # first step of the no-augmentation tail
    last_step: int            # where this invocation stops (total_steps or train.max_steps)
    epochs: int


def run_length(cfg, num_images: int) -> RunLength:
    tc = cfg.train
    spe = max(1, math.ceil(num_images / int(tc.batch_size)))
    total = int(tc.epochs) * spe
    last = min(total, int(tc.max_steps)) if int(tc.max_steps) > 0 else total
    return RunLength(spe, total, epochs_to_steps(tc.warmup_epochs, spe),
                     total - epochs_to_steps(tc.no_aug_epochs, spe), last, int(tc.epochs))


def epochs_to_steps(epochs, steps_per_epoch: int) -> int:
    """Whole or fractional epochs (e.g. a 0.5-epoch warmup in a short demo run) -> steps."""
    return int(round(float(epochs) * steps_per_epoch))


def open_datasets(cfg):
    """(train dataset, val dataset or None); also sets num_classes / class names from the data.

    Refuses (``DataError``, one ``error:`` line on the CLI) a training split without images or
    without a single usable box, validation data that is there but unreadable (a bad annotation
    file, an unknown category: it turned evaluation off with one warning), and validation data
    whose class list differs from the training data's (count, names or order). A dataset without
    a validation split (``MissingSplitError``; without ``data.val`` also a training spec that has
    no splits, e.g. one COCO JSON file) trains without evaluation, with a warning — unless the
    split or the spec was chosen (:func:`check_val_split_exists`)."""
    from damo_jax import data_pipelines
    train_ds = data_pipelines.open_dataset(cfg.data.train, cfg.data.train_split)
    train_where = f"training data {cfg.data.train!r} (split {cfg.data.train_split!r})"
    if len(train_ds) == 0:
        raise data_pipelines.DataError(f"{train_where}: the split has no images")
    check_train_boxes(train_ds, train_where)
    val_ds = None
    val_spec = cfg.data.val or cfg.data.train
    if val_spec and cfg.data.val_split:
        try:
            # no data.val: the training spec's own val split, never its training images again
            val_ds = data_pipelines.open_dataset(val_spec, cfg.data.val_split,
                                                 require_split=not cfg.data.val)
        except data_pipelines.MissingSplitError as err:  # bad data of a split that IS there: error
            check_val_split_exists(cfg, val_spec, err)
            log.warning("no validation data (%s split %s): %s — evaluation skipped",
                        val_spec, cfg.data.val_split, err)
    if val_ds is not None:
        check_same_classes(train_ds, val_ds, train_where,
                           f"validation data {val_spec!r} (split {cfg.data.val_split!r})")
    names = tuple(train_ds.class_names)
    cfg.model.head["num_classes"] = len(names)
    cfg.model.class_names = names
    return train_ds, val_ds


#: the config's own ``data.val_split`` (and its alias): a dataset without it trains without evaluation
DEFAULT_VAL_SPLITS = ("val", "validation")


def check_val_split_exists(cfg, val_spec: str, err: Exception) -> None:
    """ConfigError for a validation split the user chose (``data.val_split`` other than ``val``,
    or an explicit ``data.val``) that a dataset WITH splits does not have: a typo
    (``--config.data.val_split=test``) turned evaluation off with one warning, where the same typo
    in ``data.train_split`` stops the run. A training spec without splits at all (one COCO JSON
    file, a flat VOC folder: ``MissingSplitError`` only because the val split must be a split of its
    own) still trains without evaluation, as does a dataset that lacks the default ``val``."""
    from damo_jax import data_pipelines
    split = cfg.data.val_split
    if not cfg.data.val and split in DEFAULT_VAL_SPLITS:
        return
    if not cfg.data.val:          # was it the spec (no splits at all) or the split (not there)?
        try:
            data_pipelines.open_dataset(val_spec, split, require_split=False)
            return                # a spec without splits: every split reads the same images
        except data_pipelines.MissingSplitError:
            pass
    key = "data.val_split" if split not in DEFAULT_VAL_SPLITS else "data.val"
    raise ConfigError(f"{key}: validation data {val_spec!r} has no split {split!r} ({err}); set "
                      f"--config.data.val_split to one of its splits, or "
                      f"--config.data.val_split='' to train without evaluation")


def check_train_boxes(ds, where: str) -> None:
    """``DataError`` when not one image of the training split has a usable box (a missing labels
    folder, empty label files, only crowd / difficult objects...): such a run would learn nothing.
    The message repeats the reader's hint (``ds.no_boxes_hint``) on where the labels were expected."""
    from damo_jax.data_pipelines import DataError
    records = getattr(ds, "records", None)
    if records is None or any(len(r.labels) for r in records):
        return
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(ds.stats.items()) if v)
    hint = getattr(ds, "no_boxes_hint", None)
    raise DataError(f"{where}: the training split has no boxes to learn from ({len(records)} images; "
                    f"{counts})" + (f": {hint}" if hint else ""))


def _short(names, limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def check_same_classes(train_ds, val_ds, train_where: str, val_where: str) -> None:
    """``DataError`` when the validation data's class list is not the training data's (a different
    count fails every evaluation; other names or another order give wrong per-class AP)."""
    from damo_jax.data_pipelines import DataError
    train, val = tuple(train_ds.class_names), tuple(val_ds.class_names)
    if len(train) != len(val):
        raise DataError(f"{val_where} has {len(val)} classes {_short(val)} but {train_where} has "
                        f"{len(train)} {_short(train)}: train and validation need the same class list")
    if train != val:
        i = next(k for k, (a, b) in enumerate(zip(train, val)) if a != b)
        raise DataError(f"{val_where} and {train_where} name their classes differently: class {i} is "
                        f"{val[i]!r} in the validation data but {train[i]!r} in the training data "
                        f"(train {_short(train)}, val {_short(val)}); labels would be matched by index, "
                        f"giving wrong per-class results")


def oversized_batch_note(batch_size: int, num_images: int) -> str:
    """The warning for a batch larger than the training split ("" when it is not)."""
    if batch_size <= num_images:
        return ""
    return (f"train.batch_size {batch_size} > the {num_images} training images: every batch "
            f"repeats images (one step per epoch); a smaller batch gives more steps per epoch")


def make_loader(train_ds, cfg, rl: RunLength, start_step: int):
    from damo_jax import data_pipelines
    return data_pipelines.TrainLoader(
        train_ds, cfg.data, batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed),
        steps_per_epoch=rl.steps_per_epoch, total_steps=rl.total_steps,
        no_aug_start_step=rl.no_aug_start_step, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())


def check_process_slices(loader, batch: dict, step: int) -> str:
    """Multi-process: assert (all-gather) that the processes read disjoint row slices covering the
    global batch of ``step`` and got that batch's images; returns a log line."""
    from damo_jax.data_pipelines.loader import global_indices
    spec, ds = loader.spec, loader.ds
    gidx = global_indices(spec["seed"], step, spec["batch_size"], spec["steps_per_epoch"], len(ds))
    lo = spec["process_index"] * spec["local_batch"]
    rows = np.arange(lo, lo + spec["local_batch"])
    if hasattr(ds, "records"):          # source image ids of the global batch (no decoding)
        expected, got = [int(ds.records[i].image_id) for i in gidx], batch["image_ids"]
    else:
        expected, got = gidx, gidx[rows]
    distributed.check_process_slices(rows, got, expected)
    return (f"data: step {step}: {jax.process_count()} processes read disjoint slices of "
            f"{spec['local_batch']} rows covering the global batch of {spec['batch_size']} (checked)")


DEVICE_BATCH_KEYS = ("images", "gt_boxes", "gt_labels", "gt_valid")


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Process-local numpy batch -> global arrays sharded on "data"."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
            for k in DEVICE_BATCH_KEYS}


# ==================================================================================================
# 3. State
# ==================================================================================================
def make_tx(cfg, params, batch_stats):
    """The optimizer with a UNIT learning rate: ``update_fn`` multiplies its updates by
    ``lr_fn(state["step"])``, so the applied lr is a function of the state's step (the one that is
    logged, checkpointed and resumed), not of a separate counter inside the optimizer state.
    Same arithmetic as optax's own schedule (one multiply by −lr, SPEC §9.1 semantics)."""
    return optim.make_optimizer(cfg.train, 1.0, optim.decay_mask(params, batch_stats))


def init_state(model, cfg, key, replicated: NamedSharding) -> dict:
    """Fresh train state, created directly on the devices (no device_put aliasing, TOOLCHAIN §3).

    Variable shapes do not depend on the image size, so the init traces a 64×64 input; on CPU it
    compiles without backend optimisation (``models.build.FAST_COMPILE_OPTIONS``: same values, the
    optimised compile of hundreds of inlined RNG calls took minutes on a loaded 2-core host)."""
    from damo_jax.models.build import FAST_COMPILE_OPTIONS

    def init(key):
        init_key, state_key = jax.random.split(key)
        variables = model.init(init_key, jnp.zeros((1, 64, 64, 3), jnp.float32), train=False)
        params, stats = variables["params"], variables.get("batch_stats", {})
        return {"params": params, "batch_stats": stats, "opt_state": make_tx(cfg, params, stats).init(params),
                "ema_params": jax.tree.map(jnp.copy, params), "ema_batch_stats": jax.tree.map(jnp.copy, stats),
                "step": jnp.zeros((), jnp.int32), "rng": state_key}

    lowered = jax.jit(init, out_shardings=replicated).lower(key)
    options = FAST_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
    return lowered.compile(compiler_options=options)(key)


def apply_finetune(state: dict, cfg, tx, replicated: NamedSharding, info) -> dict:
    """Load official ``.pth`` / ``.npz`` weights (``train.finetune``) into params + batch_stats.

    As the official fine-tuning (``Detector.load_pretrain_detector``, SPEC §9.1) every tensor but
    the head's is loaded and the head keeps its fresh initialisation; with ``train.finetune_head``
    the head is loaded too where its shapes match (with another class count the
    ``head.gfl_cls.*`` tensors stay fresh). The optimizer state and the EMA restart from the
    merged weights.
    """
    from damo_jax.interop import convert
    subset, report = convert.load_pretrained(cfg.train.finetune, cfg, skip_head_if_mismatch=True,
                                             fresh_head=not bool(cfg.train.finetune_head))
    fresh = [key for key, why in report["skipped"] if why == convert.FRESH_HEAD_REASON]
    parts = [f"{key} ({why})" for key, why in report["skipped"] if why != convert.FRESH_HEAD_REASON]
    if fresh:
        modules = dict.fromkeys(".".join(k.split(".")[:2]) + ".*" for k in fresh)
        parts.insert(0, f"{', '.join(modules)} ({len(fresh)} tensors: the head starts fresh, as in "
                        f"the official fine-tuning; --config.train.finetune_head=True loads it)")
    skipped = "; ".join(parts) or "none"
    info(f"fine-tuning from {cfg.train.finetune}: loaded {report['num_loaded']} tensors; "
         f"skipped (re-initialised): {skipped}")
    host = {"params": jax.device_get(state["params"]), "batch_stats": jax.device_get(state["batch_stats"])}
    merged = convert.merge_variables(host, subset)

    def restart(v):
        return {"params": v["params"], "batch_stats": v["batch_stats"], "opt_state": tx.init(v["params"]),
                "ema_params": jax.tree.map(jnp.copy, v["params"]),
                "ema_batch_stats": jax.tree.map(jnp.copy, v["batch_stats"])}

    return dict(state, **jax.jit(restart, out_shardings=replicated)(merged))


# ==================================================================================================
# 4. Update step
# ==================================================================================================
def make_update_fn(model, tx, lr_fn, cfg, *, teacher=None, align_tx=None, total_steps: int = 0):
    """``update_fn(state, batch) -> (new_state, metrics)``; pure, to be jitted with donation.

    With ``teacher`` (a ``distill.Teacher``; its frozen variables are in the state) the same step
    also runs the teacher's backbone + neck (eval mode, stop_gradient), adds
    ``w(step)·distill_loss`` (cosine weight over ``total_steps``) and updates the align convs with
    ``align_tx``; the teacher state is passed through unchanged."""
    from damo_jax.assign.ota import align_ota, build_targets
    from damo_jax.losses import detection_loss

    num_classes = int(cfg.model.head.num_classes)
    reg_max = int(cfg.model.head.reg_max)
    tc = cfg.train

    def loss_fn(trainable, batch_stats, batch, rng, teacher_neck, kd_weight):
        params = trainable["params"]
        images = batch["images"].astype(jnp.float32)
        out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": rng})
        assignment = align_ota(
            jax.lax.stop_gradient(out["scores"]), out["priors"], jax.lax.stop_gradient(out["boxes"]),
            batch["gt_boxes"], batch["gt_labels"], batch["gt_valid"])
        targets = build_targets(assignment, out["priors"], batch["gt_boxes"], batch["gt_labels"],
                                num_classes=num_classes, reg_max=reg_max)
        total, metrics = detection_loss(out, targets, reg_max=reg_max)
        if teacher_neck is not None:
            kd = distill_lib.feature_loss(cfg, out["neck"], teacher_neck, trainable["align"])
            total = total + kd_weight * kd
            metrics = dict(metrics, loss_distill=kd, distill_weight=kd_weight)
        return total, (metrics, mutated["batch_stats"])

    def update_fn(state, batch):
        step = state["step"]
        rng, step_rng = jax.random.split(state["rng"])
        trainable, teacher_neck, kd_weight = {"params": state["params"]}, None, None
        if teacher is not None:
            trainable["align"] = state["align_params"]
            teacher_neck = jax.lax.stop_gradient(distill_lib.neck_features(
                teacher.model, {"params": state["teacher_params"], "batch_stats": state["teacher_batch_stats"]},
                batch["images"].astype(jnp.float32)))
            kd_weight = distill_lib.weight_at(step, total_steps, float(cfg.distill.weight),
                                              float(cfg.distill.weight_end))
        (total, (metrics, new_stats)), all_grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, state["batch_stats"], batch, step_rng, teacher_neck, kd_weight)
        grads = all_grads["params"]
        lr = lr_fn(step)
        grad_norm = optax.tree.norm(grads)      # student only, before clipping (as clip_grad_norm_)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        if teacher is not None:
            finite = finite & jnp.isfinite(optax.tree.norm(all_grads["align"]))

        def apply(state):
            """The state after a finite step: optimizer, EMA, step + 1, next rng."""
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            params = jax.tree.map(lambda p, u: p + lr * u, state["params"], updates)
            if tc.ema:
                ema_params = optim.ema_update(state["ema_params"], params, step, tc.ema_decay, tc.ema_tau)
                ema_stats = optim.ema_update(state["ema_batch_stats"], new_stats, step, tc.ema_decay,
                                             tc.ema_tau)
            else:
                ema_params, ema_stats = params, new_stats
            new_state = {"params": params, "batch_stats": new_stats, "opt_state": opt_state,
                         "ema_params": ema_params, "ema_batch_stats": ema_stats, "step": step + 1,
                         "rng": rng}
            if teacher is not None:               # align convs: own optimizer, same lr, no clip
                a_updates, a_opt = align_tx.update(all_grads["align"], state["align_opt_state"],
                                                   state["align_params"])
                new_state.update(align_params=jax.tree.map(lambda p, u: p + lr * u, state["align_params"],
                                                           a_updates), align_opt_state=a_opt,
                                 teacher_params=state["teacher_params"],
                                 teacher_batch_stats=state["teacher_batch_stats"])
            return new_state

        # A non-finite step keeps the whole state. A branch, not a per-leaf ``where(finite, new,
        # old)``: behind the select XLA:CPU recomputed the optimizer arithmetic once per output
        # (param, momentum, EMA) and copied every donated param and momentum buffer before
        # updating it in place (872 copies in the S step; docs/bench_train.md §0p).
        new_state = jax.lax.cond(finite, apply, lambda s: s, state)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        metrics.update(total_loss=total, lr=lr, grad_norm=grad_norm, finite=finite)
        return new_state, metrics

    return update_fn


def build_update(run) -> "jax.stages.Wrapped":
    """THE jitted update step of a run: state replicated and donated, batch sharded on "data"
    (also what :mod:`damo_jax.train.precompile` compiles in its child process)."""
    return jax.jit(make_update_fn(run.model, run.tx, run.lr_fn, run.cfg, teacher=run.teacher,
                                  align_tx=run.align_tx, total_steps=run.rl.total_steps),
                   in_shardings=(run.replicated, run.data_sharding),
                   out_shardings=(run.replicated, run.replicated), donate_argnums=0)


def compile_first(update, state: dict, batch: dict, run=None):
    """Compile the jitted step ahead of its first call.

    * One CPU process with a persistent cache (``train.precompile``, :mod:`damo_jax.train.precompile`):
      a child process compiles it into the cache and this process loads it (a process that compiled
      the step itself runs it ~1.3x slower); a child failure or a cache miss falls back to compiling
      here, with a warning.
    * Multi-process: compile (processes other than 0 on CPU through their own executable cache,
      :func:`damo_jax.distributed.compile_cached`) and wait at a barrier, so that all processes enter its first collective
      together (a new gloo context allows 30 s; compile times differ between processes by more on a
      loaded host).
    * Otherwise ``update`` unchanged (compiled by its first call)."""
    if jax.process_count() == 1:
        if run is None or not precompile.wanted(run.cfg):
            return update
        child = precompile.start_child(run.cfg, batch, run.workdir / "precompile.log")
        t0 = time.perf_counter()
        try:
            lowered = update.lower(state, batch)         # traced here while the child compiles
        except BaseException:                            # an error or Ctrl-C: the child stops too
            child.stop()
            raise
        lower_s = time.perf_counter() - t0
        ok, took = child.wait()
        if not ok:
            run.info(f"warning: compiling the update step in a subprocess failed after {took:.0f}s "
                     f"(see {run.workdir / 'precompile.log'}); compiling it in this process "
                     f"(train.precompile=off skips the attempt)")
            return lowered.compile()
        hits = []
        listener = lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None  # noqa: E731
        jax.monitoring.register_event_listener(listener)
        try:
            t0 = time.perf_counter()
            compiled = lowered.compile()
        finally:
            jax.monitoring.unregister_event_listener(listener)
        run.info(f"update step compiled in a subprocess ({took:.0f}s; traced here meanwhile, {lower_s:.0f}s) "
                 f"and loaded from the persistent cache ({time.perf_counter() - t0:.0f}s)" if hits else
                 f"warning: the update step compiled in a subprocess ({took:.0f}s) was not found in the "
                 f"persistent cache; compiled again in this process")
        return compiled
    compiled = distributed.compile_cached(update.lower(state, batch))
    distributed.barrier("first_update_step")
    return compiled


def check_finite(metrics: dict, step: int) -> None:
    """Raise NonFiniteError naming the step and the non-finite terms."""
    if bool(metrics["finite"]):
        return
    terms = [k for k in ("loss_cls", "loss_bbox", "loss_dfl", "loss_distill", "total_loss", "grad_norm")
             if k in metrics and not np.isfinite(metrics[k])]
    raise NonFiniteError(
        f"non-finite {', '.join(terms) or 'values'} at step {step} "
        f"({', '.join(f'{k}={float(metrics[k])}' for k in terms)}); the update of this step was "
        f"discarded and the run stops here — no checkpoint of it is written")


# ==================================================================================================
# 5. Loop
# ==================================================================================================
def _host_variables(state: dict, ema: bool = True) -> dict:
    """Replicated device arrays -> numpy variables (works on multi-host: local copy)."""
    def get(x):
        return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
    p, s = ("ema_params", "ema_batch_stats") if ema else ("params", "batch_stats")
    return {"params": jax.tree.map(get, state[p]), "batch_stats": jax.tree.map(get, state[s])}


def should_eval(cfg, epoch: int, rl: RunLength) -> bool:
    """After ``epoch`` (0-based) finished: every eval_every_epochs, every *_tail in the no-aug tail."""
    n = epoch + 1
    in_tail = epoch * rl.steps_per_epoch >= rl.no_aug_start_step
    every = int(cfg.train.eval_every_epochs_tail if in_tail else cfg.train.eval_every_epochs)
    return every > 0 and n % every == 0


def _meta(run: "Run", step: int, metrics=None) -> dict:
    """The ``meta`` item of the checkpoint of ``step`` (``metrics``: its evaluation, if any)."""
    cfg = run.cfg
    meta = {"config": checkpoint.config_to_json(cfg), "class_names": list(cfg.model.class_names),
            "category_ids": [int(c) for c in getattr(run.train_ds, "category_ids", ())],
            "loader": {"step": int(step), "seed": int(cfg.train.seed)}, "step": int(step),
            "epoch": int(step // run.rl.steps_per_epoch), "eval": metrics or {}}
    if run.val_ds is not None:
        meta["val_fingerprint"] = run.val_ds.fingerprint()   # check_resume_val_data
    if run.distill_meta:
        meta["distill"] = run.distill_meta  # teacher source, fingerprint, val stats (config: meta.config.distill)
    return meta


def evaluate_ema(model, state, val_ds, cfg, progress: bool = True) -> dict:
    from damo_jax.evaluation.evaluator import evaluate
    stats = evaluate(model, _host_variables(state, ema=True), val_ds, cfg, progress=progress)
    return {k: float(v) for k, v in stats.items()}


@dataclasses.dataclass
class Run:
    """Everything a training run holds besides the state (built once by ``setup``)."""
    cfg: object
    workdir: Path
    model: object
    tx: object
    lr_fn: object
    base_lr: float
    rl: RunLength
    train_ds: object
    val_ds: object
    ckpts: checkpoint.Checkpoints
    replicated: NamedSharding
    data_sharding: NamedSharding
    primary: bool
    progress: bool
    tlog: TrainLog | None = None
    teacher: object = None            # distill.Teacher when distilling (its variables are in the state)
    align_tx: object = None
    distill_meta: dict = dataclasses.field(default_factory=dict)
    best: dict = dataclasses.field(default_factory=lambda: {"AP": -1.0})
    last_eval: dict = dataclasses.field(default_factory=dict)
    pending_eval: int | None = None   # a resumed step whose evaluation an interrupt cut off

    def info(self, msg: str) -> None:
        if self.tlog is not None:
            self.tlog.info(msg)
        elif self.primary:
            print(msg, file=sys.stderr, flush=True)


def setup(cfg, workdir, *, progress: bool = True) -> tuple[Run, dict]:
    """Mesh, data, model, optimizer, checkpoint manager and a fresh state (on the devices)."""
    from damo_jax.models import build_model

    from damo_jax.config import validate_recipe
    validate_recipe(cfg)                  # the CLI checked it already; library callers too
    mesh = make_mesh()
    replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    if int(cfg.train.batch_size) % mesh.devices.size:
        n = mesh.devices.size
        divisors = [d for d in range(1, n) if int(cfg.train.batch_size) % d == 0]
        raise ConfigError(f"config train.batch_size={cfg.train.batch_size} is not divisible by the "
                          f"{n} devices (the global batch is split evenly over them): use a batch "
                          f"that is a multiple of {n} (--batch-size), or run on {divisors[-1]} "
                          f"device(s) (a resumed run keeps its batch)")
    train_ds, val_ds = open_datasets(cfg)
    rl = run_length(cfg, len(train_ds))
    lr_fn, lr_consts = optim.schedule_from_config(cfg.train, steps_per_epoch=rl.steps_per_epoch,
                                                  global_batch=int(cfg.train.batch_size))
    distill_lib.resolve_grad_clip(cfg)          # official: 30 when distilling (before make_tx)
    precompile.mode(cfg)                        # a bad train.precompile fails here, not at step 1
    model = build_model(cfg)
    teacher = distill_lib.load_teacher(cfg) if distill_lib.enabled(cfg) else None   # fail fast
    state = init_state(model, cfg, jax.random.PRNGKey(int(cfg.train.seed)), replicated)
    align_tx, distill_meta = None, {}
    if teacher is not None:
        align_tx, state = distill_lib.attach(state, cfg, teacher, replicated)
        distill_meta = {"teacher_source": teacher.source,
                        "teacher_fingerprint": state_lib.fingerprint(teacher.frozen())}
    workdir = Path(workdir).absolute()
    run = Run(cfg=cfg, workdir=workdir, model=model, tx=make_tx(cfg, state["params"], state["batch_stats"]),
              lr_fn=lr_fn, base_lr=lr_consts["base_lr"], rl=rl, train_ds=train_ds, val_ds=val_ds,
              ckpts=checkpoint.Checkpoints(workdir / checkpoint.CKPT_SUBDIR,
                                           keep=int(cfg.train.keep_checkpoints)),
              replicated=replicated, data_sharding=data_sharding, primary=jax.process_index() == 0,
              progress=progress, teacher=teacher, align_tx=align_tx, distill_meta=distill_meta)
    return run, state


def latest_meta(run: Run, steps) -> dict:
    """The ``meta`` item of the workdir's newest complete checkpoint ({} when none can be read)."""
    complete = [s for s in steps if run.ckpts.is_complete(s)]
    if not complete:
        return {}
    try:
        return run.ckpts.restore_items(max(complete), ("meta",))["meta"]
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported by the restore itself
        return {}


def check_resume_classes(run: Run, meta: dict) -> None:
    """``ConfigError`` when the workdir's newest complete checkpoint (its ``meta``) was trained on
    another class list than this run's data: resuming would silently continue on other data (same
    count) or fail to restore (another count)."""
    saved, now = tuple(meta.get("class_names") or ()), tuple(run.cfg.model.class_names)
    if saved and saved != now:
        raise ConfigError(
            f"--workdir {run.workdir}: its checkpoints were trained on {len(saved)} classes {_short(saved)} "
            f"but this run's data has {len(now)} {_short(now)}; resume with the same data, or train "
            f"in a new --workdir")


def validation_data(data: dict) -> tuple:
    """(dataset spec, split) a run evaluates on: ``data.val`` (else ``data.train``) and
    ``data.val_split`` of a config or its JSON form."""
    return (data.get("val") or data.get("train") or "", data.get("val_split") or "")


def check_resume_val_data(run: Run, meta: dict) -> None:
    """``ConfigError`` when the workdir's checkpoints were evaluated on other validation data than
    this run's: their best AP, the checkpoint ``eval`` / ``predict`` / ``export`` load, would be
    compared across two validation sets. Checkpoints carry the set's ``fingerprint()`` (the same
    data under another spec, e.g. ``demo`` and its folder as ``coco:…``, resumes); older ones
    compare the specs. (New *training* data only warns, with the other changed settings.)"""
    saved_data = (meta.get("config") or {}).get("data")
    if not saved_data:
        return
    saved, now = validation_data(saved_data), validation_data(run.cfg.data)
    val_ds = getattr(run, "val_ds", None)
    if meta.get("val_fingerprint") and val_ds is None and saved == now:
        raise ConfigError(     # the data vanished or became unreadable: never evaluated again
            f"--workdir {run.workdir}: its checkpoints were evaluated on {saved[0]!r} (split "
            f"{saved[1]!r}) but this run finds no validation data there (the warning above says "
            f"why): it would train on without evaluating and keep the old best checkpoint; bring "
            f"the validation data back, or train in a new --workdir")
    if meta.get("val_fingerprint") and val_ds is not None:
        same = meta["val_fingerprint"] == val_ds.fingerprint()   # the same set under another spec
    else:
        same = saved == now                                      # checkpoints of before 2026-12-06
    if not same:
        where = (f"on {now[0]!r} (split {now[1]!r}), whose images or boxes changed since"
                 if saved == now else f"on {now[0]!r} (split {now[1]!r})")
        raise ConfigError(
            f"--workdir {run.workdir}: its checkpoints were evaluated on {saved[0]!r} (split "
            f"{saved[1]!r}) but this run validates {where}: their best AP "
            f"would be compared across two validation sets; resume with the same validation data "
            f"(config data.val / data.val_split), or train in a new --workdir "
            f"(--config.train.finetune takes weights)")


#: settings a resumed run must keep: the schedule and the data order are counted in steps of the
#: global batch, and the best checkpoint is chosen by AP measured with the test settings
RESUME_FIXED_KEYS = {
    "train.batch_size": "the schedule and the data order are counted in steps of the global batch: "
                        "the restored step would fall in another epoch, at another learning rate",
    "test.image_size": "the best checkpoint is chosen by AP, which would be compared across "
                       "evaluations with other test settings",
    "test.conf_thre": None, "test.iou_thre": None, "test.max_dets": None, "test.pre_nms_topk": None,
}


def check_resume_fixed_settings(run: Run, meta: dict) -> None:
    """``ConfigError`` naming the keys of :data:`RESUME_FIXED_KEYS` that differ from the
    checkpoint's config (they only warned: a halved batch resumed with a 7x lower lr and a doubled
    schedule; other test thresholds mixed AP values in the best-by-AP choice)."""
    from damo_jax.config import flat_items
    saved = dict(flat_items(meta.get("config") or {}))
    if not saved:
        return
    now = dict(flat_items(checkpoint.config_to_json(run.cfg)))
    changed = [k for k in RESUME_FIXED_KEYS if k in saved and saved[k] != now.get(k)]
    if not changed:
        return
    why = "; ".join(dict.fromkeys(RESUME_FIXED_KEYS[k] or RESUME_FIXED_KEYS["test.image_size"]
                                  for k in changed))
    raise ConfigError(
        f"--workdir {run.workdir}: "
        + "; ".join(f"{k} {_override_text(saved[k])} -> {_override_text(now.get(k))}" for k in changed)
        + f" on resume: {why}; resume with the run's settings "
        + " ".join(f"--config.{k}={_override_text(saved[k])}" for k in changed)
        + _img_size_hint(saved, now, changed)
        + ", or train in a new --workdir (other test settings: damo-jax eval --checkpoint "
          f"{run.workdir} --conf / --iou / --img-size scores any checkpoint)")


def _img_size_hint(saved: dict, now: dict, changed) -> str:
    """The ``--img-size`` form of the resume hint for ``test.image_size``: ``damo-jax train
    --img-size`` sets data.image_size and test.image_size together and refuses a
    ``--config.test.image_size`` beside it, so the hint's override did not work pasted into a
    command that changed the size with ``--img-size``. Offered when this run's and the saved
    data / test sizes are equal pairs (what ``--img-size`` gives); "" otherwise."""
    key, other = "test.image_size", "data.image_size"
    if key not in changed or saved.get(key) != saved.get(other) or now.get(key) != now.get(other):
        return ""
    h, w = saved[key]
    size = f"{h}" if h == w else f"{h} {w}"
    rest = [f"--config.{k}={_override_text(saved[k])}" for k in changed if k != key]
    return (f" (a command with --img-size: --img-size {size}" + "".join(f" {r}" for r in rest)
            + " instead)")


def _override_text(value) -> str:
    return "(" + ", ".join(map(str, value)) + ")" if isinstance(value, (list, tuple)) else str(value)


#: keys expected to differ between the invocations of one run (not worth a warning)
RESUME_QUIET_KEYS = ("train.max_steps", "train.precompile", "model.grad_impl", "model.dense_impl", "model.bn_impl",
                     "model.conv3x3_impl", "model.depthwise_impl", "model.pointwise_impl", "data.workers")


def changed_settings(saved: dict, now: dict, limit: int = 12) -> str:
    """``"key: old -> new; ..."`` for the config leaves that differ between a checkpoint's config
    and this run's (the keys of ``RESUME_QUIET_KEYS`` left out); ``""`` when none."""
    from damo_jax.config import flat_items
    old, new = dict(flat_items(saved)), dict(flat_items(now))
    keys = [k for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in RESUME_QUIET_KEYS]
    text = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:limit])
    return text + (f"; ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_resume(run: Run, meta: dict) -> None:
    """The resume checks (classes, validation data, fixed settings) against a checkpoint's meta."""
    check_resume_classes(run, meta)
    check_resume_val_data(run, meta)
    check_resume_fixed_settings(run, meta)


def resume_or_start(run: Run, state: dict) -> dict:
    """Latest complete checkpoint of the workdir, else the fine-tuning weights, else ``state``."""
    steps = run.ckpts.steps()
    if not steps:
        return apply_finetune(state, run.cfg, run.tx, run.replicated, run.info) if run.cfg.train.finetune \
            else state
    saved_meta = latest_meta(run, steps)
    check_resume(run, saved_meta)        # before anything in the run folder changes
    restored = run.ckpts.restore_latest(state, set_aside=False)   # the folder changes once it is accepted
    if restored is None:
        changed = changed_settings(saved_meta.get("config") or {}, checkpoint.config_to_json(run.cfg))
        raise ConfigError(f"--workdir {run.workdir}: {run.ckpts.directory} holds checkpoints {steps} but "
                          f"none can be restored into this model/config"
                          + (f" (changed since: {changed})" if changed else "")
                          + "; use a new --workdir, or the settings the run was started with")
    state, meta = restored
    if meta != saved_meta:   # an older checkpoint than the newest (unreadable): its own settings
        check_resume(run, meta)
    if run.teacher is not None:
        distill_lib.check_resumed_teacher(meta.get("distill") or {}, run.distill_meta, run.ckpts.directory)
        run.distill_meta = dict(meta.get("distill") or {}, **run.distill_meta)
    run.ckpts.set_aside_broken()
    step = int(jax.device_get(state["step"]))
    if meta.get("eval_pending") and run.val_ds is not None:
        run.pending_eval = step
    run.info(f"resumed from {run.ckpts.directory}/{step} (step {step} of {run.rl.total_steps}, "
             f"epoch {max(0, step - 1) // run.rl.steps_per_epoch + 1})")   # epochs from 1, as the log
    changed = changed_settings(meta.get("config") or {}, checkpoint.config_to_json(run.cfg))
    if changed:
        log.warning("the run continues with settings that differ from the checkpoint's (the schedule "
                    "and data follow the new values; use a new --workdir to start over): %s", changed)
    if step >= run.rl.last_step:
        log.warning("checkpoint %d is at or past the end of this schedule (step %d%s): nothing to "
                    "train; the run's pictures and summary are written again. More epochs "
                    "(--config.train.epochs) continue it; a new --workdir starts over",
                    step, run.rl.last_step, f", changed: {changed}" if changed else "")
    for s in steps:
        m = run.ckpts.metrics(s)
        if m and "AP" in m and m["AP"] >= run.best["AP"]:   # ties: the latest, as best_step()
            run.best = dict(m, step=s)
    return state


def describe(run: Run, state: dict, start: int) -> str:
    cfg, rl = run.cfg, run.rl
    counts = optim.count_decayed(optim.decay_mask(state["params"], state["batch_stats"]), state["params"])
    return (f"model {cfg.model.name}: {len(cfg.model.class_names)} classes, "
            f"{counts['decayed_elems'] + counts['plain_elems']:,} params ({counts['decayed_tensors']} "
            f"tensors with weight decay, {counts['plain_tensors']} without); {cfg.train.optimizer} base lr "
            f"{run.base_lr:.4g}; {len(run.train_ds)} train images, batch "
            f"{cfg.train.batch_size} on {run.replicated.mesh.devices.size} device(s); {rl.steps_per_epoch} "
            f"steps/epoch, {rl.total_steps} total, warmup {rl.warmup_steps}, no-aug from "
            f"{rl.no_aug_start_step}; "
            + (f"running steps {start}..{rl.last_step}; " if start < rl.last_step else
               f"no steps to run (checkpoint {start} >= the schedule's last step {rl.last_step}); ")
            + conv_grad.describe_grad_impl(cfg.model.grad_impl, str(cfg.model.dtype),
                                           conv3x3_impl=str(cfg.model.get("conv3x3_impl", "auto")))
            + "; "
            + f"{describe_bn_impl(str(cfg.model.get('bn_impl', 'auto')), str(cfg.model.dtype))}"
            + (f"; distilling from {cfg.distill.teacher or 'teacher'} ({run.teacher.source}), "
               f"{cfg.distill.method}, weight {cfg.distill.weight}->{cfg.distill.weight_end}, "
               f"grad clip {cfg.train.grad_clip}" if run.teacher is not None else ""))


def evaluate_or_report(run: Run, state: dict, step: int, epoch: int) -> dict | None:
    """EMA evaluation and best-AP bookkeeping. An evaluation that fails (no readable val image, an
    error in the evaluator) is reported in ONE line and gives None: the step's checkpoint is still
    written (without metrics), the best checkpoint stays the previous one, training goes on."""
    if os.environ.get(HANG_EVAL_ENV) == str(step):
        print(f"[test hook] hanging in the evaluation of step {step}", flush=True)
        while True:
            time.sleep(1.0)
    try:
        eval_metrics = evaluate_ema(run.model, state, run.val_ds, run.cfg, progress=run.progress)
    except Exception as err:  # noqa: BLE001 - evaluation must never cost the checkpoint
        reason = " ".join(str(err).split())[:400]
        run.last_eval = {"step": step, "error": f"{type(err).__name__}: {reason}"}
        run.tlog.write_eval_failure(step, epoch, run.last_eval["error"])
        run.info(f"eval step {step} (epoch {epoch + 1}) FAILED, checkpoint saved without metrics: "
                 f"{type(err).__name__}: {reason}")
        return None
    run.last_eval = dict(eval_metrics, step=step)
    run.tlog.write_eval(step, epoch, eval_metrics)
    if eval_metrics.get("AP", -1) >= run.best["AP"]:   # ties: the latest, as the manager's best
        run.best = dict(eval_metrics, step=step)
    skipped = int(eval_metrics.get("images_skipped", 0))
    run.info(f"eval step {step} (epoch {epoch + 1}): AP {eval_metrics.get('AP', float('nan')):.4f} "
             f"AP50 {eval_metrics.get('AP50', float('nan')):.4f} (best AP {run.best['AP']:.4f} "
             f"at step {run.best.get('step')})"
             + (f"; {int(eval_metrics.get('images_scored', 0))} images scored, {skipped} unreadable "
                f"skipped" if skipped else ""))
    return eval_metrics


def eval_due(run: Run, step: int) -> bool:
    """Whether the EMA model is evaluated once ``step`` updates are done: at the end of an epoch
    that :func:`should_eval` picks, and after the last step (when there is a val split)."""
    rl = run.rl
    end_of_epoch = step % rl.steps_per_epoch == 0
    return run.val_ds is not None and (
        (end_of_epoch and should_eval(run.cfg, (step - 1) // rl.steps_per_epoch, rl))
        or step == rl.last_step)


def save_on_interrupt(run: Run, state: dict, done: int) -> None:
    """Ctrl-C / SIGTERM: keep the work done since the last checkpoint. ``state`` is saved at its
    step — ``done`` (the checked updates) or one more when the interrupt came while the update's
    results were fetched (the jitted update discards a non-finite step itself) — unless that step
    is saved already. When its evaluation was due and did not finish, the checkpoint says so
    (``meta["eval_pending"]``) and the rerun evaluates it first. Single-process runs only: the
    processes of a multi-process run may stand at different steps, so there the latest checkpoint
    stands. A second interrupt during the write stops at once (the write is then incomplete and
    removed by the rerun)."""
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    if jax.process_count() > 1 or any(x.is_deleted() for x in leaves):
        return                          # interrupted inside the donated update: nothing to save
    step = int(jax.device_get(state["step"]))
    if step not in (done, done + 1) or step <= (run.ckpts.latest_step() or 0):
        return
    evaluated = (run.last_eval if run.last_eval.get("step") == step and "error" not in run.last_eval
                 else {})                   # interrupted after the evaluation, before the save
    metrics = {k: v for k, v in evaluated.items() if k != "step"} or None
    meta = _meta(run, step, metrics)
    if metrics is None and eval_due(run, step):
        meta["eval_pending"] = True
    run.info(f"interrupted: saving step {step} first (interrupt again to stop without it)")
    run.ckpts.save(step, state, meta, metrics=metrics)
    run.ckpts.wait()


def run_pending_eval(run: Run, state: dict, step: int) -> None:
    """The evaluation an interrupt cut off (:func:`save_on_interrupt`), run on resume; its metrics
    replace the checkpoint's (best-by-AP retention needs them)."""
    run.info(f"evaluating step {step} first: its evaluation was interrupted")
    metrics = evaluate_or_report(run, state, step, (step - 1) // run.rl.steps_per_epoch)
    if metrics is not None:
        run.ckpts.replace(step, state, _meta(run, step, metrics), metrics=metrics)
    run.pending_eval = None


def after_step(run: Run, state: dict, step: int, metrics: dict) -> None:
    """Logging, evaluation (EMA) and checkpointing once ``step`` updates are done."""
    cfg, rl = run.cfg, run.rl
    epoch = (step - 1) // rl.steps_per_epoch
    run.tlog.step(step, metrics, images=int(cfg.train.batch_size))
    final = step == rl.last_step
    if step % int(cfg.train.log_every_steps) == 0 or final:
        run.tlog.write_train(step, epoch, {k: v for k, v in metrics.items() if k != "finite"})
    end_of_epoch = step % rl.steps_per_epoch == 0
    due = eval_due(run, step)
    every = int(cfg.train.ckpt_every_steps)
    if final or due or (end_of_epoch if every <= 0 else step % every == 0):
        # the checkpoint before its evaluation (written while it runs), marked as not evaluated:
        # a hard kill during the evaluation (out of memory, a scheduler's SIGKILL) cost the
        # epoch's training; now it costs the evaluation, which the rerun runs first
        meta = _meta(run, step)
        if due:
            meta["eval_pending"] = True
        run.ckpts.save(step, state, meta)
        if due:
            eval_metrics = evaluate_or_report(run, state, step, epoch)
            run.ckpts.replace(step, state, _meta(run, step, eval_metrics), metrics=eval_metrics)
        run.tlog.reset_timer()


def train(cfg, workdir, *, progress: bool = True) -> dict:
    """Run (or resume) training in ``workdir``; returns a summary dict. Multi-process: an error in
    one process ends it at once (``distributed.exit_on_error``) so the others stop too.

    ``cfg``: a ConfigDict, or a config name / path (:func:`damo_jax.config.load_config`). It is
    checked (:func:`~damo_jax.config.validate_config`, :func:`~damo_jax.config.validate_recipe`:
    a ``ConfigError`` naming the key) before anything is written to ``workdir``."""
    from damo_jax.config import load_config, validate_config, validate_recipe
    from damo_jax.errors import refuse_url
    refuse_url(workdir, "workdir")
    if isinstance(cfg, (str, os.PathLike)):
        cfg = load_config(cfg)
    validate_recipe(validate_config(cfg))
    return distributed.exit_on_error(_train, cfg, workdir, progress=progress,
                                     passthrough=(NonFiniteError, distributed.SettingsMismatchError))


def _train(cfg, workdir, *, progress: bool = True) -> dict:
    """One writer per workdir: process 0 holds ``checkpoint.workdir_lock`` for the whole run.
    Multi-process: first, every process must have the same config (one error line in each if not)."""
    from damo_jax.config import flat_items
    distributed.check_same_settings(dict(flat_items(cfg)), workdir=workdir)
    lock = checkpoint.workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train_in(cfg, workdir, progress=progress)


def _train_in(cfg, workdir, *, progress: bool = True) -> dict:
    run, state = setup(cfg, workdir, progress=progress)
    state = resume_or_start(run, state)
    start = int(jax.device_get(state["step"]))
    run.tlog = TrainLog(run.workdir, total_steps=run.rl.last_step, start_step=start, primary=run.primary,
                        progress=progress)
    run.info(describe(run, state, start))
    note = oversized_batch_note(int(cfg.train.batch_size), len(run.train_ds))
    if note:
        log.warning(note)
    for ds, role in ((run.train_ds, "train data"), (run.val_ds, "val data")):
        if ds is not None:
            run.info(format_summary(ds, role))      # images, skips, boxes dropped/clipped by reason
    if run.teacher is not None and start == 0:
        check_teacher(run)
    update = build_update(run)
    loader = make_loader(run.train_ds, cfg, run.rl, start) if start < run.rl.last_step else None
    done = start                                 # checked updates held by `state`
    try:
        t0 = time.perf_counter()
        check_interrupted()                      # one swallowed while the run was set up
        if run.pending_eval is not None:
            run_pending_eval(run, state, run.pending_eval)
        for step in range(start, run.rl.last_step):
            batch = next(loader)
            if step == start and jax.process_count() > 1:
                run.info(check_process_slices(loader, batch, step))
            state = _test_hooks(state, step)
            sharded = shard_batch(batch, run.data_sharding)
            if step == start:
                update = compile_first(update, state, sharded, run)
            state, metrics = update(state, sharded)
            metrics = jax.device_get(metrics)
            check_finite(metrics, step)          # before anything of this step is logged or saved
            done = step + 1
            if step == start:
                run.info(f"first step (compile + run) {time.perf_counter() - t0:.1f}s")
                run.tlog.reset_timer()
            after_step(run, state, step + 1, metrics)
            check_interrupted()                  # an interrupt swallowed during the step
    except KeyboardInterrupt:                    # Ctrl-C / SIGTERM (Interrupted): keep the steps
        save_on_interrupt(run, state, done)
        raise
    finally:
        if loader is not None:
            loader.close()
        run.ckpts.close()
        run.tlog.close()
    return finish(run, state, skipped=int(loader.stats["skipped_samples"]) if loader is not None else 0)


def check_teacher(run: Run) -> None:
    """Evaluate the teacher once on the val split, log its AP, stop if it is ~0 (not allowed weak)."""
    t0 = time.perf_counter()
    stats = distill_lib.evaluate_teacher(run.teacher, run.val_ds, progress=run.progress)
    if stats is None:
        run.info(f"teacher not evaluated: {run.teacher.note or 'no validation split'}")
        return
    run.distill_meta["teacher_eval"] = stats
    run.info(f"teacher val AP {stats['AP']:.4f} AP50 {stats['AP50']:.4f} "
             f"({time.perf_counter() - t0:.1f}s)")
    distill_lib.check_teacher_ap(run.cfg, stats["AP"])


def finish(run: Run, state: dict, skipped: int = 0) -> dict:
    """curves.png, predictions.png and the summary line; ``skipped``: training samples this
    process replaced because their image could not be read."""
    best = run.best if run.best["AP"] >= 0 else None
    summary = {"workdir": str(run.workdir), "step": int(jax.device_get(state["step"])), "best": best,
               "last_eval": run.last_eval, "skipped_samples": skipped,
               "checkpoint": str(run.ckpts.directory / str(run.ckpts.best_step() or run.ckpts.latest_step()))}
    if not run.primary:
        return summary
    summary["curves"] = str(plot_curves(run.workdir / "metrics.jsonl", run.workdir / "curves.png"))
    if run.val_ds is not None:
        try:
            from damo_jax.train.log import write_predictions_png
            summary["predictions"] = str(write_predictions_png(
                run.model, _host_variables(state), run.val_ds, run.cfg, run.workdir / "predictions.png"))
        except Exception as err:  # noqa: BLE001 - the picture must never fail the run
            run.info(f"predictions.png not written: {err}")
    failed = bool(run.last_eval and "error" in run.last_eval)
    run.info(f"done: {summary['step']} steps; best AP {best['AP']:.4f} / AP50 "
             f"{best.get('AP50', float('nan')):.4f} at step {best['step']}" if best
             else f"done: {summary['step']} steps (no evaluation"
             + (" succeeded: see the failed one above)" if failed else ")"))
    if skipped:
        run.info(f"{skipped} training samples had an unreadable image and were replaced by the next "
                 f"readable one (the warnings above name the files)")
    best_step, last_step = run.ckpts.best_step(), run.ckpts.latest_step()
    which = ("best AP" if best_step is not None else "last") + (
        f"; last: {last_step}" if best_step is not None and best_step != last_step else "")
    run.info(f"checkpoint ({which}): {summary['checkpoint']}  curves: {summary['curves']}"
             + (f"  predictions: {summary['predictions']}" if "predictions" in summary else ""))
    run_dir = shlex.quote(str(run.workdir))              # a folder with spaces pastes as one
    run.info(f"next: damo-jax eval --checkpoint {run_dir} | damo-jax predict --checkpoint "
             f"{run_dir} --source IMAGES | damo-jax export onnx --checkpoint {run_dir} "
             f"--output model.onnx (they load the "
             + ("best-AP" if best_step is not None else "latest") + " checkpoint)")
    return summary


def main(argv=None) -> int:
    """``python -m damo_jax.train``: alias of ``damo-jax train`` (:mod:`damo_jax.cli.train`);
    ``run(cfg, workdir)``-style entry: :func:`train`."""
    from damo_jax.cli.train import main as train_main
    return train_main(argv, prog="python -m damo_jax.train")


if __name__ == "__main__":
    sys.exit(main())
