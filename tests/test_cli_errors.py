"""Every command x every user mistake of issue 10 (Why-5, item 3): exit code 2, exactly one
``error: ...`` line on stderr naming the flag / key / file, no traceback.

The table runs the commands in-process (their ``main(argv)``: the same parser, loading and error
policy as the console script, without re-importing JAX 50 times); the last tests run the real
entry points in subprocesses (``damo-jax``, ``python -m damo_jax``, ``python -m damo_jax.train``,
``python export/to_onnx.py``) and ``--debug``. Mistakes are caught before JAX compiles anything.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "tests" / "fixtures" / "pth_official.pth"   # exists; never reached by these mistakes


def _cli(name):
    """name -> main(argv) of that command (imported lazily)."""
    if name == "train":
        from damo_jax.cli.train import main
    elif name == "eval":
        from damo_jax.cli.eval import main
    elif name == "predict":
        from damo_jax.cli.predict import main
    elif name == "export onnx":
        from damo_jax.cli.export import main as export_main
        return lambda argv: export_main(["onnx"] + argv)
    elif name == "show":
        from damo_jax.data_pipelines.show import main
    elif name == "info":
        from damo_jax.models.__main__ import main
    elif name == "to_onnx.py":
        from damo_jax.export.to_onnx import main
    return main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    image = root / "img.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    malicious = root / "evil.pth"   # a torch zip whose pickle calls os.system (refused by pth_io)
    marker = root / "pwned"
    cmd = f"touch {marker}".encode()
    payload = b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."
    with zipfile.ZipFile(malicious, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")
    return {"root": root, "image": image, "malicious": malicious, "marker": marker}


def base_args(cli, f, config="demo"):
    """The arguments a correct call of ``cli`` needs (model source, data, output)."""
    out = str(f["root"] / "out")
    return {
        "train": ["--config", config, "--workdir", out, "--no-progress"],
        "eval": ["--config", config, "--weights", str(WEIGHTS), "--data", "demo", "--no-progress"],
        "predict": ["--config", config, "--weights", str(WEIGHTS), "--source", str(f["image"]),
                    "--out", out, "--no-progress"],
        "export onnx": ["--config", config, "--weights", str(WEIGHTS), "--output", out + ".onnx"],
        "to_onnx.py": ["--config", config, "--weights", str(WEIGHTS), "--output", out + ".onnx"],
        "show": ["--config", config, "--data", "demo", "--out", out + ".png"],
        "info": ["--config", config],
    }[cli]


def without(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2:]


CLIS = ("train", "eval", "predict", "export onnx", "to_onnx.py", "show", "info")


# a config .py that fails when it runs (a user's file): (text, what the error line says)
CONFIG_FILE_MISTAKES = {
    "config file import fails": ("import no_such_module_xyz\n",
                                 "importing it raised ModuleNotFoundError: No module named "
                                 "'no_such_module_xyz' (line 1)"),
    "get_config raises": ("def get_config():\n    raise ValueError('boom')\n",
                          "get_config() raised ValueError: boom (line 2)"),
    "get_config takes an argument": ("def get_config(x):\n    return x\n",
                                     "get_config() raised TypeError"),
    "get_config returns a dict": ("def get_config():\n    return {'train': {}}\n",
                                  "get_config() returned a dict, expected an ml_collections.ConfigDict"),
    "config value of the wrong type": (
        "from damo_jax.config import load_config\n\ndef get_config():\n    c = load_config('demo')\n"
        "    c.train.batch_size = 'eight'\n    return c\n",
        "get_config() raised TypeError: Could not override field 'batch_size'"),
    # a typo makes a new key no code reads: the default was kept silently (researcher audit)
    "config file key typo": (
        "from damo_jax.config import load_config\n\ndef get_config():\n    c = load_config('demo')\n"
        "    c.model.neck.hiden_ratio = 0.5\n    return c\n",
        "unknown key model.neck.hiden_ratio; did you mean model.neck.hidden_ratio?"),
}
# a variant config whose parts do not fit: one line naming the keys, before anything is built
ARCHITECTURE_MISTAKE = (
    "from damo_jax.config import load_config\n\ndef get_config():\n    c = load_config('demo')\n"
    "    c.model.neck.out_channels = (96, 192, 384)\n    return c\n",
    "model.head.in_channels = (64, 128, 256) must equal model.neck.out_channels (96, 192, 384)")


def mistakes(f):
    """(cli, mistake) -> (argv, text the error line must contain)."""
    table = {}
    for cli in CLIS:
        base = base_args(cli, f)
        table[cli, "unknown config name"] = (base_args(cli, f, config="nosuchmodel"), "nosuchmodel")
        table[cli, "config name typo"] = (base_args(cli, f, config="dmeo"), "did you mean 'demo'?")
        for mistake, (text, must) in CONFIG_FILE_MISTAKES.items():
            path = f["root"] / "cfgs" / f"{mistake.replace(' ', '_')}.py"
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            table[cli, mistake] = (base_args(cli, f, config=str(path)), f"config file {path}: {must}")
        path = f["root"] / "cfgs" / "architecture_mismatch.py"
        path.write_text(ARCHITECTURE_MISTAKE[0])
        table[cli, "architecture mismatch"] = (base_args(cli, f, config=str(path)), ARCHITECTURE_MISTAKE[1])
        table[cli, "batch_size=abc"] = (base + ["--config.train.batch_size=abc"], "train.batch_size")
        table[cli, "batch_size=0"] = (base + ["--config.train.batch_size=0"], "train.batch_size")
        table[cli, "misspelt key"] = (base + ["--config.train.bach_size=3"], "bach_size")
        table[cli, "--img-size 100"] = (base + ["--img-size", "100"], "--img-size")
        table[cli, "bad flag"] = (base + ["--no-such-flag"], "--no-such-flag")
    for cli in ("train", "eval", "show"):
        base = base_args(cli, f)
        table[cli, "missing --data folder"] = (without(base, "--data") if "--data" in base else base)
        table[cli, "missing --data folder"] += ["--data", "/no/such/folder"]
        table[cli, "missing --data folder"] = (table[cli, "missing --data folder"], "/no/such/folder")
        table[cli, "coco: folder missing"] = (
            (without(base, "--data") if "--data" in base else base) + ["--data", "coco:/no/coco"],
            "/no/coco")
    table["predict", "missing --source"] = (
        without(base_args("predict", f), "--source") + ["--source", "/no/such.jpg"], "--source")
    for cli in ("eval", "predict", "export onnx", "to_onnx.py"):
        base = without(without(base_args(cli, f), "--config"), "--weights")
        table[cli, "--checkpoint missing dir"] = (base + ["--checkpoint", "/no/such/run"],
                                                  "--checkpoint /no/such/run")
        table[cli, "--weights missing file"] = (base_args(cli, f)[:3] + ["/no/w.pth"]
                                                + base_args(cli, f)[4:], "/no/w.pth")
        table[cli, "malicious .pth"] = (base_args(cli, f)[:3] + [str(f["malicious"])]
                                        + base_args(cli, f)[4:], "evil.pth")
        table[cli, "--weights without --config"] = (without(base_args(cli, f), "--config"),
                                                    "--config")
    for cli in ("eval", "predict"):
        table[cli, "no model source"] = (without(base_args(cli, f), "--weights"), "--checkpoint")
    table["train", "empty --workdir"] = (without(base_args("train", f), "--workdir")
                                         + ["--workdir", ""], "--workdir: an empty value")
    table["eval", "empty --out"] = (base_args("eval", f) + ["--out", ""], "--out: an empty value")
    table["predict", "blank --out"] = (without(base_args("predict", f), "--out") + ["--out", " "],
                                       "--out: an empty value")
    table["train", "missing finetune file"] = (
        base_args("train", f) + ["--config.train.finetune=/no/such.pth"], "train.finetune")
    table["train", "finetune given a run folder"] = (
        base_args("train", f) + [f"--config.train.finetune={f['root']}"],
        "is a folder; finetune takes a weights file")
    table["train", "unknown config section"] = (base_args("train", f) + ["--config.trian.epochs=1"],
                                                "trian")
    table["train", "bad grad_impl"] = (base_args("train", f) + ["--config.model.grad_impl=fast"],
                                       "model.grad_impl")
    under_file = str(f["image"] / "sub")          # a folder can't be made there (not even by root)
    for cli, flag, ext in (("train", "--workdir", ".png"), ("predict", "--out", ".png"),
                           ("export onnx", "--output", ".onnx"), ("to_onnx.py", "--output", ".onnx"),
                           ("show", "--out", ".png")):
        table[cli, "output under a file"] = (without(base_args(cli, f), flag) + [flag, under_file + ext],
                                             f"{flag} {under_file}{ext}: cannot create")
        url = f"gs://bucket/run/x{ext}"          # Path() would make it a local folder 'gs:'
        table[cli, "output is a URL"] = (without(base_args(cli, f), flag) + [flag, url],
                                         f"{flag} {url}: a URL; outputs are written to local paths")
    for flag in ("--json-out", "--stats-out", "--out"):
        table["eval", f"{flag} a URL"] = (base_args("eval", f) + [flag, "s3://b/x.json"],
                                         f"{flag} s3://b/x.json: a URL")
        table["eval", f"{flag} under a file"] = (base_args("eval", f) + [flag, under_file + "/x"],
                                                f"{flag} {under_file}/x: cannot create")
    not_a_run = f["root"] / "not_a_run"
    not_a_run.mkdir(exist_ok=True)
    for cli in ("eval", "predict"):
        table[cli, "--checkpoint a file"] = (
            without(without(base_args(cli, f), "--config"), "--weights") + ["--checkpoint", str(f["image"])],
            "is a file; expected a training run folder")
        table[cli, "--config a folder that is not a run"] = (
            without(without(base_args(cli, f), "--config"), "--weights") + ["--config", str(not_a_run)],
            f"--config {not_a_run}: no complete checkpoint")      # the flag the user gave
    table["show", "--out not an image"] = (without(base_args("show", f), "--out") + ["--out", "grid.txt"],
                                           "--out grid.txt: not an image")
    table["info", "--img-size three values"] = (["--config", "demo", "--img-size", "64", "64", "64"],
                                                "--img-size")
    return table


CASES = [("train", "unknown config name"), ("train", "missing --data folder"),
         ("train", "batch_size=abc"), ("train", "batch_size=0"), ("train", "misspelt key"),
         ("train", "--img-size 100"), ("train", "missing finetune file"), ("train", "bad flag"),
         ("train", "finetune given a run folder"),
         ("train", "unknown config section"), ("train", "coco: folder missing"),
         ("train", "bad grad_impl")]
CASES += [(cli, m) for cli in CLIS for m in ("config name typo", *CONFIG_FILE_MISTAKES, "architecture mismatch")]
CASES += [(cli, m) for cli in CLIS[1:] for m in (
    "unknown config name", "batch_size=abc", "batch_size=0", "misspelt key", "--img-size 100",
    "bad flag")]
CASES += [(cli, m) for cli in ("eval", "show") for m in ("missing --data folder", "coco: folder missing")]
CASES += [(cli, m) for cli in ("eval", "predict", "export onnx", "to_onnx.py") for m in (
    "--checkpoint missing dir", "--weights missing file", "malicious .pth", "--weights without --config")]
CASES += [(cli, "output under a file") for cli in ("train", "predict", "export onnx", "to_onnx.py", "show")]
CASES += [(cli, "output is a URL") for cli in ("train", "predict", "export onnx", "to_onnx.py", "show")]
CASES += [("eval", f"{flag} a URL") for flag in ("--json-out", "--stats-out", "--out")]
CASES += [("show", "--out not an image")]
CASES += [(cli, m) for cli in ("eval", "predict") for m in ("--config a folder that is not a run",
                                                             "--checkpoint a file")]
CASES += [("eval", f"{flag} under a file") for flag in ("--json-out", "--stats-out", "--out")]
CASES += [("eval", "no model source"), ("predict", "no model source"), ("predict", "missing --source"),
          ("info", "--img-size three values"), ("train", "empty --workdir"),
          ("predict", "blank --out"), ("eval", "empty --out")]


def assert_one_error_line(err: str, must_contain: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    assert must_contain in lines[0], (must_contain, lines[0])
    return lines[0]


@pytest.mark.parametrize("cli,mistake", CASES, ids=[f"{c}|{m}" for c, m in CASES])
def test_user_mistake_is_one_error_line_and_exit_2(cli, mistake, files, capsys):
    argv, must_contain = mistakes(files)[cli, mistake]
    with pytest.raises(SystemExit) as info:
        _cli(cli)(argv)
    assert info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, must_contain)
    assert not files["marker"].exists()     # the malicious pickle never ran


def test_onednn_asked_for_but_unavailable_is_a_user_error(files, capsys, monkeypatch):
    """``model.grad_impl=onednn`` where libdnnl.so.3 does not load: one error line with the reason."""
    from damo_jax.models import onednn
    monkeypatch.setattr(onednn, "available", lambda: False)
    monkeypatch.setattr(onednn, "unavailable_reason", lambda: "libdnnl.so.3 not found: /x: missing")
    with pytest.raises(SystemExit) as info:
        _cli("train")(base_args("train", files) + ["--config.model.grad_impl=onednn"])
    assert info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "grad_impl='onednn': libdnnl.so.3 not found")


def run(cmd, **env):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **env})


@pytest.mark.parametrize("cmd,must_contain", [
    (["-m", "damo_jax", "train", "--config", "nosuchmodel"], "nosuchmodel"),
    (["-m", "damo_jax.train", "--config", "demo", "--config.train.batch_size=abc"], "batch_size"),
    (["export/to_onnx.py", "--config", "demo", "--img-size", "100", "--output", "/tmp/x.onnx"],
     "--img-size"),
    (["-m", "damo_jax", "predict", "--checkpoint", "/no/such/run", "--source", "{image}"],
     "--checkpoint /no/such/run"),
    (["-m", "damo_jax", "nosuchcommand"], "nosuchcommand"),
])
def test_entry_points_subprocess(cmd, must_contain, files):
    r = run([sys.executable] + [a.format(image=files["image"]) for a in cmd])
    assert r.returncode == 2, r.stderr
    assert_one_error_line(r.stderr, must_contain)


def test_debug_shows_the_traceback():
    r = run([sys.executable, "-m", "damo_jax", "info", "--config", "nosuchmodel", "--debug"])
    assert r.returncode != 0 and "Traceback" in r.stderr and "InputPathError" in r.stderr
    r = run([sys.executable, "-m", "damo_jax", "info", "--config", "nosuchmodel"], DAMO_JAX_DEBUG="1")
    assert "Traceback" in r.stderr


def test_help_of_every_command_has_examples():
    from damo_jax.cli import COMMANDS
    for name in COMMANDS:
        r = run([sys.executable, "-m", "damo_jax", name, "--help"])
        assert r.returncode == 0, (name, r.stderr)
        assert "example" in r.stdout and "damo-jax" in r.stdout, name
        # the commands take --config.KEY=VALUE overrides and say so (train lists every key;
        # export's targets below)
        assert name == "export" or "--config.KEY=VALUE" in r.stdout, name
    for sub in ("onnx", "int8"):
        r = run([sys.executable, "-m", "damo_jax", "export", sub, "--help"])
        assert r.returncode == 0 and "Config overrides: --config.KEY=VALUE" in r.stdout, (sub, r.stderr)


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    """Ctrl-C in any command (here: while it runs): ``interrupted``, exit 130, no traceback;
    ``--debug`` keeps the KeyboardInterrupt."""
    from damo_jax.cli.common import run_cli

    def body(argv):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as info:
        run_cli(body, ["--no-progress"])
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["interrupted"], err
    with pytest.raises(KeyboardInterrupt):
        run_cli(body, ["--debug"])


# ------------------------------------------------------------- predict / eval / export input audit
def _expect_error(cli, argv, must_contain, capsys):
    with pytest.raises(SystemExit) as info:
        _cli(cli)(argv)
    assert info.value.code == 2
    return assert_one_error_line(capsys.readouterr().err, must_contain)


@pytest.mark.parametrize("flags,must_contain", [
    (["--batch-size", "0"], "--batch-size 0"), (["--batch-size", "-1"], "--batch-size -1"),
    (["--conf", "-1"], "--conf -1.0"), (["--conf", "1.5"], "--conf 1.5"),
    (["--conf", "nan"], "--conf nan"), (["--conf", "inf"], "--conf inf"),
    (["--iou", "-0.5"], "--iou -0.5"), (["--iou", "2"], "--iou 2.0"), (["--iou", "nan"], "--iou nan"),
    (["--max-dets", "0"], "--max-dets 0")])
def test_predict_option_ranges(flags, must_contain, files, capsys):
    _expect_error("predict", base_args("predict", files) + flags, must_contain, capsys)


@pytest.mark.parametrize("cli,flags,must_contain", [
    ("predict", ["--overlap", "0.3"], "--overlap 0.3: needs --tile"),
    ("eval", ["--overlap", "0.3"], "--overlap 0.3: needs --tile"),
    ("eval", ["--config.test.conf_thre=5"], "test.conf_thre = 5"),
    ("eval", ["--config.test.iou_thre=-1"], "test.iou_thre = -1"),
    ("predict", ["--config.test.max_dets=0"], "test.max_dets = 0")])
def test_tile_and_threshold_options_without_effect_or_out_of_range(cli, flags, must_contain, files,
                                                                    capsys):
    """--overlap without --tile was silently ignored; thresholds set through --config.test.*
    bypassed the --conf / --iou checks."""
    _expect_error(cli, base_args(cli, files) + flags, must_contain, capsys)


@pytest.mark.parametrize("flags,must_contain", [
    (["--max-dets", "0"], "--max-dets 0"), (["--max-dets", "-5"], "--max-dets -5"),
    (["--batch-size", "0"], "--batch-size 0"), (["--pre-nms-topk", "0"], "--pre-nms-topk 0"),
    (["--conf", "1.5"], "--conf 1.5"), (["--conf", "nan"], "--conf nan"),
    (["--iou", "-0.5"], "--iou -0.5"), (["--iou", "nan"], "--iou nan")])
def test_eval_option_ranges(flags, must_contain, files, capsys):
    _expect_error("eval", base_args("eval", files) + flags, must_contain, capsys)


def test_predict_out_equal_to_or_inside_source_is_refused(files, tmp_path, capsys):
    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(np.full((32, 32, 3), 9, np.uint8)).save(src / "a.png")
    before = (src / "a.png").read_bytes()
    argv = without(without(base_args("predict", files), "--source"), "--out")
    _expect_error("predict", argv + ["--source", str(src), "--out", str(src)],
                  "is the --source folder", capsys)
    _expect_error("predict", argv + ["--source", str(src), "--out", str(src / "preds")],
                  "inside the --source folder", capsys)
    _expect_error("predict", argv + ["--source", str(src / "a.png"), "--out", str(src)],
                  "would replace the input image", capsys)
    assert (src / "a.png").read_bytes() == before and not (src / "preds").exists()


def test_predict_out_is_source_entry_point_subprocess(files, tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(src / "a.png")
    r = run([sys.executable, "-m", "damo_jax", "predict", "--config", "demo", "--weights",
             str(WEIGHTS), "--source", str(src), "--out", str(src) + "/", "--no-progress"])
    assert r.returncode == 2, r.stderr
    assert_one_error_line(r.stderr, "--out")


def _random_bytes(path, n=5000):
    path.write_bytes(np.random.default_rng(1).integers(0, 256, n, np.uint8).tobytes())
    return path


@pytest.mark.parametrize("cli", ["predict", "eval"])
def test_corrupt_onnx_file_is_one_error_line(cli, files, tmp_path, capsys):
    bad = _random_bytes(tmp_path / "bad.onnx")
    argv = without(base_args(cli, files), "--weights") + ["--onnx", str(bad)]
    _expect_error(cli, argv, f"--onnx {bad}: cannot be read as an ONNX model", capsys)


def test_corrupt_openvino_files_are_one_error_line(files, tmp_path, capsys):
    pytest.importorskip("openvino")
    bad = tmp_path / "bad.xml"
    bad.write_text("<net")
    argv = without(base_args("predict", files), "--weights")
    _expect_error("predict", argv + ["--openvino", str(bad)], "bad.bin is missing", capsys)
    bad.with_suffix(".bin").write_bytes(b"\0" * 16)
    _expect_error("predict", argv + ["--openvino", str(bad)],
                  f"--openvino {bad}: cannot be read as an OpenVINO IR", capsys)


@pytest.mark.parametrize("target", ["openvino", "tensorrt"])
def test_export_from_a_non_onnx_file_is_one_error_line(target, tmp_path, capsys):
    from damo_jax.cli.export import main
    jpg = tmp_path / "notamodel.jpg"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(jpg)
    out = str(tmp_path / ("m.xml" if target == "openvino" else "m.engine"))
    with pytest.raises(SystemExit) as info:
        main([target, "--onnx", str(jpg), "--output", out])
    assert info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, f"--onnx {jpg}: cannot be read as an ONNX model")


def test_export_tensorrt_without_tensorrt_is_one_error_line(tmp_path, capsys, monkeypatch):
    from test_predict import write_handmade_onnx

    from damo_jax.cli.export import main
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # not importable
    with pytest.raises(SystemExit) as info:
        main(["tensorrt", "--onnx", str(onnx_file), "--output", str(tmp_path / "m.engine")])
    assert info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "TensorRT's Python package is not installed")


def test_predict_partial_checkpoint_is_one_error_line(files, tmp_path, capsys):
    import shutil

    import jax.numpy as jnp

    from damo_jax.config import load_config
    from damo_jax.train import checkpoint
    params = {"w": jnp.ones(4)}
    state = {"params": params, "batch_stats": {}, "opt_state": {"count": jnp.zeros((), jnp.int32)},
             "step": jnp.asarray(1, jnp.int32), "rng": jnp.zeros((2,), jnp.uint32),
             "ema_params": params, "ema_batch_stats": {}}
    meta = {"config": checkpoint.config_to_json(load_config("demo")), "class_names": ["x"]}
    with checkpoint.Checkpoints(tmp_path / "run" / "checkpoints", async_save=False) as ck:
        ck.save(100, state, meta)
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "100" / "ema")
    argv = without(without(base_args("predict", files), "--config"), "--weights")
    _expect_error("predict", argv + ["--checkpoint", str(tmp_path / "run")],
                  f"--checkpoint {tmp_path / 'run'}: step 100 ", capsys)


@pytest.mark.parametrize("override,must_contain", [
    ("log_every_steps=0", "train.log_every_steps = 0 must be an integer >= 1"),     # was a ZeroDivisionError
    ("keep_checkpoints=0", "train.keep_checkpoints = 0 must be an integer >= 1"),   # was silently 1
    ("max_steps=-1", "train.max_steps = -1 must be an integer >= 0"),               # was the full schedule
    ("eval_every_epochs=-1", "train.eval_every_epochs = -1 must be an integer >= 0"),
    ("ckpt_every_steps=-5", "train.ckpt_every_steps = -5 must be an integer >= 0"),
    ("warmup_epochs=-1", "train.warmup_epochs = -1"),
    ("no_aug_epochs=-5", "train.no_aug_epochs = -5")])
def test_train_schedule_values_out_of_range(override, must_contain, files, capsys):
    _expect_error("train", base_args("train", files) + [f"--config.train.{override}"], must_contain,
                  capsys)
    assert not (files["root"] / "out" / "checkpoints").exists()


@pytest.mark.parametrize("override,must_contain", [
    # each crashed deep in the run with a traceback, or trained silently with the value
    ("train.optimizer=adam", "train.optimizer = 'adam' must be one of sgd, adamw"),
    ("data.loader=foo", "data.loader = 'foo' must be one of process, grain"),
    ("data.max_boxes=0", "data.max_boxes = 0 must be an integer >= 1"),
    ("model.dtype=float64", "model.dtype = 'float64' must be one of float32, bfloat16, float16"),
    ("train.base_lr_per_img=-1.0", "train.base_lr_per_img = -1.0 must be a number > 0"),
    ("train.weight_decay=-1.0", "train.weight_decay = -1.0 must be a number >= 0"),
    ("train.ema_decay=2.0", "train.ema_decay = 2.0 must be a number in [0, 1)"),
    ("data.mosaic_prob=3.0", "data.mosaic_prob = 3.0 must be a number in [0, 1]"),
    # a schedule that is all warm-up and no-augmentation tail (min lr from the first step)
    ("train.epochs=1", "train.warmup_epochs (0.3) + train.no_aug_epochs (1) > train.epochs (1)"),
    # replaced by the training data's without a word
    ("model.class_names=('a', 'b')", "--config.model.class_names: a training run takes the class"),
    ("model.head.num_classes=5", "--config.model.head.num_classes: a training run takes the class")])
def test_train_recipe_values_out_of_range(override, must_contain, files, capsys):
    _expect_error("train", base_args("train", files) + [f"--config.{override}"], must_contain, capsys)
    assert not (files["root"] / "out" / "checkpoints").exists()


@pytest.mark.parametrize("cli,override,must_contain", [
    # the choices were checked for training only: a TypeError traceback where a model is built
    ("info", "model.dtype=bogus", "model.dtype = 'bogus' must be one of float32, bfloat16, float16"),
    ("eval", "model.dtype=bogus", "model.dtype = 'bogus' must be one of float32, bfloat16, float16"),
    ("predict", "model.dtype=bogus", "model.dtype = 'bogus' must be one of"),
    ("info", "model.backbone.out_indices=(2,4,9)", "model.backbone.out_indices = (2, 4, 9) indexes a "
     "stage TinyNAS_res does not have"),                   # was "not enough values to unpack"
    ("info", "model.neck.block_name=foo", "model.neck.block_name = 'foo' is not supported"),
    # numpy's "high - low < 0" traceback, in show and train
    ("show", "data.shear=-3", "data.shear = -3.0 must be a number in [0, 45)"),
    ("show", "data.degrees=-5", "data.degrees = -5.0 must be a number in [0, 180]"),
    ("show", "data.translate=5", "data.translate = 5.0 must be a number in [0, 0.5]"),
    ("train", "data.translate=-0.2", "data.translate = -0.2 must be a number in [0, 0.5]"),
    # failed after the teacher was loaded and evaluated / a non-finite loss at step 0
    ("train", "distill.method=foo", "distill.method = 'foo' must be one of cwd, mimic"),
    ("train", "distill.tau=0", "distill.tau = 0.0 must be a number > 0")])
def test_config_values_are_checked_by_every_command_that_uses_them(cli, override, must_contain, files,
                                                                     capsys):
    config = "t" if cli == "info" else "demo"
    _expect_error(cli, base_args(cli, files, config) + [f"--config.{override}"], must_contain, capsys)
    assert not (files["root"] / "out" / "checkpoints").exists()


def test_batch_not_divisible_by_the_devices_is_one_error_line(files, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "damo_jax.train", "--config", "demo", "--workdir",
                           str(tmp_path / "run"), "--no-progress", "--config.train.batch_size=3"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert_one_error_line(proc.stderr, "train.batch_size=3 is not divisible by the 2 devices")
    assert "use a batch that is a multiple of 2 (--batch-size), or run on 1 device(s)" in proc.stderr


def test_failed_commands_leave_no_empty_output_folder_and_name_the_real_cause(files, tmp_path, capsys):
    """A predict that failed on its model left the --out folder it had created (empty); --weights
    given a training run folder said "file not found"; an IR without its .bin said it held no
    export metadata."""
    out = tmp_path / "new" / "preds"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    argv = without(without(base_args("predict", files), "--out"), "--weights")
    _expect_error("predict", argv + ["--out", str(out), "--weights", str(run)],
                  f"--weights {run}: is a folder, expected a file; a training run directory goes to "
                  f"--checkpoint", capsys)
    assert not (tmp_path / "new").exists()
    xml = tmp_path / "m.xml"
    xml.write_text("<net/>")
    _expect_error("predict", without(argv, "--config") + ["--out", str(out), "--openvino", str(xml)],
                  f"--openvino {xml}: its weights file m.bin is missing", capsys)
    assert not (tmp_path / "new").exists()
    weights_file = tmp_path / "m.bin"             # the IR's other half given by mistake
    weights_file.write_bytes(b"\0" * 64)
    _expect_error("predict", without(argv, "--config") + ["--out", str(out), "--openvino", str(weights_file)],
                  f"--openvino {weights_file}: expected a .xml/.onnx file (the .xml of an OpenVINO IR", capsys)


def test_flags_that_would_be_ignored_are_refused(files, tmp_path, capsys):
    """Flags that did nothing in the combination given, silently: eval --no-fuse with an exported
    file, openvino --keep-onnx with --onnx, int8 --mixed below 0."""
    from damo_jax.cli.export import main as export_main
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not used")
    argv = without(base_args("eval", files), "--weights")
    _expect_error("eval", argv + ["--onnx", str(onnx_file), "--no-fuse"],
                  "--no-fuse: evaluates the JAX train graph", capsys)
    with pytest.raises(SystemExit) as info:
        export_main(["openvino", "--onnx", str(onnx_file), "--keep-onnx", "--output", str(tmp_path / "m.xml")])
    assert info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "--keep-onnx keeps the ONNX file this command exports")
    with pytest.raises(SystemExit) as info:
        export_main(["int8", "--config", "demo", "--onnx", str(onnx_file), "--calib-data", "demo",
                     "--mixed", "-1", "--output-dir", str(tmp_path / "q")])
    assert info.value.code == 2
    assert_one_error_line(capsys.readouterr().err, "--mixed -1: the number of Convs kept in float")
    assert not (tmp_path / "q").exists()          # the failed command leaves no empty folder


def test_a_flag_and_a_config_override_of_one_setting_are_refused(files, capsys):
    """--img-size beside --config.data.image_size (train), --iou beside --config.test.iou_thre
    (eval), --conf beside --config.test.conf_thre (predict): one of the two used to win silently."""
    _expect_error("train", base_args("train", files) + ["--img-size", "64",
                                                        "--config.data.image_size=(96, 96)"],
                  "--img-size and --config.data.image_size both set data.image_size", capsys)
    _expect_error("train", base_args("train", files) + ["--data", "demo", "--config.data.train=demo"],
                  "--data and --config.data.train both set", capsys)
    _expect_error("eval", base_args("eval", files) + ["--iou", "0.5", "--config.test.iou_thre=0.6"],
                  "--iou and --config.test.iou_thre both set", capsys)
    _expect_error("predict", base_args("predict", files) + ["--conf", "0.5",
                                                            "--config.test.conf_thre=0.1"],
                  "--conf and --config.test.conf_thre both set", capsys)


def test_predict_takes_the_score_threshold_from_flag_override_or_its_default():
    from argparse import Namespace
    from damo_jax.cli.predict import PREDICT_CONF, predict_conf
    assert predict_conf(Namespace(conf=None), []) == PREDICT_CONF == 0.3
    assert predict_conf(Namespace(conf=0.6), []) == 0.6
    assert predict_conf(Namespace(conf=None), ["--config.test.conf_thre=0.1"]) is None  # the config's
