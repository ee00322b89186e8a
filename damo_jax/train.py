"""The main job: ``python -m damo_jax.train --config s [--data SPEC] [--workdir DIR] [--runlocal]
[--config.train.epochs=3 ...]``.

Sections (big_vision style, read top to bottom):

0. CLI: config by name or path, ``--config.<key>=value`` overrides, ``--help`` lists every key.
1. Devices: optional ``jax.distributed.initialize()``, a 1-D ``Mesh`` over all devices ("data").
2. Data: train / val datasets, run lengths (steps per epoch, warmup, no-aug tail, total).
3. State: model init, optional fine-tuning weights, optimizer, EMA copy — one plain dict pytree
   ``{params, batch_stats, opt_state, ema_params, ema_batch_stats, step, rng}``, replicated.
4. ``update_fn(state, batch) -> (state, metrics)``: forward (train mode), AlignOTA on stop-gradient
   predictions, targets, loss, grads, optimizer, EMA, step += 1, non-finite guard. ONE ``jax.jit``
   with ``donate_argnums=0``; the batch is sharded on "data", so BN statistics and the loss
   normalisers are over the global batch.
5. Loop: auto-resume, log, evaluate (EMA) every N epochs, checkpoint (last k + best AP), and at the
   end ``curves.png``, ``predictions.png`` and a summary line.

Exit codes: 0 done, 3 non-finite loss/gradients (the run stops before a checkpoint of the bad step).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from damo_jax import checkpoint, optim
from damo_jax.config import apply_overrides, flat_items, load_config, runlocal
from damo_jax.train_log import TrainLog, plot_curves

log = logging.getLogger("damo_jax.train")
EXIT_NONFINITE = 3
# Test hooks (host side only, so the compiled step is the same program with and without them):
# NAN: before the update of this global step, the parameters are multiplied by NaN (a corrupted
#      state, as a diverging run produces); HANG: before this step the process prints a line and
#      sleeps, so a test can ``kill -9`` it at a known point.
NAN_STEP_ENV = "DAMO_JAX_TEST_NAN_STEP"
HANG_STEP_ENV = "DAMO_JAX_TEST_HANG_AT_STEP"


def _test_hooks(state: dict, step: int) -> dict:
    if os.environ.get(HANG_STEP_ENV) == str(step):
        print(f"[test hook] hanging before step {step}", flush=True)
        while True:
            time.sleep(1.0)
    if os.environ.get(NAN_STEP_ENV) == str(step):
        print(f"[test hook] injecting NaN parameters before step {step}", flush=True)
        state = dict(state, params=jax.jit(lambda p: jax.tree.map(lambda x: x * jnp.nan, p))(state["params"]))
    return state


class NonFiniteError(RuntimeError):
    """The loss or the gradients of a step were NaN/Inf; the state of that step was discarded."""


# ==================================================================================================
# 0. CLI
# ==================================================================================================
def _base_parser(add_help: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m damo_jax.train", add_help=add_help,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a DAMO-YOLO model (official recipe of SPEC §9.1) on 1..N devices.")
    p.add_argument("--config", default="s", help="config name (t s m l ns nm nl n demo) or .py path")
    p.add_argument("--data", default=None, help="training data spec: demo | coco:/path | yolo:/data.yaml"
                   " | voc:/path | tfds:coco/2017 (sets config.data.train)")
    p.add_argument("--workdir", default=None, help="run folder (checkpoints, logs); default runs/<config>")
    p.add_argument("--runlocal", action="store_true", help="shrink the run for a quick CPU check")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() (also automatic when JAX_COORDINATOR_ADDRESS is set)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")
    return p


def parse_args(argv=None):
    """(config, args). Unknown ``--config.a.b=v`` arguments are config overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = _base_parser(add_help=False).parse_known_args(argv)
    cfg = load_config(pre.config)
    keys = "\n".join(f"  --config.{k}={v!r}" for k, v in flat_items(cfg))
    parser = _base_parser(add_help=True)
    parser.epilog = f"overridable config keys of --config {pre.config} (with their defaults):\n{keys}"
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.runlocal:
        runlocal(cfg)
    apply_overrides(cfg, extra)
    if args.data:
        cfg.data.train = args.data
    if args.workdir is None:
        args.workdir = str(Path("runs") / Path(str(args.config)).stem)
    return cfg, args


# ==================================================================================================
# 1. Devices
# ==================================================================================================
def maybe_init_distributed(multihost: bool) -> None:
    if multihost or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def enable_compile_cache() -> None:
    """Persistent XLA cache (restarts and resumes skip compilation); env JAX_COMPILATION_CACHE_DIR wins."""
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = Path(os.environ.get("DAMO_JAX_CACHE", Path.home() / ".cache" / "damo_jax")) / "xla"
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


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
    return RunLength(spe, total, int(tc.warmup_epochs) * spe, total - int(tc.no_aug_epochs) * spe,
                     last, int(tc.epochs))


