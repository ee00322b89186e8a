"""Distillation in the training path (SPEC §8), cheap in-process parts: config keys, schedule,
clipping, align convs (shapes, init, weight decay), the golden FeatureLoss cases through
``damo_jax.train.distill``, teacher loading errors, and ONE jitted update step with a teacher
(teacher bit-identical, align-conv and student gradients against an independent computation).

The 4-device and CLI (resume after kill -9, metrics, student-only outputs) tests are in
tests/test_distill_run.py.
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import golden_path
from damo_jax.config import load_config
from damo_jax.errors import ConfigError, UserError
from damo_jax.train import distill
from distill_setup import random_teacher_npz, random_variables, tiny_cfg
from golden_weights import make_state_dict


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


# ------------------------------------------------------------------------------ config / schedule
def test_config_keys_and_defaults():
    cfg = load_config("s")
    assert not distill.enabled(cfg)
    assert (cfg.distill.method, cfg.distill.weight, cfg.distill.weight_end, cfg.distill.tau) == \
        ("cwd", 1.0, 0.1, 1.0)
    assert distill.resolve_grad_clip(cfg) == 0.0              # no teacher: official = no clipping
    cfg = load_config("s")
    cfg.distill.teacher, cfg.distill.teacher_weights = "m", "/x/m.pth"
    assert distill.enabled(cfg) and distill.resolve_grad_clip(cfg) == 30.0 == cfg.train.grad_clip
    cfg.train.grad_clip = 5.0
    assert distill.resolve_grad_clip(cfg) == 5.0              # an explicit value wins


def test_weight_schedule_is_the_official_cosine():
    """SPEC §8 literally: w(it) = 1 − 0.9·(1 − cos(π·it/T))/2."""
    total = 37
    its = np.arange(total + 1)
    want = 1 - 0.9 * (1 - np.cos(np.pi * its / total)) / 2
    got = np.asarray(jax.jit(lambda i: distill.weight_at(i, total))(its))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[0] == pytest.approx(1.0) and got[-1] == pytest.approx(0.1)


def test_student_clipped_at_30_align_not_clipped_and_decay_on_kernels_only():
    cfg = load_config("s")
    cfg.distill.teacher, cfg.distill.teacher_weights = "m", "/x/m.pth"
    distill.resolve_grad_clip(cfg)
    from damo_jax.train import optim
    params = {"conv": {"kernel": np.ones((3, 3, 2, 2), np.float32)}, "bn": {"bias": np.zeros(2, np.float32)}}
    grads = {"conv": {"kernel": np.full((3, 3, 2, 2), 10.0, np.float32)},
             "bn": {"bias": np.full(2, 10.0, np.float32)}}               # norm 10·√38 ≈ 61.6 > 30
    tx = optim.make_optimizer(cfg.train, 1.0, {"conv": {"kernel": True}, "bn": {"bias": False}})
    upd, _ = tx.update(grads, tx.init(params), params)
    norm = 10.0 * math.sqrt(38)
    scale = 30.0 / norm
    wd, mom = cfg.train.weight_decay, cfg.train.momentum                 # SGD nesterov, coupled L2
    want_k = -(10.0 * scale + wd * 1.0) * (1 + mom)
    want_b = -(10.0 * scale) * (1 + mom)
    np.testing.assert_allclose(upd["conv"]["kernel"], want_k, rtol=1e-5)
    np.testing.assert_allclose(upd["bn"]["bias"], want_b, rtol=1e-5)
    align = distill.init_align(jax.random.PRNGKey(0), (8, 16), (16, 8))
    assert jax.tree.map(bool, optim.decay_mask(align, None)) == {
        f"level{i}": {"kernel": True, "bias": False} for i in range(2)}
    a_tx = distill.make_align_tx(cfg, align)
    a_grads = jax.tree.map(lambda p: jnp.full(p.shape, 10.0), align)   # norm ≫ 30: NOT clipped
    a_upd, _ = a_tx.update(a_grads, a_tx.init(align), align)
    np.testing.assert_allclose(a_upd["level0"]["bias"], -10.0 * (1 + mom), rtol=1e-6)
    np.testing.assert_allclose(a_upd["level0"]["kernel"],
                               -(10.0 + wd * np.asarray(align["level0"]["kernel"])) * (1 + mom), rtol=1e-5)


def test_align_conv_shapes_and_pytorch_default_init():
    cs, ct = (40, 80, 160), (64, 128, 256)
    align = distill.init_align(jax.random.PRNGKey(3), cs, ct)
    for i, (s, t) in enumerate(zip(cs, ct)):
        k, b = np.asarray(align[f"level{i}"]["kernel"]), np.asarray(align[f"level{i}"]["bias"])
        assert k.shape == (s, t) and b.shape == (t,)
        bound = 1 / math.sqrt(s)                 # kaiming_uniform(a=√5) and bias: U(±1/√fan_in)
        assert np.abs(k).max() <= bound and np.abs(b).max() <= bound
        assert abs(k.std() - bound / math.sqrt(3)) < 0.05 * bound      # uniform, not normal
        assert np.abs(k).max() > 0.95 * bound


# ------------------------------------------------------------------------------ golden cases
@pytest.fixture(scope="module")
def golden():
    meta = json.loads(golden_path("distill", "distill_cases.json").read_text())
    return meta["cases"], dict(np.load(golden_path("distill", "distill_cases.npz")))


@pytest.mark.parametrize("i", range(4))
def test_golden_cases_through_the_training_path(golden, i):
    """Official FeatureLoss value and gradients via ``distill.feature_loss`` with the align-conv
    pytree the trainer builds (shapes from ``init_align``, values of the golden case)."""
    cases, arrays = golden
    case, p = cases[i], cases[i]["prefix"]
    cfg = load_config("s")
    cfg.distill.method = case["distiller"]
    align = distill.init_align(jax.random.PRNGKey(0), case["channels_student"], case["channels_teacher"])
    sd = make_state_dict({e["key"]: e["shape"] for e in case["align_weights"]["entries"]},
                         case["align_weights"]["seed"], case["align_weights"]["conv_gain"])
    for lv in range(3):
        k = sd[f"align_module.{lv}.weight"][:, :, 0, 0].T
        assert k.shape == align[f"level{lv}"]["kernel"].shape
        align[f"level{lv}"] = {"kernel": jnp.asarray(k), "bias": jnp.asarray(sd[f"align_module.{lv}.bias"])}
    students = [jnp.asarray(nhwc(arrays[f"{p}in.student{lv}"])) for lv in range(3)]
    teachers = [jnp.asarray(nhwc(arrays[f"{p}in.teacher{lv}"])) for lv in range(3)]
    loss, (g_s, g_a) = jax.value_and_grad(
        lambda s, a: distill.feature_loss(cfg, s, teachers, a), argnums=(0, 1))(students, align)
    np.testing.assert_allclose(loss * case["loss_weight"], case["loss"], rtol=1e-5)
    for lv in range(3):
        np.testing.assert_allclose(g_s[lv], nhwc(arrays[f"{p}grad.student{lv}"]), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g_a[f"level{lv}"]["bias"], arrays[f"{p}grad.align_module.{lv}.bias"],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(g_a[f"level{lv}"]["kernel"]),
                                   case["align_param_grad_norms"][f"align_module.{lv}.weight"], rtol=1e-4)


# ------------------------------------------------------------------------------ teacher loading
def test_teacher_errors_name_both_configs(tmp_path):
    cfg = tiny_cfg()
    weights = random_teacher_npz(tmp_path / "ns.npz", "ns", num_classes=2)
    cfg.distill.teacher, cfg.distill.teacher_weights = "nm", str(weights)       # wrong teacher config
    with pytest.raises(ConfigError, match=r"teacher.*'nm'.*student.*'ns'.*the file holds DAMO-YOLO-NS: "
                                          r"use --teacher ns$"):
        distill.load_teacher(cfg)
    cfg.distill.teacher = ""
    with pytest.raises(ConfigError, match="set distill.teacher"):
        distill.load_teacher(cfg)
    cfg.distill.teacher, cfg.distill.teacher_weights = "ns", str(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="missing.pth"):
        distill.load_teacher(cfg)
    log_file = tmp_path / "run" / "metrics.jsonl"          # a run's file, not the run (the audit:
    log_file.parent.mkdir()                                # "no complete checkpoint in .../metrics.jsonl")
    log_file.write_text("{}\n")
    cfg.distill.teacher, cfg.distill.teacher_weights = "", str(log_file)
    with pytest.raises(ConfigError, match=r"metrics.jsonl \(--teacher-weights\): a training run folder or "
                                          r"an official .pth / .pt / .npz state dict was expected, not a "
                                          r"\.jsonl file"):
        distill.load_teacher(cfg)
    cfg.distill.teacher, cfg.distill.teacher_weights = "zz", str(weights)    # an unknown name:
    with pytest.raises(UserError, match=r"^--teacher \(config distill.teacher\) 'zz': not a known"):
        distill.load_teacher(cfg)                          # named as --teacher (was --config)
    other = load_config("ns")
    other.model.head["strides"] = (8, 16)
    with pytest.raises(ConfigError, match=r"student.*'ns'.*teacher.*'ns'.*strides"):
        distill.check_pair(cfg, other)


def test_teacher_run_of_another_model_names_both_models(tmp_path, monkeypatch):
    """--teacher t --teacher-weights RUN where RUN trained ns: one line naming the run's model and
    the way out (the audit: "689 tensors differ, e.g. params/backbone/..." and nothing else)."""
    from damo_jax.train import checkpoint
    cfg = tiny_cfg()
    run = tmp_path / "run_ns"
    run.mkdir()
    stored = load_config("ns")
    monkeypatch.setattr(checkpoint, "load_for_inference", lambda path, which: (
        stored, random_variables("ns", len(cfg.model.class_names)), tuple(cfg.model.class_names)))
    cfg.distill.teacher, cfg.distill.teacher_weights = "nm", str(run)
    with pytest.raises(ConfigError, match=r"run_ns \(config distill.teacher_weights\): that run trained "
                                          r"model 'ns', not the --teacher 'nm' .*leave out --teacher"):
        distill.load_teacher(cfg)
    cfg.distill.teacher = ""                       # the run's own model: loads
    assert distill.load_teacher(cfg).cfg.model.name == "ns"


def test_teacher_from_state_dict_drops_nothing_but_the_head(tmp_path):
    cfg = tiny_cfg()
    cfg.distill.teacher = "nm"
    cfg.distill.teacher_weights = str(random_teacher_npz(tmp_path / "nm.npz", "nm", num_classes=80))
    t = distill.load_teacher(cfg)                  # 80-class head vs 2-class data: head dropped
    assert not t.has_head and set(t.variables["params"]) == {"backbone", "neck"}
    frozen = t.frozen()
    assert set(frozen) == {"teacher_params", "teacher_batch_stats"}
    assert distill.check_pair(cfg, t.cfg) == ((24, 32, 48), (64, 128, 256))   # tiny student, Nm teacher
    sd = dict(np.load(cfg.distill.teacher_weights))
    k = "neck.merge_3.conv1.conv.weight" if "neck.merge_3.conv1.conv.weight" in sd else next(
        k for k in sd if k.startswith("neck.") and k.endswith("conv.weight"))
    flat = {"/".join(str(getattr(e, "key", e)) for e in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(frozen["teacher_params"])}
    assert any(np.array_equal(np.transpose(sd[k], (2, 3, 1, 0)), v) for v in flat.values())


def test_weak_teacher_stops_unless_allowed():
    cfg = tiny_cfg()
    cfg.distill.teacher = "ns"
    with pytest.raises(ConfigError, match="allow_weak_teacher"):
        distill.check_teacher_ap(cfg, 0.0)
    distill.check_teacher_ap(cfg, 0.2)
    cfg.distill.allow_weak_teacher = True
    distill.check_teacher_ap(cfg, 0.0)
