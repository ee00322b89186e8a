"""Distillation through the real update step and the CLI (tiny Ns student 64×64, random Ns teacher).

* one jitted, donated step with a teacher (1 device; run in the subprocess of the 1-vs-4-device
  check, which compiles that program anyway): the teacher is bit-identical after 2 steps; the align-conv and student gradients (read from the SGD momentum buffers after
  the first step) equal an independent computation: teacher neck from the FULL teacher model
  (official-layout weights, head included), student neck from a plain ``model.apply``, the golden-
  tested ``losses.distill_loss``, the detection loss, the cosine weight of SPEC §8 and the clip;
* 1 device vs 4 devices (one subprocess, 4 fake CPU devices): same losses and updates (global-batch
  normalisation of the distilled features, documented in damo_jax/train/distill.py);
* CLI on 4 devices: ``loss_distill`` / ``distill_weight`` in metrics.jsonl, align convs and the
  distill config in the checkpoint, no teacher in the checkpoint or in what eval/predict/export
  load, and resume after ``kill -9`` is bitwise exact.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from damo_jax.train import distill, optim
from damo_jax.train import loop
from damo_jax.train.checkpoint import Checkpoints, load_for_inference
from distill_setup import random_teacher_npz, tiny_cfg
from test_train_run import _wait_for_line
from train_setup import ROOT, run_train, shared_dir, train_cmd, train_env


def synthetic_batch(seed=0, size=64, max_boxes=8, batch=4):
    rng = np.random.default_rng(seed)
    wh = rng.uniform(10, 40, size=(batch, max_boxes, 2))
    xy = rng.uniform(0, 1, size=(batch, max_boxes, 2)) * (size - wh)
    valid = np.zeros((batch, max_boxes), bool)
    valid[0, :2], valid[1, :1], valid[2, :3] = True, True, True
    return {"images": rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8),
            "gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
            "gt_labels": rng.integers(0, 2, size=(batch, max_boxes)).astype(np.int32), "gt_valid": valid}


def teacher_config() -> str:
    """The teachers of these tests: the tiny test network (its own config file; a teacher config is
    a name or a path), so that every distillation program here shares one teacher graph."""
    return str(shared_dir() / "tiny.py")


def teacher_npz():
    path = shared_dir() / "teacher_tiny.npz"
    if not path.exists():
        random_teacher_npz(path, teacher_config(), num_classes=2, seed=5)
    return path


def host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)     # copies (the device state gets donated)


def distill_program(cfg, devices):
    """(model, teacher, state at the end of warmup, jitted update, shardings) on ``devices``."""
    from damo_jax.models import build_model
    mesh = Mesh(np.asarray(devices), ("data",))
    repl, dsh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    distill.resolve_grad_clip(cfg)
    rl = loop.run_length(cfg, 16)
    lr_fn, _ = optim.schedule_from_config(cfg.train, steps_per_epoch=rl.steps_per_epoch,
                                          global_batch=int(cfg.train.batch_size))
    model = build_model(cfg)
    state = loop.init_state(model, cfg, jax.random.PRNGKey(0), repl)
    teacher = distill.load_teacher(cfg)
    align_tx, state = distill.attach(state, cfg, teacher, repl)
    state = dict(state, step=jax.device_put(jnp.asarray(rl.warmup_steps, jnp.int32), repl))
    tx = loop.make_tx(cfg, state["params"], state["batch_stats"])
    update = jax.jit(loop.make_update_fn(model, tx, lr_fn, cfg, teacher=teacher, align_tx=align_tx,
                                         total_steps=rl.total_steps),
                     in_shardings=(repl, dsh), out_shardings=(repl, repl), donate_argnums=0)
    return model, teacher, state, update, dsh, rl, lr_fn


def _cfg():
    cfg = tiny_cfg()
    cfg.distill.teacher, cfg.distill.teacher_weights = teacher_config(), str(teacher_npz())
    return cfg


MULTI = r'''
import json, pickle, sys
sys.path.insert(0, sys.argv[1])
from damo_jax import runtime
runtime.tune_cpu_runtime()
import jax, numpy as np
from damo_jax.train import loop
from test_distill_run import _cfg, distill_program, synthetic_batch, host
assert len(jax.devices()) == 4
out = {}
for n in (4, 1):
    model, teacher, state, update, dsh, rl, lr_fn = distill_program(_cfg(), jax.devices()[:n])
    s0 = host(state)
    new, m = update(state, loop.shard_batch(synthetic_batch(), dsh))
    out[n] = (s0, host(new), jax.device_get(m))
# one device: a second step (the teacher must still be bit-identical after it)
new2, m2 = update(new, loop.shard_batch(synthetic_batch(seed=1), dsh))
with open(sys.argv[2], "wb") as f:
    pickle.dump({"s0": out[1][0], "s1": out[1][1], "m1": out[1][2], "s2": host(new2),
                 "m2": jax.device_get(m2)}, f)
res = {"metrics": {k: [float(out[1][2][k]), float(out[4][2][k])] for k in
                   ("total_loss", "loss_distill", "distill_weight", "grad_norm")}}
for key in ("params", "align_params", "teacher_params", "ema_params", "batch_stats"):
    worst = 0.0
    for a, b in zip(jax.tree.leaves(out[1][1][key]), jax.tree.leaves(out[4][1][key])):
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1.0)))
    res[key] = worst
res["align_moved"] = max(float(np.abs(a - b).max()) for a, b in zip(
    jax.tree.leaves(out[1][0]["align_params"]), jax.tree.leaves(out[1][1]["align_params"])))
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """One subprocess with 4 fake CPU devices compiles the distillation step on 4 devices and on 1
    and runs it: 1 step each on the same batch (the 1-vs-4 comparison) and a second 1-device step
    (the one-device states feed the frozen-teacher and gradient tests). Gives (comparison, states)."""
    import pickle
    states = tmp_path_factory.mktemp("distill_steps") / "one_device.pkl"
    r = subprocess.run([sys.executable, "-c", MULTI, str(ROOT / "tests"), str(states)], cwd=ROOT,
                       env=train_env(), capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:])
    return res, pickle.loads(states.read_bytes())


@pytest.fixture(scope="module")
def one_device_steps(programs):
    """(cfg, model, teacher, s0, s1, m1, s2, m2, batch, rl) of the 1-device run in ``programs``;
    the model and teacher are rebuilt here from the same config (no compilation)."""
    from damo_jax.models import build_model
    st = programs[1]
    cfg = _cfg()
    distill.resolve_grad_clip(cfg)
    model, teacher, rl = build_model(cfg), distill.load_teacher(cfg), loop.run_length(cfg, 16)
    return cfg, model, teacher, st["s0"], st["s1"], st["m1"], st["s2"], st["m2"], synthetic_batch(), rl


def test_teacher_is_frozen_bit_identical_after_steps(one_device_steps):
    cfg, model, teacher, s0, s1, m1, s2, m2, batch, rl = one_device_steps
    for key in ("teacher_params", "teacher_batch_stats"):
        a, b = jax.tree_util.tree_leaves_with_path(s0[key]), jax.tree_util.tree_leaves_with_path(s2[key])
        assert [p for p, _ in a] == [p for p, _ in b] and len(a) > 50
        for (path, x), (_, y) in zip(a, b):
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert "head" not in s0["teacher_params"]
    moved = lambda k: max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(s0[k]),  # noqa: E731
                                                                       jax.tree.leaves(s2[k])))
    assert moved("align_params") > 0 and moved("params") > 0
    assert bool(m1["finite"]) and bool(m2["finite"]) and int(s2["step"]) == rl.warmup_steps + 2
    w = 1 - 0.9 * (1 - np.cos(np.pi * rl.warmup_steps / rl.total_steps)) / 2       # SPEC §8
    np.testing.assert_allclose(m1["distill_weight"], w, rtol=1e-6)
    assert m1["loss_distill"] > 0


def _trace(opt_state):
    return optax.tree_utils.tree_get(opt_state, "trace")


def test_align_and_student_gradients_match_an_independent_computation(one_device_steps):
    """First SGD step from zero momentum: trace = clip(grad) + wd·param (decayed tensors only)."""
    from damo_jax.assign.ota import align_ota, build_targets
    from damo_jax.interop.convert import load_official_checkpoint
    from damo_jax.losses import detection_loss, distill_loss
    from damo_jax.models import build_model
    cfg, model, teacher, s0, s1, m1, *_ , batch, rl = one_device_steps
    images = jnp.asarray(batch["images"], jnp.float32)
    tcfg = teacher.cfg
    full_teacher = load_official_checkpoint(cfg.distill.teacher_weights, tcfg)   # head included
    t_neck = build_model(tcfg).apply(full_teacher, images, train=False)["neck"]
    w = float(m1["distill_weight"])
    align0 = [s0["align_params"][f"level{i}"] for i in range(3)]
    rng = jax.random.split(s0["rng"])[1]

    def student_neck_and_det(params):
        out, _ = model.apply({"params": params, "batch_stats": s0["batch_stats"]}, images, train=True,
                             mutable=["batch_stats"], rngs={"dropout": rng})
        a = align_ota(jax.lax.stop_gradient(out["scores"]), out["priors"],
                      jax.lax.stop_gradient(out["boxes"]), batch["gt_boxes"], batch["gt_labels"],
                      batch["gt_valid"])
        t = build_targets(a, out["priors"], batch["gt_boxes"], batch["gt_labels"], num_classes=2,
                          reg_max=int(cfg.model.head.reg_max))
        return out["neck"], detection_loss(out, t, reg_max=int(cfg.model.head.reg_max))[0]

    def total(params, align):
        neck, det = student_neck_and_det(params)
        return det + w * distill_loss(neck, t_neck, align)

    g_params, g_align = jax.jit(jax.grad(total, argnums=(0, 1)))(s0["params"], align0)
    wd = float(cfg.train.weight_decay)
    # align convs: not clipped, decay on kernels only
    trace_a = _trace(s1["align_opt_state"])
    for i in range(3):
        got = trace_a[f"level{i}"]
        np.testing.assert_allclose(got["bias"], g_align[i]["bias"], rtol=2e-4, atol=1e-7)
        np.testing.assert_allclose(got["kernel"] - wd * s0["align_params"][f"level{i}"]["kernel"],
                                   g_align[i]["kernel"], rtol=2e-4, atol=1e-7)
    # student: global-norm clip at 30 (the official distillation recipe), then coupled L2
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(g_params))))
    np.testing.assert_allclose(m1["grad_norm"], norm, rtol=1e-4)
    scale = min(1.0, 30.0 / norm)
    mask = optim.decay_mask(s0["params"], s0["batch_stats"])
    want = jax.tree.map(lambda g, p, m: scale * np.asarray(g) + (wd * p if m else 0.0),
                        g_params, s0["params"], mask)
    got = _trace(s1["opt_state"])
    num = sum(float(np.sum((np.asarray(a) - b) ** 2)) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    den = sum(float(np.sum(np.asarray(b) ** 2)) for b in jax.tree.leaves(want))
    assert (num / den) ** 0.5 < 1e-4, (num / den) ** 0.5


def test_one_distill_step_on_4_devices_equals_1_device(programs):
    res = programs[0]
    print("distill 1 vs 4 devices:", res)
    for key, (one, four) in res["metrics"].items():
        assert abs(one - four) <= 1e-5 * max(abs(one), 1e-6), (key, one, four)
    assert res["teacher_params"] == 0.0 and res["align_moved"] > 0
    for key in ("params", "align_params", "ema_params", "batch_stats"):
        assert res[key] <= 1e-5, (key, res)


# ---------------------------------------------------------------------------------------- CLI
def distill_args() -> tuple[str, ...]:
    return (f"--config.distill.teacher={teacher_config()}", "--config.distill.allow_weak_teacher=true")


def _distill_cmd_args():
    return (*distill_args(), "--teacher-weights", str(teacher_npz()))     # the short flag


def _state_items(workdir, step=8):
    return Checkpoints(workdir / "checkpoints", read_only=True).restore_items(step, items=("state", "ema", "meta"))


@pytest.fixture(scope="module")
def distill_run():
    workdir = shared_dir() / "distill_a"
    r = run_train(workdir, *_distill_cmd_args(), timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return workdir, r


def test_cli_run_logs_saves_and_exports_the_student_only(distill_run):
    workdir, r = distill_run
    assert f"distilling from {teacher_config()}" in r.stderr and "grad clip 30.0" in r.stderr
    assert "teacher val AP" in r.stderr                       # evaluated once before training
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in records if x["kind"] == "train"]
    assert [x["step"] for x in train] == list(range(1, 9))
    assert all(x["loss_distill"] > 0 for x in train)
    w = [x["distill_weight"] for x in train]
    want = [1 - 0.9 * (1 - np.cos(np.pi * s / 8)) / 2 for s in range(8)]     # T = 8 steps
    np.testing.assert_allclose(w, want, rtol=1e-6)
    tb = b"".join(p.read_bytes() for p in (workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert b"train/loss_distill" in tb and b"train/distill_weight" in tb
    items = _state_items(workdir)
    assert set(items["state"]) == {"params", "batch_stats", "opt_state", "step", "rng", "align_params",
                                   "align_opt_state"}
    assert items["meta"]["config"]["distill"]["teacher"] == teacher_config()
    assert items["meta"]["distill"]["teacher_fingerprint"]
    cfg, variables, names = load_for_inference(workdir, step=8)      # what eval/predict/export load
    assert set(variables) == {"params", "batch_stats"} and names == ("square", "disc")
    np.testing.assert_array_equal(jax.tree.leaves(variables["params"])[0],
                                  jax.tree.leaves(items["ema"]["params"])[0])
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(items["state"]["params"])


def test_kill9_and_resume_with_a_teacher_is_bitwise_exact(distill_run):
    workdir_a, _ = distill_run
    workdir = shared_dir() / "distill_killed"
    ckdir = workdir / "checkpoints"
    proc = subprocess.Popen(train_cmd(workdir, *_distill_cmd_args()), cwd=ROOT,
                            env=train_env(DAMO_JAX_TEST_HANG_AT_STEP="6"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_line(proc, "[test hook] hanging before step 6", timeout=3600)
    deadline = time.time() + 120
    while not (ckdir / "4").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert Checkpoints(ckdir, read_only=True).steps() == [4]
    r = run_train(workdir, *_distill_cmd_args(), timeout=3600)
    assert r.returncode == 0, r.stderr[-5000:]
    assert "resumed from" in r.stderr and "teacher val AP" not in r.stderr
    a, b = _state_items(workdir_a), _state_items(workdir)
    for item in ("state", "ema"):
        la, lb = jax.tree_util.tree_leaves_with_path(a[item]), jax.tree_util.tree_leaves_with_path(b[item])
        assert [p for p, _ in la] == [p for p, _ in lb]
        for (path, x), (_, y) in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{item}{jax.tree_util.keystr(path)}")


def test_run_directory_teacher_end_to_end(distill_run):
    """A damo_jax training run as the teacher (``--teacher-weights RUN_DIR``, no ``--teacher``): its
    stored config and EMA weights (head included: same classes) are what the step distills from."""
    from damo_jax.config import load_config
    teacher_run, _ = distill_run
    cfg = load_config(str(shared_dir() / "tiny.py"))
    cfg.model.class_names = ("square", "disc")          # set from the dataset by the train loop
    cfg.model.head.num_classes = 2
    cfg.distill.teacher_weights = str(teacher_run)
    teacher = distill.load_teacher(cfg)
    _, ema, names = load_for_inference(teacher_run, which="ema")
    assert teacher.has_head and teacher.cfg.model.name == "ns" and names == ("square", "disc")
    for col in ("params", "batch_stats"):
        la = jax.tree_util.tree_leaves_with_path(teacher.variables[col])
        lb = jax.tree_util.tree_leaves_with_path(ema[col])
        assert [p for p, _ in la] == [p for p, _ in lb] and la
        for (path, x), (_, y) in zip(la, lb):
            np.testing.assert_array_equal(x, np.asarray(y), err_msg=f"{col}{jax.tree_util.keystr(path)}")
    workdir = shared_dir() / "distill_from_run"
    r = run_train(workdir, "--config.distill.allow_weak_teacher=true", "--teacher-weights", str(teacher_run),
                  timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "distilling from" in r.stderr and "teacher val AP" in r.stderr
    train = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in train if x["kind"] == "train"]
    assert len(train) == 8 and all(x["loss_distill"] > 0 for x in train)
    assert _state_items(workdir)["meta"]["config"]["distill"]["teacher_weights"] == str(teacher_run)


def _official_pth(path, name, num_classes, seed):
    """An official-style training checkpoint: ``{"model": state_dict, "epoch", "optimizer"}`` with the
    ``module.`` prefix of a DDP run, written by our torch-free writer (readable by torch.load)."""
    import collections

    from damo_jax.interop.convert import to_torch_state_dict
    from damo_jax.interop.pth_write import save_pth
    from damo_jax.config import load_config
    from distill_setup import random_variables
    cfg = load_config(name)
    cfg.model.head["num_classes"] = num_classes
    variables = random_variables(name, num_classes, seed)
    sd = collections.OrderedDict((f"module.{k}", v) for k, v in to_torch_state_dict(variables, cfg).items())
    save_pth({"epoch": 300, "model": sd, "optimizer": None}, path)
    return path, variables


def test_official_pth_teacher_of_other_classes_loads_without_its_head(tmp_path):
    """A COCO (80-class) official ``.pth`` as teacher of a 2-class student: every backbone/neck
    tensor arrives (layout converted), the head is dropped (the step needs the neck only)."""
    path, want = _official_pth(tmp_path / "teacher_t.pth", "t", 80, seed=11)
    cfg = tiny_cfg()
    cfg.distill.teacher, cfg.distill.teacher_weights = "t", str(path)
    teacher = distill.load_teacher(cfg)
    assert not teacher.has_head and "head" in teacher.note and "state dict" in teacher.source
    assert teacher.cfg.model.name == "t"
    for col in ("params", "batch_stats"):
        got = jax.tree_util.tree_leaves_with_path(teacher.variables[col])
        ref = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(
            {k: v for k, v in want[col].items() if k != "head"})}
        assert {jax.tree_util.keystr(p) for p, _ in got} == set(ref) and ref
        for p, x in got:
            np.testing.assert_array_equal(x, np.asarray(ref[jax.tree_util.keystr(p)]), err_msg=str(p))


def test_finetune_and_distill_together_from_official_pth_files(tmp_path):
    """``--config.train.finetune=student.pth`` (80-class official checkpoint: all but the class
    head loaded) and ``--teacher-weights teacher.pth`` (official checkpoint) in ONE run."""
    # the student's own (tiny) architecture, as an 80-class official checkpoint
    student_pth, student = _official_pth(tmp_path / "student_tiny.pth", str(shared_dir() / "tiny.py"), 80, seed=21)
    teacher_pth, _ = _official_pth(tmp_path / "teacher_tiny.pth", teacher_config(), 2, seed=5)
    workdir = tmp_path / "run"
    r = run_train(workdir, *distill_args(), "--teacher-weights", str(teacher_pth),
                  f"--config.train.finetune={student_pth}", timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert f"fine-tuning from {student_pth}" in r.stderr and "head.gfl_cls" in r.stderr
    assert f"state dict {teacher_pth}" in r.stderr and "teacher val AP" in r.stderr
    train = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in train if x["kind"] == "train"] == list(range(1, 9))
    assert all(x["loss_distill"] > 0 for x in train if x["kind"] == "train")
    # the student started from the fine-tuning weights: 8 small SGD steps later every backbone
    # kernel still correlates > 0.99 with them (a fresh initialisation would not correlate at all)
    params = _state_items(workdir)["state"]["params"]
    for path, x in jax.tree_util.tree_leaves_with_path(params["backbone"]):
        if x.ndim == 4:
            ref = student["params"]["backbone"]
            for k in path:
                ref = ref[k.key]
            c = np.corrcoef(np.ravel(x), np.ravel(ref))[0, 1]
            assert c > 0.99, (jax.tree_util.keystr(path), c)