def open_datasets(cfg):
    """(train dataset, val dataset or None); also sets num_classes / class names from the data."""
    import data_pipelines
    train_ds = data_pipelines.open_dataset(cfg.data.train, cfg.data.train_split)
    if len(train_ds) == 0:
        raise ValueError(f"config data.train={cfg.data.train!r} split {cfg.data.train_split!r} is empty")
    val_ds = None
    val_spec = cfg.data.val or cfg.data.train
    if val_spec and cfg.data.val_split:
        try:
            val_ds = data_pipelines.open_dataset(val_spec, cfg.data.val_split)
        except (FileNotFoundError, KeyError, ValueError) as err:
            log.warning("no validation data (%s split %s): %s — evaluation skipped",
                        val_spec, cfg.data.val_split, err)
    names = tuple(train_ds.class_names)
    cfg.model.head["num_classes"] = len(names)
    cfg.model.class_names = names
    return train_ds, val_ds


def make_loader(train_ds, cfg, rl: RunLength, start_step: int):
    import data_pipelines
    return data_pipelines.TrainLoader(
        train_ds, cfg.data, batch_size=int(cfg.train.batch_size), seed=int(cfg.train.seed),
        steps_per_epoch=rl.steps_per_epoch, total_steps=rl.total_steps,
        no_aug_start_step=rl.no_aug_start_step, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())


DEVICE_BATCH_KEYS = ("images", "gt_boxes", "gt_labels", "gt_valid")


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Process-local numpy batch -> global arrays sharded on "data"."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
            for k in DEVICE_BATCH_KEYS}


# ==================================================================================================
# 3. State
# ==================================================================================================
def init_state(model, tx_fn, cfg, key, replicated: NamedSharding) -> dict:
    """Fresh train state, created directly on the devices (no device_put aliasing, TOOLCHAIN §3)."""
    h, w = (int(s) for s in cfg.data.image_size)

    def init(key):
        init_key, state_key = jax.random.split(key)
        variables = model.init(init_key, jnp.zeros((1, h, w, 3), jnp.float32), train=False)
        params, stats = variables["params"], variables.get("batch_stats", {})
        return {"params": params, "batch_stats": stats, "opt_state": tx_fn(params, stats).init(params),
                "ema_params": jax.tree.map(jnp.copy, params), "ema_batch_stats": jax.tree.map(jnp.copy, stats),
                "step": jnp.zeros((), jnp.int32), "rng": state_key}

    return jax.jit(init, out_shardings=replicated)(key)


def apply_finetune(state: dict, cfg, tx, replicated, info) -> dict:
    """Load official / npz weights (``train.finetune``) into params + batch_stats (and EMA)."""
    from damo_jax import convert
    subset, report = convert.load_pretrained(cfg.train.finetune, cfg, skip_head_if_mismatch=True)
    info(f"fine-tuning from {cfg.train.finetune}: {report}" if not isinstance(report, dict) else
         "fine-tuning from {}: loaded {} tensors, skipped {} ({})".format(
             cfg.train.finetune, len(report.get("loaded", ())), len(report.get("skipped", ())),
             ", ".join(map(str, report.get("skipped", ())))[:500] or "none"))

    def merge(fresh, loaded):
        if isinstance(fresh, dict):
            return {k: merge(v, loaded.get(k)) if isinstance(loaded, dict) else v for k, v in fresh.items()}
        if loaded is None:
            return fresh
        if tuple(np.shape(loaded)) != tuple(fresh.shape):
            raise ValueError(f"finetune weights: shape {np.shape(loaded)} vs model {fresh.shape}")
        return jnp.asarray(loaded, fresh.dtype)

    params = merge(jax.device_get(state["params"]), subset.get("params", {}))
    stats = merge(jax.device_get(state["batch_stats"]), subset.get("batch_stats", {}))
    new = dict(state, params=params, batch_stats=stats, opt_state=tx.init(params),
               ema_params=params, ema_batch_stats=stats)
    return jax.device_put(jax.tree.map(np.array, new), replicated)


