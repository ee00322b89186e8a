"""End-to-end runs of ``python -m damo_jax.train`` on a tiny synthetic COCO set (the small
Ns-shaped test network of train_setup.py, 64×64, 16 images, batch 4, 2 epochs of 4 steps, evaluation after each epoch), in subprocesses with 4 fake
CPU devices (data parallel: one image per device):

* the outputs a user expects (metrics.jsonl, TensorBoard, curves.png, predictions.png, checkpoints,
  the summary line), evaluation on the val split;
* data parallelism: one update step on 4 devices equals the same step on 1 device (the 4-device
  program is run A's, from this module's XLA cache: kept in this file so that it always shares
  the pytest worker, and so the cache, of run A);
* EXACT resume: killed with SIGKILL at step 6, resumed from the step-4 checkpoint, then killed
  (``os._exit``) while Orbax writes the step-8 checkpoint (only a tmp folder remains), resumed again
  → the final state (params, batch_stats, EMA, optimizer state, step, rng) is BITWISE equal to the
  uninterrupted run;
* NaN: non-finite loss stops the run with exit code 3 and a message naming the step and the loss
  terms, and no checkpoint of that step (or later) exists.

* bad validation data: one unreadable val image is skipped, named and counted (the checkpoint
  carries the metrics of the other images); no readable val image makes evaluation raise, which
  is reported in one line and still leaves the epoch's checkpoint (1 epoch each, ``max_steps=4``);
* LEARNING: the small Ns-shaped test network (``train_setup.TINY_MODEL_LINES``) overfits 8 images
  (1 device, no augmentation, 120 steps) to AP50 >= 0.8 on those images (measured 2026-12-02:
  AP50 1.0, AP 0.92 after 120 steps, loss 1.18 -> 0.28; the full Ns reached AP50 0.065 / 0.76 /
  1.0 / 1.0 after 30 / 60 / 90 / 120 steps but compiles in twice the time).

All runs share one persistent XLA cache, so only the first one compiles the train step.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from damo_jax.train.checkpoint import Checkpoints
from train_setup import ROOT, learn_setup, run_train, shared_dir, train_cmd, train_env


@pytest.fixture(scope="module")
def run_a():
    workdir = shared_dir() / "run_a"
    r = run_train(workdir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return workdir, r


def _full_state(workdir, step=8):
    ck = Checkpoints(workdir / "checkpoints", read_only=True)
    items = ck.restore_items(step, items=("state", "ema"))
    return {"state": items["state"], "ema": items["ema"]}


def _assert_bitwise_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_run_writes_everything_a_user_expects(run_a):
    workdir, r = run_a
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x["step"] for x in records if x["kind"] == "train"]
    evals = [x for x in records if x["kind"] == "eval"]
    assert train_steps == list(range(1, 9))
    assert [e["step"] for e in evals] == [4, 8]
    for e in evals:
        assert set(("AP", "AP50", "AP75", "APs", "APm", "APl")) <= set(e)
        assert 0.0 <= e["AP50"] <= 1.0
    first = next(x for x in records if x["kind"] == "train")
    for key in ("total_loss", "loss_cls", "loss_bbox", "loss_dfl", "lr", "grad_norm"):
        assert np.isfinite(first[key]), key
    assert first["lr"] == 0.0                      # quadratic warmup starts at 0
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    for png in ("curves.png", "predictions.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert Checkpoints(workdir / "checkpoints", read_only=True).steps() == [4, 8]
    assert "batch 4 on 4 device(s)" in r.stderr
    assert "done: 8 steps; best AP" in r.stderr and "checkpoint (best AP" in r.stderr
    # EMA and raw model are both saved, and they differ
    state = _full_state(workdir)
    assert int(state["state"]["step"]) == 8
    k = jax.tree.leaves(state["state"]["params"])[0]
    k_ema = jax.tree.leaves(state["ema"]["params"])[0]
    assert k.shape == k_ema.shape and not np.array_equal(k, k_ema)


MULTIDEVICE_SCRIPT = r'''
import json, re, sys
from damo_jax import runtime
runtime.tune_cpu_runtime()                 # as the train CLI does (same XLA flags -> same cache keys)
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from damo_jax.train import optim
from damo_jax.train import loop as train
from damo_jax.config import load_config
from damo_jax.models import build_model

assert len(jax.devices()) == 4, jax.devices()
# the tiny CLI test config and what the CLI derives from its data (2 classes, 16 images, batch 4),
# so init and the 4-device step are the very programs of the CLI test runs (shared XLA cache)
cfg = load_config(sys.argv[1])
cfg.model.head["num_classes"] = 2
cfg.model.class_names = ("square", "disc")
rl = train.run_length(cfg, 16)
lr_fn, _ = optim.schedule_from_config(cfg.train, steps_per_epoch=rl.steps_per_epoch,
                                      global_batch=int(cfg.train.batch_size))
model = build_model(cfg)

rng = np.random.default_rng(0)
B, G = 4, int(cfg.data.max_boxes)
wh = rng.uniform(10, 40, size=(B, G, 2))
xy = rng.uniform(0, 1, size=(B, G, 2)) * (64 - wh)
valid = np.zeros((B, G), bool)
valid[0, :2], valid[1, :1], valid[2, :3] = True, True, True      # image 3 has no GT
batch = {"images": rng.integers(0, 256, size=(B, 64, 64, 3), dtype=np.uint8),
         "gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
         "gt_labels": rng.integers(0, 2, size=(B, G)).astype(np.int32), "gt_valid": valid}

def shardings(n):
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

state0 = jax.device_get(train.init_state(model, cfg, jax.random.PRNGKey(0), shardings(4)[0]))
state0["step"] = np.asarray(rl.warmup_steps, np.int32)     # end of warmup: lr = base lr
tx = train.make_tx(cfg, state0["params"], state0["batch_stats"])
runs, updates = {}, {}
for n in (4, 1):
    repl, dsh = shardings(n)
    updates[n] = jax.jit(train.make_update_fn(model, tx, lr_fn, cfg), in_shardings=(repl, dsh),
                         out_shardings=(repl, repl), donate_argnums=0)
    new, metrics = updates[n](jax.device_put(state0, repl), train.shard_batch(batch, dsh))
    assert len(new["step"].sharding.device_set) == n
    runs[n] = (jax.device_get(new), jax.device_get(metrics))

(n1, m1), (n4, m4) = runs[1], runs[4]
out = {"metrics": {k: [float(m1[k]), float(m4[k])] for k in
                   ("total_loss", "loss_cls", "loss_bbox", "loss_dfl", "grad_norm", "lr")},
       "finite": [bool(m1["finite"]), bool(m4["finite"])], "base_lr": float(lr_fn(rl.warmup_steps))}

def compare(a_new, a_old, b_new, b_old):
    """Worst per-tensor difference of the NEW values, max |a − b| / max(1, max |a|), and the global
    L2-relative difference of the UPDATES Δ = new − old (a gradient-level comparison that is not
    dominated by tensors whose true gradient is 0, e.g. a BN bias right before another BN)."""
    worst, num, den = (0.0, ""), 0.0, 0.0
    for (path, an), ao, bn, bo in zip(jax.tree_util.tree_leaves_with_path(a_new),
                                      *(jax.tree.leaves(t) for t in (a_old, b_new, b_old))):
        an, bn = np.asarray(an, np.float64), np.asarray(bn, np.float64)
        rel = float(np.abs(an - bn).max() / max(np.abs(an).max(), 1.0))
        worst = max(worst, (rel, jax.tree_util.keystr(path)))
        da, db = an - ao, bn - bo
        num, den = num + float(((da - db) ** 2).sum()), den + float((da ** 2).sum())
    return {"worst_new_rel": worst, "update_l2_rel": (num / max(den, 1e-300)) ** 0.5}

for name in ("params", "batch_stats", "ema_params", "ema_batch_stats"):
    out[name] = compare(n1[name], state0[name], n4[name], state0[name])
# SGD momentum buffers after one step = the (decayed) gradients: a direct gradient comparison
out["momentum"] = compare(n1["opt_state"], jax.tree.map(np.zeros_like, state0["opt_state"]),
                          n4["opt_state"], jax.tree.map(np.zeros_like, state0["opt_state"]))
out["params_moved"] = max(float(np.abs(np.asarray(x) - y).max()) for x, y in
                          zip(jax.tree.leaves(n1["params"]), jax.tree.leaves(state0["params"])))
out["steps"] = [int(n1["step"]), int(n4["step"])]

# the compiled 1-device step copies no donated conv kernel (params, momentum) before updating it
# in place (XLA:CPU did, ~2 copies per kernel, while the non-finite guard was a per-leaf select)
hlo = updates[1].lower(state0, train.shard_batch(batch, shardings(1)[1])).compile().as_text()
entry = hlo[hlo.index("\nENTRY"):]
kernels = set(re.findall(r"(%\S+) = f32\[\d+,\d+,\d+,\d+\]\{[\d,]+\} parameter\(", entry))
out["kernel_params"] = len(kernels)
out["kernel_copies"] = sum(m in kernels for m in re.findall(r" copy\((%[^)]+)\)", entry))

# non-finite guard on 4 devices (same compiled step): NaN parameters -> finite False, state unchanged
repl, dsh = shardings(4)
bad_host = dict(n4, params=jax.tree.map(lambda x: x * np.nan, n4["params"]))
kept, m = updates[4](jax.device_put(bad_host, repl), train.shard_batch(batch, dsh))
kept = jax.device_get(kept)
out["nan_finite_flag"] = bool(m["finite"])
out["nan_state_kept"] = all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in
                            zip(jax.tree.leaves(kept), jax.tree.leaves(bad_host)))
print("RESULT " + json.dumps(out))
'''


def test_one_step_on_4_devices_equals_1_device(run_a):
    """Data parallelism: one update step on 4 (fake CPU) devices equals the same step on 1 device.

    A subprocess (``--xla_force_host_platform_device_count`` must be set before JAX initialises)
    runs the update step of the tiny CLI config — on 4 devices the very program of ``run_a``, loaded
    from this module's XLA cache (``run_a`` is requested so that it has run) — and on 1 device,
    from a fresh state at the end of warmup (lr = base lr), on the same global batch of 4 images.
    SGD, so float noise is not amplified the way Adam's first step amplifies it (TOOLCHAIN §3).

    Compared: loss terms and grad norm (≤ 1e-5 relative); per tensor, the new parameters, BN
    running statistics, EMA and SGD momentum buffers (= the decayed gradients): max |Δ| ≤ 1e-5 ·
    max(1, max |value|); and, as whole vectors (L2-relative ≤ 5e-5), the gradients (momentum
    buffers) and the BN statistics updates (tensors whose true gradient is exactly 0, like a BN bias
    feeding another BN, get float-noise gradients of ~1e-12 that differ between reductions, so a
    per-tensor relative test of gradients is meaningless for them). Also the non-finite guard on 4
    devices: NaN parameters → ``finite`` False and the returned state is the input state. And the
    compiled 1-device step copies no donated conv kernel before updating it in place (the guard
    once made XLA:CPU copy every kernel and momentum buffer; docs/bench_train.md §0p)."""
    env = train_env()                       # 4 CPU devices, the XLA cache of the CLI test runs
    r = subprocess.run([sys.executable, "-c", MULTIDEVICE_SCRIPT, str(shared_dir() / "tiny.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res["finite"] == [True, True] and res["steps"] == [5, 5]
    for key, (one, four) in res["metrics"].items():
        assert abs(one - four) <= 1e-5 * max(abs(one), 1e-6), (key, one, four)
    assert res["metrics"]["lr"][0] == res["base_lr"] > 0
    assert res["params_moved"] > 1e-7                       # the step really changed the weights
    print("multi-device comparison:", json.dumps(res))
    for name in ("params", "batch_stats", "ema_params", "ema_batch_stats", "momentum"):
        assert res[name]["worst_new_rel"][0] <= 1e-5, (name, res[name])
    # gradient-level: the momentum buffers ARE the (decayed) gradients, the BN statistics moved by
    # 3% of the batch moments (the parameters' own new − old is dominated by float32 rounding of
    # ~1e-6 updates on O(0.1) weights, so it is not compared as a vector)
    for name in ("momentum", "batch_stats"):
        assert res[name]["update_l2_rel"] <= 5e-5, (name, res[name])
    assert res["nan_finite_flag"] is False and res["nan_state_kept"], res
    assert res["kernel_params"] > 0 and res["kernel_copies"] == 0, res


def _wait_for_line(proc, needle, timeout):
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return
    proc.kill()
    raise AssertionError(f"{needle!r} not seen; output tail:\n{''.join(seen[-40:])}")


def test_kill9_then_kill_during_save_then_resume_is_bitwise_exact(run_a):
    """kill -9 at step 6 (checkpoint 4 exists) → resume → the process dies while the step-8
    checkpoint is being written (only Orbax's tmp folder remains, never listed) → resume from 4
    again → the final state equals the uninterrupted run bit for bit."""
    workdir_a, _ = run_a
    workdir = shared_dir() / "run_killed"
    ckdir = workdir / "checkpoints"
    proc = subprocess.Popen(train_cmd(workdir), cwd=ROOT, env=train_env(DAMO_JAX_TEST_HANG_AT_STEP="6"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_line(proc, "[test hook] hanging before step 6", timeout=600)
    deadline = time.time() + 120              # the async save of step 4 finishes in the background
    while not (ckdir / "4").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert Checkpoints(ckdir, read_only=True).steps() == [4]

    r = run_train(workdir, DAMO_JAX_TEST_EXIT_DURING_SAVE="8")
    assert r.returncode == 17, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "/checkpoints/4" in r.stderr
    assert not (ckdir / "8").exists()
    assert list(ckdir.glob("8.orbax-checkpoint-tmp*")), sorted(p.name for p in ckdir.iterdir())
    assert Checkpoints(ckdir, read_only=True).steps() == [4]

    r = run_train(workdir)
    assert r.returncode == 0, r.stderr[-5000:]
    assert "/checkpoints/4" in r.stderr
    assert "checkpoint 8 of " in r.stderr and "incomplete, removed" in r.stderr   # named, not silent
    assert "differ from the checkpoint's" not in r.stderr          # the same command: no warning
    assert not list(ckdir.glob("*.orbax-checkpoint-tmp*"))     # cleaned up by the next save
    _assert_bitwise_equal(_full_state(workdir), _full_state(workdir_a))
    # each resume dropped the records of the steps it redid: the raw file has every step once
    import json
    raw = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in raw if x["kind"] == "train"] == list(range(1, 9)), raw
    assert "resumed from" in r.stderr and "(step 4 of " in r.stderr and ", epoch " in r.stderr


@pytest.mark.parametrize("sig, hang_at", [(signal.SIGINT, "6"), (signal.SIGTERM, "2")])
def test_ctrl_c_or_sigterm_stops_cleanly_and_says_how_to_resume(sig, hang_at, run_a):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM during training: the last finished step is saved
    first (it was lost: up to an epoch per preemption), no traceback, one line naming the
    checkpoint the same command resumes from, exit 128 + signal, and the checkpoint folder holds
    only complete checkpoints; the resumed run ends bit for bit as the uninterrupted one. While
    the SIGTERM case's run hangs, a second run started on its workdir is refused (one error line
    naming the first, exit 2)."""
    workdir = shared_dir() / f"run_interrupted_{sig.name}"
    ckdir = workdir / "checkpoints"
    proc = subprocess.Popen(train_cmd(workdir), cwd=ROOT, env=train_env(DAMO_JAX_TEST_HANG_AT_STEP=hang_at),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_line(proc, f"[test hook] hanging before step {hang_at}", timeout=600)
    if hang_at == "6":                        # the async save of step 4 finishes in the background
        deadline = time.time() + 120
        while not Checkpoints(ckdir, read_only=True).is_complete(4) and time.time() < deadline:
            time.sleep(0.2)
    if sig == signal.SIGTERM:   # meanwhile a second run on the same folder stops at once: exit 2
        second = run_train(workdir, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip().splitlines() == [
            f"error: --workdir {workdir}: another training run is using this folder (pid {proc.pid} on "
            f"{socket.gethostname()}); wait for it to end or choose another --workdir"], second.stderr[-3000:]
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("interrupted (")]
    assert lines == [f"interrupted ({sig.name}): the same command resumes from checkpoint {hang_at} "
                     f"in {ckdir}"], out[-3000:]
    assert f"interrupted: saving step {hang_at} first (interrupt again to stop without it)" in out
    assert Checkpoints(ckdir, read_only=True).steps() == ([4, 6] if hang_at == "6" else [2])
    if sig == signal.SIGINT:
        r = run_train(workdir)
        assert r.returncode == 0 and f"resumed from {ckdir}/6 " in r.stderr, r.stderr[-3000:]
        _assert_bitwise_equal(_full_state(workdir), _full_state(run_a[0]))


def test_an_interrupt_during_evaluation_costs_neither_the_checkpoint_nor_the_evaluation(run_a):
    """SIGTERM while the end-of-epoch evaluation of step 4 runs: that step's checkpoint was never
    written (evaluation comes first), so the epoch was lost. Now step 4 is saved, marked as not
    evaluated; the rerun evaluates it first (its AP then in the checkpoint's metrics, which the
    best-by-AP retention reads) and ends bit for bit as the uninterrupted run."""
    workdir = shared_dir() / "run_interrupted_in_eval"
    ckdir = workdir / "checkpoints"
    proc = subprocess.Popen(train_cmd(workdir), cwd=ROOT, env=train_env(DAMO_JAX_TEST_HANG_IN_EVAL_AT_STEP="4"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_line(proc, "[test hook] hanging in the evaluation of step 4", timeout=600)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in out, out[-3000:]
    assert Checkpoints(ckdir, read_only=True).steps() == [4]
    assert not Checkpoints(ckdir, read_only=True).metrics(4)
    r = run_train(workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluating step 4 first: its evaluation was interrupted" in r.stderr
    assert "eval step 4 (epoch 1): AP " in r.stderr
    assert "AP" in Checkpoints(ckdir, read_only=True).metrics(4)
    _assert_bitwise_equal(_full_state(workdir), _full_state(run_a[0]))


def test_a_hard_kill_during_evaluation_costs_only_the_evaluation(run_a):
    """kill -9 (an out-of-memory kill, a scheduler's SIGKILL) while the end-of-epoch evaluation of
    step 4 runs: the evaluation came before the checkpoint, so the epoch's training was lost. The
    checkpoint is now written first, marked as not evaluated; the rerun evaluates it first and ends
    bit for bit as the uninterrupted run."""
    workdir = shared_dir() / "run_killed_in_eval"
    ckdir = workdir / "checkpoints"
    proc = subprocess.Popen(train_cmd(workdir), cwd=ROOT, env=train_env(DAMO_JAX_TEST_HANG_IN_EVAL_AT_STEP="4"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_line(proc, "[test hook] hanging in the evaluation of step 4", timeout=600)
    deadline = time.time() + 120               # the checkpoint's asynchronous write completes
    while not Checkpoints(ckdir, read_only=True).is_complete(4) and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.communicate(timeout=120)
    assert Checkpoints(ckdir, read_only=True).steps() == [4]
    assert not Checkpoints(ckdir, read_only=True).metrics(4)
    r = run_train(workdir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluating step 4 first: its evaluation was interrupted" in r.stderr
    assert "AP" in Checkpoints(ckdir, read_only=True).metrics(4)
    _assert_bitwise_equal(_full_state(workdir), _full_state(run_a[0]))


def test_an_interrupt_python_swallowed_still_stops_the_run():
    """Ctrl-C during tracing / compiling was raised inside JAX's garbage-collection callback, where
    Python prints "Exception ignored" and drops it: the run went on to the end, exit 0. The train
    CLI notes every interrupt it raises, and the loop raises a lost one after the step."""
    workdir = shared_dir() / "run_lost_sigint"
    r = subprocess.run(train_cmd(workdir), cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=train_env(DAMO_JAX_TEST_LOST_SIGINT_AT_STEP="2"))
    out = r.stdout + r.stderr
    assert "[test hook] SIGINT from a finalizer before step 2" in out, out[-3000:]
    assert r.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    assert [line for line in out.splitlines() if line.startswith("interrupted (SIGINT)")], out[-3000:]
    from damo_jax.train.log import read_metrics
    steps = [x["step"] for x in read_metrics(workdir / "metrics.jsonl")["train"]]
    assert steps and max(steps) <= 3, steps          # stopped after the step, not at the end (8)


def _three_class_npz(run_a_dir, path):
    """An official-layout state dict (npz) with 3 classes, made from run A's weights."""
    from damo_jax.train.checkpoint import load_for_inference
    from damo_jax.interop.convert import to_torch_state_dict
    cfg, variables, _ = load_for_inference(run_a_dir, which="model", step="latest")
    sd = to_torch_state_dict(variables, cfg)
    for key in [k for k in sd if k.startswith("head.gfl_cls.")]:
        sd[key] = np.concatenate([sd[key], sd[key][:1]], axis=0)     # 2 -> 3 output channels
    np.savez(path, **sd)
    from damo_jax.interop.convert import expected_torch_entries
    return len(expected_torch_entries(cfg))


def test_finetune_from_other_class_count_then_nan_stop(run_a):
    """Fine-tuning from a 3-class checkpoint into the 2-class run with ``train.finetune_head``
    re-initialises only the cls head (and says so); then a NaN injected before step 6 stops the run: exit code 3, a message naming
    the step and the loss terms, and no checkpoint of that step or later exists."""
    workdir = shared_dir() / "run_nan"
    npz = shared_dir() / "three_classes.npz"
    n_keys = _three_class_npz(run_a[0], npz)      # tensors of the 2-class model
    r = run_train(workdir, f"--config.train.finetune={npz}", "--config.train.finetune_head=True",
                  DAMO_JAX_TEST_NAN_STEP="6")
    assert r.returncode == 3, r.stderr[-3000:]
    err = r.stderr
    assert f"fine-tuning from {npz}: loaded {n_keys - 6} tensors" in err, err[-3000:]
    skipped = err.split("skipped (re-initialised): ", 1)[1].splitlines()[0]
    assert sorted(k.split(" ")[0] for k in skipped.split("; ")) == sorted(
        f"head.gfl_cls.{i}.{w}" for i in range(3) for w in ("weight", "bias"))
    assert "ERROR: non-finite" in err and "at step 6" in err and "loss_cls" in err
    assert "no checkpoint of it is written" in err
    ckdir = workdir / "checkpoints"
    assert Checkpoints(ckdir, read_only=True).steps() == [4]
    assert not list(ckdir.glob("*.orbax-checkpoint-tmp*"))
    steps = [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 6                         # 6 updates done, the 7th (index 6) was refused


def _coco_with_broken_val(root, broken: int):
    """The shared train split, and its val split with the first ``broken`` images unreadable
    (one truncated, the others missing)."""
    import shutil
    src = shared_dir() / "coco"
    shutil.copytree(src, root)
    images = sorted((root / "val").iterdir())
    for k, path in enumerate(images[:broken]):
        if k == 0:
            path.write_bytes(path.read_bytes()[:200])
        else:
            path.unlink()
    return f"coco:{root}", len(images)


def _run_with_data(workdir, spec):
    """One epoch (4 steps, then the final evaluation and checkpoint) of the tiny run on ``spec``."""
    cmd = train_cmd(workdir, "--config.train.max_steps=4")
    cmd[cmd.index("--data") + 1] = spec
    return subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=1800)


def test_corrupt_val_image_is_skipped_and_counted():
    """One unreadable val image: evaluation skips it (file named in the log), scores the other
    three, says so, and the epoch's checkpoint carries the metrics; start-up prints the summaries."""
    spec, n_val = _coco_with_broken_val(shared_dir() / "coco_one_broken", broken=1)
    workdir = shared_dir() / "run_broken_val"
    r = _run_with_data(workdir, spec)
    assert r.returncode == 0, r.stderr[-4000:]
    err = r.stderr
    assert "train data coco:" in err and "16 images (0 skipped)" in err and "val data coco:" in err
    assert "skipping image (not scored)" in err and "val_000.jpg" in err
    assert f"{n_val - 1} images scored, 1 unreadable skipped" in err
    assert f"checkpoint (best AP): {workdir}/checkpoints/4" in err          # which one it is
    assert f"next: damo-jax eval --checkpoint {workdir}" in err             # and what to run next
    evals = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["kind"] == "eval"]
    assert [(e["step"], e["images_scored"], e["images_skipped"]) for e in evals] == [(4, n_val - 1, 1)]
    ck = Checkpoints(workdir / "checkpoints", read_only=True)
    assert ck.steps() == [4] and ck.metrics(4)["images_skipped"] == 1


def test_failed_evaluation_still_writes_the_checkpoint():
    """No val image can be read: evaluation raises; training reports it in one line, writes the
    epoch's checkpoint (without metrics: best-by-AP has nothing to rank) and finishes."""
    spec, n_val = _coco_with_broken_val(shared_dir() / "coco_all_broken", broken=4)
    workdir = shared_dir() / "run_failed_eval"
    r = _run_with_data(workdir, spec)
    assert r.returncode == 0, r.stderr[-4000:]
    failed = [line for line in r.stderr.splitlines() if "FAILED" in line]
    assert len(failed) == 1, r.stderr[-4000:]
    assert ("eval step 4 (epoch 1) FAILED, checkpoint saved without metrics: DataError: evaluate: "
            f"none of the {n_val} images") in failed[0]
    assert "Traceback" not in r.stderr
    ck = Checkpoints(workdir / "checkpoints", read_only=True)
    assert ck.steps() == [4] and not ck.metrics(4) and ck.best_step() is None
    assert "done: 4 steps (no evaluation succeeded: see the failed one above)" in r.stderr
    assert "(they load the latest checkpoint)" in r.stderr          # there is no best-AP one
    from damo_jax.train.log import read_metrics
    assert [(e["step"], e["error"][:20]) for e in read_metrics(workdir / "metrics.jsonl")["eval_failed"]] == [
        (4, "DataError: evaluate:")]


def test_trainer_learns_to_overfit_a_handful_of_images():
    """The trainer LEARNS: the small Ns-shaped network from scratch overfits 8 synthetic 64x64 images (coloured
    squares and discs, 1-2 objects each; no augmentation, no EMA, AdamW, one device) and then
    reaches AP50 >= 0.8 on those same 8 images (an untrained model scores ~0, so a trainer
    whose updates do nothing fails). The summary line reports the best AP of the run."""
    root = shared_dir() / "learn"
    config, spec = learn_setup(root)
    env = train_env()
    env.pop("XLA_FLAGS")                                     # one CPU device: the cheapest program
    cmd = [sys.executable, "-m", "damo_jax.train.loop", "--config", str(config), "--data", spec,
           "--workdir", str(root / "run"), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    records = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in records if x["kind"] == "eval"]
    train = [x for x in records if x["kind"] == "train"]
    assert evals and evals[-1]["images_scored"] == 8 and evals[-1]["images_skipped"] == 0
    assert train[-1]["total_loss"] < 0.5 * train[0]["total_loss"], (train[0], train[-1])
    assert evals[-1]["AP50"] >= 0.8, evals



def test_resume_on_data_with_other_class_names_is_refused(run_a, tmp_path):
    """A workdir trained on one class list, resumed on data with the same count but other names:
    before, it resumed silently (the checkpoint then said the new names); now one error line,
    exit 2, and the checkpoints stay as they were."""
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(run_a[0] / "checkpoints", workdir / "checkpoints")
    data = tmp_path / "coco"
    shutil.copytree(shared_dir() / "coco", data)
    for ann in (data / "annotations").glob("*.json"):
        d = json.loads(ann.read_text())
        for c in d["categories"]:
            c["name"] = "other_" + c["name"]
        ann.write_text(json.dumps(d))
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    cmd = train_cmd(workdir)
    cmd[cmd.index("--data") + 1] = f"coco:{data}"
    r = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --workdir {workdir}: its checkpoints were trained on "), last
    assert "other_" in last
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_resume_with_other_settings_names_them():
    """Resuming with a changed batch size or image size continued silently (the audit: lr, steps per
    epoch and the schedule changed with no word); now one warning lists the changed keys."""
    from damo_jax.train.loop import changed_settings
    saved = {"train": {"batch_size": 8, "max_steps": 2, "lr": 0.01}, "data": {"image_size": [64, 64]}}
    assert changed_settings(saved, saved) == ""
    now = {"train": {"batch_size": 4, "max_steps": 4, "lr": 0.01}, "data": {"image_size": [96, 96]}}
    assert changed_settings(saved, now) == "data.image_size: [64, 64] -> [96, 96]; train.batch_size: 8 -> 4"
    many = {"train": {f"k{i}": i for i in range(20)}}
    assert changed_settings({}, many, limit=3).endswith("; ... (17 more)")


def test_resume_on_other_validation_data_is_refused():
    """Same classes, other validation set: the old checkpoints' best AP (what eval / predict /
    export load) was measured on the other set; the audit saw it kept silently. Now refused;
    other *training* data still resumes (it only warns, as a changed setting)."""
    import types

    import ml_collections

    from damo_jax.errors import ConfigError
    from damo_jax.train.loop import check_resume_val_data
    saved = {"config": {"data": {"train": "yolo:/d/a.yaml", "val": "", "val_split": "val"}}}

    def run(**data):
        cfg = ml_collections.ConfigDict({"data": dict(saved["config"]["data"], **data)})
        return types.SimpleNamespace(workdir="w", cfg=cfg)
    check_resume_val_data(run(), saved)
    check_resume_val_data(run(train="yolo:/d/a.yaml", val="yolo:/d/a.yaml"), saved)  # the same set
    for changed in (dict(train="coco:/d/b"), dict(val="coco:/d/b"), dict(val_split="test")):
        with pytest.raises(ConfigError, match=r"--workdir w: its checkpoints were evaluated on "
                                              r"'yolo:/d/a.yaml' \(split 'val'\)"):
            check_resume_val_data(run(**changed), saved)
    check_resume_val_data(run(train="coco:/d/b", val="yolo:/d/a.yaml"), saved)   # new train data only
    check_resume_val_data(run(), {})                                             # old meta: no check


def test_resume_without_the_validation_data_it_was_evaluated_on_is_refused():
    """The audit's case: the validation annotation file vanished between two runs; the resumed run
    found no validation data (a warning), trained on without evaluating and kept the old best
    checkpoint. Checkpoints that carry a validation fingerprint now refuse a run without that data;
    a checkpoint never evaluated (no fingerprint) still resumes without it."""
    import types

    import ml_collections

    from damo_jax.errors import ConfigError
    from damo_jax.train.loop import check_resume_val_data
    data = {"train": "coco:/d/c", "val": "", "val_split": "val"}
    cfg = ml_collections.ConfigDict({"data": data})
    no_val = types.SimpleNamespace(workdir="w", cfg=cfg, val_ds=None)
    with pytest.raises(ConfigError, match=r"--workdir w: its checkpoints were evaluated on "
                                          r"'coco:/d/c' \(split 'val'\) but this run finds no "
                                          r"validation data there"):
        check_resume_val_data(no_val, {"config": {"data": data}, "val_fingerprint": "abc"})
    check_resume_val_data(no_val, {"config": {"data": data}})


def test_resume_checks_the_validation_set_not_its_spec(tmp_path):
    """The audit's case: a run on ``demo`` resumed with the same folder as ``coco:<folder>`` was
    refused (the specs differ). Checkpoints now carry the validation set's fingerprint: the same
    images and boxes under another spec or in a copied folder resume; one changed box is refused."""
    import json
    import shutil
    import types

    import ml_collections

    from damo_jax import data_pipelines
    from damo_jax.errors import ConfigError
    from damo_jax.train.loop import check_resume_val_data
    demo = data_pipelines.open_dataset("demo", "val")
    root = tmp_path / "copy"
    (root / "annotations").mkdir(parents=True)
    shutil.copytree(os.path.dirname(demo.records[0].file), root / "val2017")
    ann = json.loads(open(os.path.join(os.path.dirname(demo.records[0].file), "..", "annotations",
                                       "instances_val2017.json")).read())
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    saved = {"config": {"data": {"train": "demo", "val": "", "val_split": "val"}},
             "val_fingerprint": demo.fingerprint()}

    def run(spec):
        cfg = ml_collections.ConfigDict({"data": {"train": spec, "val": "", "val_split": "val"}})
        return types.SimpleNamespace(workdir="w", cfg=cfg, val_ds=data_pipelines.open_dataset(spec, "val"))
    check_resume_val_data(run(f"coco:{root}"), saved)                      # the same set, copied
    ann["annotations"][3]["bbox"][0] += 1.0
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    with pytest.raises(ConfigError, match=r"its checkpoints were evaluated on 'demo'"):
        check_resume_val_data(run(f"coco:{root}"), saved)
    changed = dict(saved, config={"data": {"train": f"coco:{root}", "val": "", "val_split": "val"}})
    with pytest.raises(ConfigError, match=r"whose images or boxes changed since"):
        check_resume_val_data(run(f"coco:{root}"), changed)   # the same spec, other boxes
    assert data_pipelines.open_dataset(f"coco:{root}", "val").fingerprint() != demo.fingerprint()


def test_resume_with_another_batch_or_test_settings_is_refused():
    """A halved global batch resumed with a 7x lower lr and a doubled schedule (the step counted in
    the new batch), and other test thresholds mixed AP values in the best-by-AP choice; both only
    warned. Now one error naming the keys, the reason and the overrides that resume."""
    import types

    from damo_jax.config import load_config
    from damo_jax.errors import ConfigError
    from damo_jax.train.checkpoint import config_to_json
    from damo_jax.train.loop import check_resume_fixed_settings
    saved_cfg = load_config("demo_ns")
    meta = {"config": config_to_json(saved_cfg)}

    def run(**changes):
        cfg = load_config("demo_ns")
        for key, value in changes.items():
            section, leaf = key.split("__")
            cfg[section][leaf] = value
        return types.SimpleNamespace(workdir="w", cfg=cfg)
    check_resume_fixed_settings(run(), meta)
    check_resume_fixed_settings(run(train__epochs=20, data__workers=0, test__batch_size=2), meta)
    check_resume_fixed_settings(run(train__batch_size=4), {})                 # old meta: no check
    with pytest.raises(ConfigError, match=r"--workdir w: train.batch_size 8 -> 4 on resume: the "
                                          r"schedule and the data order are counted in steps of the "
                                          r"global batch.*--config.train.batch_size=8, or train in a new"):
        check_resume_fixed_settings(run(train__batch_size=4), meta)
    with pytest.raises(ConfigError, match=r"test.image_size \(192, 192\) -> \(320, 320\); test.conf_thre "
                                          r".* -> 0.5 on resume: the best checkpoint is chosen by AP.*"
                                          r"--config.test.image_size=\(192, 192\) --config.test.conf_thre="):
        check_resume_fixed_settings(run(test__image_size=(320, 320), test__conf_thre=0.5), meta)


def test_no_progress_prints_the_losses(tmp_path, capsys):
    """``--no-progress`` (no tqdm bar: logs, schedulers) printed only the evaluation lines; the
    losses went to metrics.jsonl alone. Now each logged step is a console line too."""
    from damo_jax.train.log import TrainLog, read_metrics
    metrics = {"total_loss": 1.25, "loss_cls": 0.5, "loss_bbox": 0.5, "loss_dfl": 0.25, "lr": 1e-3}
    quiet = TrainLog(tmp_path / "a", total_steps=120, progress=False)
    quiet.write_train(20, 9, metrics)
    quiet.close()
    err = capsys.readouterr().err
    assert "step 20/120 (epoch 10): loss 1.2500, cls 0.5000, box 0.5000, dfl 0.2500, lr 1.00e-03" in err
    assert read_metrics(tmp_path / "a" / "metrics.jsonl")["train"][0]["epoch"] == 10   # as the console
    quiet = TrainLog(tmp_path / "a", total_steps=120, progress=False)
    quiet.write_eval(120, 9, {"AP": 0.5})        # the console's "eval step 120 (epoch 10)"
    quiet.close()
    assert read_metrics(tmp_path / "a" / "metrics.jsonl")["eval"][0]["epoch"] == 10
    quiet = TrainLog(tmp_path / "a", total_steps=120, progress=False)
    quiet.write_eval_failure(120, 9, "DataError: no readable image")   # a failed one is kept too
    quiet.close()
    failed = read_metrics(tmp_path / "a" / "metrics.jsonl")["eval_failed"]
    assert isinstance(failed[0].pop("time"), float)             # every record: wall-clock time
    assert failed == [{"kind": "eval_failed", "step": 120, "epoch": 10, "error": "DataError: no readable image"}]
    bar = TrainLog(tmp_path / "b", total_steps=120, progress=True)
    bar.write_train(20, 9, metrics)                # the bar shows them: no extra line
    bar.close()
    assert "step 20/120" not in capsys.readouterr().err


def test_best_ap_ties_name_the_checkpoint_that_is_loaded(tmp_path, monkeypatch):
    """All evaluations tie (AP 0 early in a run): the summary said "best at step 2" while
    eval / predict / export loaded the newest tied checkpoint (the manager's best_step()). The
    summary now names the same, newest, step."""
    import types

    from damo_jax.train import loop
    from damo_jax.train.log import TrainLog
    run = types.SimpleNamespace(model=None, val_ds=None, cfg=None, progress=False, last_eval=None,
                                best={"AP": -1.0}, info=lambda msg: None,
                                tlog=TrainLog(tmp_path, total_steps=6, progress=False))
    monkeypatch.setattr(loop, "evaluate_ema", lambda *a, **k: {"AP": 0.0, "AP50": 0.0})
    for step in (2, 4, 6):
        loop.evaluate_or_report(run, state=None, step=step, epoch=step // 2 - 1)
    run.tlog.close()
    assert run.best["step"] == 6


def test_batch_larger_than_the_data_is_warned():
    from damo_jax.train.loop import oversized_batch_note
    assert oversized_batch_note(8, 8) == "" and oversized_batch_note(4, 800) == ""
    assert oversized_batch_note(16, 8).startswith("train.batch_size 16 > the 8 training images")


def test_resume_past_the_end_of_a_shorter_schedule_says_nothing_is_trained(run_a, tmp_path):
    """A finished 8-step run resumed with a 4-step schedule printed 'step 8 of 4', 'running steps
    8..4' and 'done', rewriting the pictures with no word that nothing was trained (the audit).
    Now the log says so."""
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(run_a[0], workdir)
    r = run_train(workdir, "--config.train.max_steps=4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    text = r.stdout + r.stderr
    assert "no steps to run (checkpoint 8 >= the schedule's last step 4)" in text, text[-3000:]
    assert "checkpoint 8 is at or past the end of this schedule (step 4" in text, text[-3000:]
    assert "running steps 8..4" not in text


def test_resume_checks_the_settings_of_the_checkpoint_it_restores(tmp_path):
    """The audit's case: the newest checkpoint's meta was unreadable, so the resume checks read
    nothing ({}), the newest was set aside and the older one resumed with batch 8 instead of its 4
    (a warning only). The restored checkpoint's own meta is now checked too."""
    import types

    import jax
    import jax.numpy as jnp
    import ml_collections

    from damo_jax.errors import ConfigError
    from damo_jax.train import checkpoint
    from damo_jax.train.loop import resume_or_start

    def cfg(batch):
        return ml_collections.ConfigDict({"model": {"class_names": ("a",)}, "train": {
            "batch_size": batch, "finetune": ""}, "data": {"train": "demo", "val": "", "val_split": ""}})
    state = {"params": {"w": jnp.arange(3.0)}, "batch_stats": {}, "opt_state": {},
             "ema_params": {"w": jnp.arange(3.0)}, "ema_batch_stats": {},
             "step": jnp.asarray(0, jnp.int32), "rng": jax.random.PRNGKey(0)}
    d = tmp_path / "run" / "checkpoints"
    with checkpoint.Checkpoints(d) as ck:
        for step in (4, 8):
            ck.save(step, dict(state, step=jnp.asarray(step, jnp.int32)),
                    {"config": checkpoint.config_to_json(cfg(4)), "class_names": ["a"], "step": step})
    (d / "8" / "meta" / "metadata").write_text('{"config": {')      # garbled JSON
    with checkpoint.Checkpoints(d) as ck:
        run = types.SimpleNamespace(workdir=str(tmp_path / "run"), cfg=cfg(8), ckpts=ck,
                                    val_ds=None, teacher=None)
        with pytest.raises(ConfigError, match=r"train.batch_size 4 -> 8 on resume"):
            resume_or_start(run, state)
    # the refused resume changed nothing in the folder (the broken step 8 was set aside first)
    assert sorted(p.name for p in d.iterdir()) == ["4", "8"]


def test_a_chosen_val_split_the_data_lacks_is_an_error(tmp_path, caplog):
    """``--config.data.val_split=test`` on data whose splits are train and val only turned
    evaluation off with one warning (rc 0), where the same typo in train_split stopped the run: now
    one error naming the key and the splits there are. Data without the default ``val`` split, and
    a spec without splits at all (one COCO JSON file), still train without evaluation."""
    import logging

    from data_helpers import make_coco_dataset

    from damo_jax.config import load_config
    from damo_jax.errors import ConfigError
    from damo_jax.train.loop import open_datasets

    def cfg_for(train, val_split, val=""):
        cfg = load_config("demo")
        cfg.data.train, cfg.data.val, cfg.data.val_split = train, val, val_split
        return cfg
    with pytest.raises(ConfigError, match=r"^data.val_split: validation data 'demo' has no split "
                                          r"'test' \(demo: unknown split 'test' \(train, val\)\)"):
        open_datasets(cfg_for("demo", "test"))
    make_coco_dataset(tmp_path / "c", n=2)                      # a folder with a train split only
    with pytest.raises(ConfigError, match=r"^data.val_split: .* has no split 'test'"):
        open_datasets(cfg_for(f"coco:{tmp_path / 'c'}", "test"))
    with pytest.raises(ConfigError, match=r"^data.val: .* has no split 'val'"):     # data.val chosen
        open_datasets(cfg_for(f"coco:{tmp_path / 'c'}", "val", val=f"coco:{tmp_path / 'c'}"))
    single = f"coco:{tmp_path / 'c' / 'annotations' / 'instances_train2017.json'}"
    for train, split in ((f"coco:{tmp_path / 'c'}", "val"), (single, "val"), (single, "test")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _, val_ds = open_datasets(cfg_for(train, split))
        assert val_ds is None and "evaluation skipped" in caplog.text, (train, split)
    _, val_ds = open_datasets(cfg_for("demo", "validation"))    # the alias of val
    assert val_ds is not None


def test_resume_image_size_hint_works_with_img_size(tmp_path):
    """A run started with ``--img-size 64`` and resumed with ``--img-size 96``: the hint said to
    add ``--config.test.image_size=(64, 64)``, which beside ``--img-size`` is refused ("both set
    test.image_size"). Now it also gives the ``--img-size 64`` form, and that form resumes."""
    import types

    from damo_jax.cli.train import parse_args
    from damo_jax.errors import ConfigError
    from damo_jax.train.checkpoint import config_to_json
    from damo_jax.train.loop import check_resume_fixed_settings

    def cli_cfg(*size):
        cfg, _ = parse_args(["--config", "demo_ns", "--workdir", str(tmp_path / "w"), "--img-size",
                             *map(str, size)])
        return cfg
    meta = {"config": config_to_json(cli_cfg(64))}
    with pytest.raises(ConfigError) as err:
        check_resume_fixed_settings(types.SimpleNamespace(workdir="w", cfg=cli_cfg(96)), meta)
    assert "(a command with --img-size: --img-size 64 instead)" in str(err.value), str(err.value)
    check_resume_fixed_settings(types.SimpleNamespace(workdir="w", cfg=cli_cfg(64)), meta)
    meta = {"config": config_to_json(cli_cfg(64, 96))}
    with pytest.raises(ConfigError, match=r"--img-size 64 96 instead"):
        check_resume_fixed_settings(types.SimpleNamespace(workdir="w", cfg=cli_cfg(96)), meta)
