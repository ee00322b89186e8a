"""End-to-end runs of ``python -m damo_jax.train`` on a tiny synthetic COCO set (the small
Ns-shaped test network of train_setup.py, 64×64, 16 images, batch 4, 2 epochs of 4 steps, evaluation after each epoch), in subprocesses with 4 fake
CPU devices (data parallel: one image per device):

* the outputs a user expects (metrics.jsonl, TensorBoard, curves.png, predictions.png, checkpoints,
  the summary line), evaluation on the val split;
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
import signal
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
    assert "done: 8 steps; best AP" in r.stderr and "checkpoint:" in r.stderr
    # EMA and raw model are both saved, and they differ
    state = _full_state(workdir)
    assert int(state["state"]["step"]) == 8
    k = jax.tree.leaves(state["state"]["params"])[0]
    k_ema = jax.tree.leaves(state["ema"]["params"])[0]
    assert k.shape == k_ema.shape and not np.array_equal(k, k_ema)


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
    assert not list(ckdir.glob("*.orbax-checkpoint-tmp*"))     # cleaned up by the next save
    _assert_bitwise_equal(_full_state(workdir), _full_state(workdir_a))
    # the resumed runs logged the steps they redid; readers keep the last record per step
    from damo_jax.train.log import read_metrics
    assert [x["step"] for x in read_metrics(workdir / "metrics.jsonl")["train"]] == list(range(1, 9))


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
    """Fine-tuning from a 3-class checkpoint into the 2-class run re-initialises only the cls head
    (and says so); then a NaN injected before step 6 stops the run: exit code 3, a message naming
    the step and the loss terms, and no checkpoint of that step or later exists."""
    workdir = shared_dir() / "run_nan"
    npz = shared_dir() / "three_classes.npz"
    n_keys = _three_class_npz(run_a[0], npz)      # tensors of the 2-class model
    r = run_train(workdir, f"--config.train.finetune={npz}", DAMO_JAX_TEST_NAN_STEP="6")
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
    assert "done: 4 steps (no evaluation)" in r.stderr


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