# ==================================================================================================
# 4. Update step
# ==================================================================================================
def make_update_fn(model, tx, lr_fn, cfg):
    """``update_fn(state, batch) -> (new_state, metrics)``; pure, to be jitted with donation."""
    from damo_jax.assign import align_ota, build_targets
    from damo_jax.losses import detection_loss

    num_classes = int(cfg.model.head.num_classes)
    reg_max = int(cfg.model.head.reg_max)
    tc = cfg.train

    def loss_fn(params, batch_stats, batch, rng):
        images = batch["images"].astype(jnp.float32)
        out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": rng})
        assignment = align_ota(
            jax.lax.stop_gradient(out["scores"]), out["priors"], jax.lax.stop_gradient(out["boxes"]),
            batch["gt_boxes"], batch["gt_labels"], batch["gt_valid"])
        targets = build_targets(assignment, out["priors"], batch["gt_boxes"], batch["gt_labels"],
                                num_classes=num_classes, reg_max=reg_max)
        total, metrics = detection_loss(out, targets, reg_max=reg_max)
        return total, (metrics, mutated["batch_stats"])

    def update_fn(state, batch):
        step = state["step"]
        rng, step_rng = jax.random.split(state["rng"])
        (total, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], batch, step_rng)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
        if tc.ema:
            ema_params = optim.ema_update(state["ema_params"], params, step, tc.ema_decay, tc.ema_tau)
            ema_stats = optim.ema_update(state["ema_batch_stats"], new_stats, step, tc.ema_decay, tc.ema_tau)
        else:
            ema_params, ema_stats = params, new_stats
        new_state = {"params": params, "batch_stats": new_stats, "opt_state": opt_state,
                     "ema_params": ema_params, "ema_batch_stats": ema_stats, "step": step + 1, "rng": rng}
        grad_norm = optim.optax.global_norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        metrics.update(total_loss=total, lr=lr_fn(step), grad_norm=grad_norm, finite=finite)
        return new_state, metrics

    return update_fn


