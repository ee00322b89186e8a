"""Train CLI: --help lists every config key, overrides, run lengths, evaluation schedule."""
from __future__ import annotations

import subprocess
import sys

import pytest

from damo_jax.train import loop as train
from damo_jax.config import flat_items, load_config

from train_setup import ROOT


def test_help_lists_every_key_with_default():
    r = subprocess.run([sys.executable, "-m", "damo_jax.train.loop", "--config", "ns", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for key, value in flat_items(load_config("ns")):
        assert f"--config.{key}={value!r}" in r.stdout, key
    for flag in ("--data", "--workdir", "--runlocal", "--multihost", "--teacher", "--teacher-weights",
                 "--coordinator", "--num-processes", "--process-id"):
        assert flag in r.stdout
    # each key explained on the line below it (a hand-written phrase, not taken from KEY_HELP)
    lines = r.stdout.splitlines()
    at = lines.index("  --config.train.base_lr_per_img=" + repr(load_config("ns").train.base_lr_per_img))
    assert "learning rate per image" in lines[at + 1]
    at = lines.index("  --config.test.iou_thre=0.65")
    assert "NMS IoU threshold" in lines[at + 1]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                                         if p.stem != "__init__"))
def test_every_config_key_is_explained(name):
    """A key added to a shipped config without a --help explanation fails here."""
    from damo_jax.config import key_help
    missing = [k for k, _ in flat_items(load_config(name)) if not key_help(k)]
    assert not missing, f"configs/{name}.py: keys without an entry in damo_jax.config.KEY_HELP: {missing}"


def test_parse_args_overrides_data_and_runlocal():
    cfg, args = train.parse_args(["--config", "s", "--data", "coco:/x", "--runlocal",
                                  "--config.train.epochs=7", "--config.data.image_size=(320, 320)",
                                  "--config.train.optimizer=adamw", "--config.train.ema=false"])
    assert cfg.data.train == "coco:/x"
    assert cfg.train.epochs == 7                 # override applied after --runlocal
    assert cfg.train.batch_size == 8 and cfg.train.max_steps == 30   # from --runlocal
    assert cfg.data.image_size == (320, 320)
    assert cfg.train.optimizer == "adamw" and cfg.train.ema is False
    assert args.workdir.endswith("s") and not args.multihost


def test_ultralytics_style_short_flags():
    """--epochs / --batch-size / --imgsz (what an Ultralytics user types) set the config keys, are
    validated like them, and are refused beside the override of the same key."""
    from damo_jax.errors import ConfigError
    cfg, _ = train.parse_args(["--config", "t", "--epochs", "40", "--batch-size", "16", "--imgsz", "320"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (40, 16)
    assert tuple(cfg.data.image_size) == tuple(cfg.test.image_size) == (320, 320)
    cfg, _ = train.parse_args(["--config", "s", "--runlocal", "--batch-size", "4"])
    assert cfg.train.batch_size == 4                      # the flag beats --runlocal's 8
    with pytest.raises(ConfigError, match="train.epochs = 0 must be an integer >= 1"):
        train.parse_args(["--config", "t", "--epochs", "0"])
    with pytest.raises(ConfigError, match="train.no_aug_epochs"):
        train.parse_args(["--config", "s", "--epochs", "10"])   # 5 + 16 > 10, as the override
    with pytest.raises(ConfigError, match="--epochs and --config.train.epochs both set"):
        train.parse_args(["--config", "t", "--epochs", "40", "--config.train.epochs=50"])


def test_teacher_short_flags_set_the_distill_keys():
    cfg, _ = train.parse_args(["--config", "s", "--teacher", "m", "--teacher-weights", "/w/m.pth"])
    assert (cfg.distill.teacher, cfg.distill.teacher_weights) == ("m", "/w/m.pth")
    cfg, _ = train.parse_args(["--config", "s", "--config.distill.teacher=l"])
    assert (cfg.distill.teacher, cfg.distill.teacher_weights) == ("l", "")


def test_process_flags_become_jax_environment_and_imply_multihost():
    from damo_jax.cli.train import process_env
    _, args = train.parse_args(["--config", "s", "--coordinator", "10.0.0.1:1234", "--num-processes", "4",
                                "--process-id", "3"])
    assert args.multihost
    env = {}
    process_env(args, env)
    assert env == {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    _, args = train.parse_args(["--config", "s"])
    process_env(args, env := {})
    assert env == {} and not args.multihost


@pytest.mark.parametrize("flags, says", [
    (["--coordinator", "h:1"], "without --num-processes, --process-id"),
    (["--coordinator", "nohostport", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "0 <= I < N"),
])
def test_process_flags_user_mistakes_exit_2(flags, says):
    r = subprocess.run([sys.executable, "-m", "damo_jax.train", "--config", "ns", *flags], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_parse_args_errors_name_the_problem(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--config", "s", "--bogus"])
    assert "--bogus" in capsys.readouterr().err
    with pytest.raises(KeyError, match="train.epoch"):
        train.parse_args(["--config", "s", "--config.train.epoch=3"])


def test_run_length_and_eval_schedule():
    cfg = load_config("s")
    rl = train.run_length(cfg, 118_287)           # COCO train2017: SPEC §9.1 numbers
    assert (rl.steps_per_epoch, rl.total_steps, rl.warmup_steps) == (463, 138_900, 2_315)
    assert rl.no_aug_start_step == 138_900 - 7_408 and rl.last_step == rl.total_steps
    evals = [e for e in range(300) if train.should_eval(cfg, e, rl)]
    assert evals[:3] == [9, 19, 29]               # every 10 epochs ...
    assert list(range(284, 300)) == [e for e in evals if e >= 284]   # ... every epoch in the last 16
    cfg.train.max_steps = 50
    assert train.run_length(cfg, 118_287).last_step == 50


def test_check_finite_names_step_and_terms():
    ok = {"finite": True, "loss_cls": 1.0}
    train.check_finite(ok, 3)
    bad = {"finite": False, "loss_cls": float("nan"), "loss_bbox": 0.5, "loss_dfl": float("inf"),
           "total_loss": float("nan"), "grad_norm": float("nan")}
    with pytest.raises(train.NonFiniteError, match=r"loss_cls, loss_dfl, total_loss, grad_norm at step 12"):
        train.check_finite(bad, 12)


def test_multihost_detection():
    assert not train.multihost_requested(False, {})
    assert train.multihost_requested(True, {})
    assert train.multihost_requested(False, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert train.multihost_requested(False, {"TPU_WORKER_HOSTNAMES": "w0,w1"})
    assert not train.multihost_requested(False, {"TPU_WORKER_HOSTNAMES": "localhost"})
    assert train.multihost_requested(False, {"SLURM_NTASKS": "4"})
    assert not train.multihost_requested(False, {"SLURM_NTASKS": "1"})