def check_finite(metrics: dict, step: int) -> None:
    """Raise NonFiniteError naming the step and the non-finite terms."""
    if bool(metrics["finite"]):
        return
    terms = [k for k in ("loss_cls", "loss_bbox", "loss_dfl", "total_loss", "grad_norm")
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


def _meta(cfg, train_ds, step: int, rl: RunLength, metrics=None) -> dict:
    return {"config": checkpoint.config_to_json(cfg), "class_names": list(cfg.model.class_names),
            "category_ids": [int(c) for c in getattr(train_ds, "category_ids", ())],
            "loader": {"step": int(step), "seed": int(cfg.train.seed)}, "step": int(step),
            "epoch": int(step // rl.steps_per_epoch), "eval": metrics or {}}


def evaluate_ema(model, state, val_ds, cfg) -> dict:
    from damo_jax.eval import evaluate
    stats = evaluate(model, _host_variables(state, ema=True), val_ds, cfg)
    return {k: float(v) for k, v in stats.items()}


def train(cfg, workdir, *, progress: bool = True) -> dict:
    """Run (or resume) training in ``workdir``; returns a summary dict."""
    from damo_jax.models import build_model

    workdir = Path(workdir).absolute()
    primary = jax.process_index() == 0
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))
    n_dev = mesh.devices.size
    if int(cfg.train.batch_size) % n_dev:
        raise ValueError(f"config train.batch_size={cfg.train.batch_size} is not divisible by the "
                         f"{n_dev} devices")

    train_ds, val_ds = open_datasets(cfg)
    rl = run_length(cfg, len(train_ds))
    lr_fn, lr_consts = optim.schedule_from_config(cfg.train, steps_per_epoch=rl.steps_per_epoch,
                                                  global_batch=int(cfg.train.batch_size))
    model = build_model(cfg)

    def tx_fn(params, stats):
        return optim.make_optimizer(cfg.train, lr_fn, optim.decay_mask(params, stats))

    state = init_state(model, tx_fn, cfg, jax.random.PRNGKey(int(cfg.train.seed)), replicated)
    tx = tx_fn(state["params"], state["batch_stats"])
    ckpts = checkpoint.Checkpoints(workdir / checkpoint.CKPT_SUBDIR, keep=int(cfg.train.keep_checkpoints))
    def info(msg):
        log.info(msg)
        if primary:
            print(msg, file=sys.stderr, flush=True)

    restored = ckpts.restore_latest(state) if ckpts.steps() else None
    if ckpts.steps() and restored is None:
        raise RuntimeError(f"{ckpts.directory} holds checkpoints {ckpts.steps()} but none can be "
                           f"restored into this model/config; use a new --workdir")
    if restored is not None:
        state, meta = restored
        info(f"resumed from {ckpts.directory}/{int(state['step'])} (epoch {meta.get('epoch')})")
    elif cfg.train.finetune:
        state = apply_finetune(state, cfg, tx, replicated, info)
    start = int(jax.device_get(state["step"]))
    tlog = TrainLog(workdir, total_steps=rl.last_step, start_step=start, primary=primary, progress=progress)
    info = tlog.info

    counts = optim.count_decayed(optim.decay_mask(state["params"], state["batch_stats"]), state["params"])
    info(f"model {cfg.model.name}: {len(cfg.model.class_names)} classes, "
         f"{counts['decayed_elems'] + counts['plain_elems']:,} params ({counts['decayed_tensors']} tensors "
         f"with weight decay, {counts['plain_tensors']} without); {cfg.train.optimizer} "
         f"base lr {lr_consts['base_lr']:.4g}; {len(train_ds)} train images, batch {cfg.train.batch_size} "
         f"on {n_dev} device(s); {rl.steps_per_epoch} steps/epoch, {rl.total_steps} total, warmup "
         f"{rl.warmup_steps}, no-aug from {rl.no_aug_start_step}; running steps {start}..{rl.last_step}")

    update = jax.jit(make_update_fn(model, tx, lr_fn, cfg), in_shardings=(replicated, data_sharding),
                     out_shardings=(replicated, replicated), donate_argnums=0)
    best = {"AP": -1.0}
    for s in ckpts.steps():
        m = ckpts.metrics(s)
        if m and m.get("AP", -1) > best["AP"]:
            best = dict(m, step=s)
    last_eval: dict = {}
    step = start
    try:
        loader = make_loader(train_ds, cfg, rl, start) if start < rl.last_step else None
        t_compile = time.perf_counter()
        while step < rl.last_step:
            batch = next(loader)
            state = _test_hooks(state, step)
            state, metrics = update(state, shard_batch(batch, data_sharding))
            metrics = jax.device_get(metrics)
            check_finite(metrics, step)
            step += 1
            if step == start + 1:
                info(f"first step (compile + run) {time.perf_counter() - t_compile:.1f}s")
                tlog.reset_timer()
            tlog.step(step, metrics, images=int(cfg.train.batch_size))
            epoch = (step - 1) // rl.steps_per_epoch
            if step % int(cfg.train.log_every_steps) == 0 or step == rl.last_step:
                tlog.write_train(step, epoch, {k: v for k, v in metrics.items() if k != "finite"})
            end_of_epoch = step % rl.steps_per_epoch == 0
            final = step == rl.last_step
            eval_metrics = None
            if val_ds is not None and ((end_of_epoch and should_eval(cfg, epoch, rl)) or final):
                eval_metrics = evaluate_ema(model, state, val_ds, cfg)
                last_eval = dict(eval_metrics, step=step)
                tlog.write_eval(step, epoch, eval_metrics)
                if eval_metrics.get("AP", -1) > best["AP"]:
                    best = dict(eval_metrics, step=step)
                info(f"eval step {step} (epoch {epoch + 1}): AP {eval_metrics.get('AP', float('nan')):.4f} "
                     f"AP50 {eval_metrics.get('AP50', float('nan')):.4f} (best AP {best['AP']:.4f} "
                     f"at step {best.get('step')})")
            every = int(cfg.train.ckpt_every_steps)
            if final or (end_of_epoch if every <= 0 else step % every == 0) or eval_metrics:
                ckpts.save(step, state, _meta(cfg, train_ds, step, rl, eval_metrics), metrics=eval_metrics)
                tlog.reset_timer()
    except NonFiniteError as err:
        ckpts.close()
        tlog.close()
        raise err
    finally:
        if "loader" in locals() and loader is not None and hasattr(loader, "close"):
            loader.close()
    ckpts.close()
    tlog.close()
    return finish(cfg, workdir, model, state, val_ds, ckpts, best, last_eval, primary, info)


def finish(cfg, workdir, model, state, val_ds, ckpts, best, last_eval, primary, info) -> dict:
    """curves.png, predictions.png and the summary line."""
    summary = {"workdir": str(workdir), "step": int(jax.device_get(state["step"])),
               "best": best if best["AP"] >= 0 else None, "last_eval": last_eval,
               "checkpoint": str(ckpts.directory / str(ckpts.best_step() or ckpts.latest_step()))}
    if primary:
        summary["curves"] = str(plot_curves(workdir / "metrics.jsonl", workdir / "curves.png"))
        if val_ds is not None:
            try:
                from damo_jax.train_log import write_predictions_png
                summary["predictions"] = str(write_predictions_png(
                    model, _host_variables(state), val_ds, cfg, workdir / "predictions.png"))
            except Exception as err:  # noqa: BLE001 - the picture must never fail the run
                info(f"predictions.png not written: {err}")
        b = summary["best"]
        info(f"done: {summary['step']} steps; best AP {b['AP']:.4f} / AP50 {b.get('AP50', float('nan')):.4f} "
             f"at step {b['step']}" if b else f"done: {summary['step']} steps (no evaluation)")
        info(f"checkpoint: {summary['checkpoint']}  curves: {summary['curves']}"
             + (f"  predictions: {summary['predictions']}" if "predictions" in summary else ""))
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)
    cfg, args = parse_args(argv)
    maybe_init_distributed(args.multihost)
    enable_compile_cache()
    try:
        train(cfg, args.workdir, progress=not args.no_progress)
    except NonFiniteError as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    return 0


if __name__ == "__main__":
    sys.exit(main())
