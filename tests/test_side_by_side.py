"""benchmarks/side_by_side.py end to end with stand-in benchmark scripts: alternation order, the
arguments each side gets, per-round ratios and medians (expected values computed here from the
stand-ins' step times, not by the runner), and its failure modes (usage mistake: one error line,
exit 2; a failed benchmark process: exit 1 naming it)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "side_by_side.py"

# Each stand-in appends (side, argv) to a log and prints a JSON summary whose median step time is
# taken from a per-side list by its call count: official 1.00, 0.90, 1.10, 0.95 s; ours 0.80, 0.80,
# 0.70, 0.90 s.
STUB = textwrap.dedent("""
    import json, os, sys
    side, log, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    times = {"official": [1.00, 0.90, 1.10, 0.95], "ours": [0.80, 0.80, 0.70, 0.90]}[side]
    calls = [json.loads(l) for l in open(log)] if os.path.exists(log) else []
    k = sum(c["side"] == side for c in calls)
    with open(log, "a") as f:
        f.write(json.dumps({"side": side, "argv": argv, "cache": os.environ.get("DAMO_JAX_BENCH_CACHE"),
                            "env": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                                                                   "XLA_FLAGS")}}) + "\\n")
    if os.environ.get("SBS_FAIL") == side:
        print("boom: the model did not build", file=sys.stderr)
        sys.exit(3)
    print("some table line")
    print(json.dumps({"median_step_s": times[k]}))
""")


@pytest.fixture
def stubs(tmp_path):
    """(official interpreter, official script, our script, log path, repo dir)."""
    log = tmp_path / "calls.jsonl"
    body = tmp_path / "stub_body.py"
    body.write_text(STUB)
    # the "official interpreter" is a shell script running this Python on the stand-in
    official_py = tmp_path / "official-python"
    official_py.write_text(f"#!/bin/sh\nexec {sys.executable} {body} official {log} \"$@\"\n")
    official_py.chmod(0o755)
    official_script = tmp_path / "official_torch.py"     # only passed through; the stub ignores it
    official_script.write_text("")
    ours_script = tmp_path / "train_step.py"
    ours_script.write_text(f"import runpy, sys\nsys.argv = [{str(body)!r}, 'ours', {str(log)!r}] + sys.argv[1:]\n"
                           f"runpy.run_path({str(body)!r}, run_name='__main__')\n")
    repo = tmp_path / "DAMO-YOLO"
    repo.mkdir()
    return official_py, official_script, ours_script, log, repo


def _run(stubs, *extra, env_extra=None):
    official_py, official_script, ours_script, log, repo = stubs
    cmd = [sys.executable, str(RUNNER), "--official-python", str(official_py), "--repo", str(repo),
           "--official-script", str(official_script), "--ours-script", str(ours_script),
           "--pause", "0", *extra]
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_alternates_official_first_and_reports_ratios_and_medians(stubs, tmp_path):
    official_py, official_script, ours_script, log, repo = stubs
    cache = tmp_path / "cache"
    proc = _run(stubs, "--rounds", "4", "--config", "ns", "--img-size", "416", "--batch", "4",
                "--num-gt", "7", "--steps", "9", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c["side"] for c in calls] == ["official", "ours"] * 4
    common = ["--config", "ns", "--img-size", "416", "--batch", "4", "--num-gt", "7", "--steps", "9"]
    official_argv, ours_argv = calls[0]["argv"], calls[1]["argv"]
    assert official_argv[0] == str(official_script)
    assert official_argv[1:] == ["--repo", str(repo), "--mode", "train", *common]   # anchor: no --ema
    assert ours_argv == common                                                     # ours keeps its EMA
    assert {c["cache"] for c in calls if c["side"] == "ours"} == {str(cache)}      # one shared cache
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    official, ours = [1.00, 0.90, 1.10, 0.95], [0.80, 0.80, 0.70, 0.90]
    ratios = [o / u for o, u in zip(official, ours)]          # 1.25, 1.125, 1.5714, 1.0556
    assert summary["official_s"] == official and summary["ours_s"] == ours
    assert summary["ratios"] == pytest.approx(ratios, abs=1e-4)
    assert summary["median_ratio"] == pytest.approx(statistics.median(ratios), abs=1e-4)   # 1.1875
    assert summary["ratio_of_medians"] == pytest.approx(0.975 / 0.80, abs=1e-4)
    assert summary["rounds_at_or_above_bar"] == 2                 # 1.25 counts, 1.125 / 1.056 do not
    assert summary["config"] == "ns" and summary["rounds"] == 4 and summary["ema"] == "anchor"
    assert "round 3: official 1.100 s, damo_jax 0.700 s, ratio 1.571" in proc.stdout
    assert "| ratio | 1.250 / 1.125 / 1.571 / 1.056 | **1.188x** |" in proc.stdout


@pytest.mark.parametrize("ema, official_flag, ours_flag", [("both", True, False), ("neither", False, True)])
def test_ema_modes_reach_the_right_side(stubs, ema, official_flag, ours_flag):
    log = stubs[3]
    proc = _run(stubs, "--rounds", "1", "--ema", ema)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert ("--ema" in calls[0]["argv"]) is official_flag
    assert ("--no-ema" in calls[1]["argv"]) is ours_flag
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ema"] == ema
    cache = calls[1]["cache"]                 # no --cache: a fresh folder of the run's own ...
    assert cache and Path(cache).name.startswith("damo_side_by_side_")
    assert not Path(cache).exists()           # ... removed when the run ends


def test_isa_cap_reaches_each_side_as_its_own_variables(stubs):
    """--isa-cap avx2: oneDNN capped on both sides, PyTorch's ATen on the official side, XLA (added
    to the XLA_FLAGS already set) on ours; without it, the environment is left as it is."""
    log = stubs[3]
    clean = {"ONEDNN_MAX_CPU_ISA": "", "ATEN_CPU_CAPABILITY": "", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    proc = _run(stubs, "--rounds", "1", env_extra=clean)
    assert proc.returncode == 0, proc.stderr
    proc = _run(stubs, "--rounds", "1", "--isa-cap", "avx2", env_extra=clean)
    assert proc.returncode == 0, proc.stderr
    plain_official, plain_ours, official, ours = [json.loads(line)["env"] for line in log.read_text().splitlines()]
    assert plain_official == plain_ours == clean
    assert official == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                        "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert ours == {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "",
                    "XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_cpu_max_isa=AVX2"}
    assert json.loads(proc.stdout.strip().splitlines()[-1])["isa_cap"] == "avx2"
    assert "both capped to AVX2" in proc.stdout.splitlines()[0]


@pytest.mark.parametrize("failing", ["official", "ours"])
def test_a_failed_benchmark_process_exits_1_naming_it(stubs, failing):
    proc = _run(stubs, "--rounds", "2", env_extra={"SBS_FAIL": failing})
    assert proc.returncode == 1
    name = "official_torch.py" if failing == "official" else "train_step.py"
    assert f"error: round 1: {name} failed (exit code 3)" in proc.stderr
    assert "boom: the model did not build" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_usage_mistakes_are_one_error_line_exit_2(stubs, tmp_path):
    official_py, official_script, ours_script, log, repo = stubs
    cases = [
        (["--official-python", str(tmp_path / "missing-python"), "--repo", str(repo)], "--official-python"),
        (["--official-python", str(official_py), "--repo", str(tmp_path / "no-checkout")], "--repo"),
        (["--official-python", str(official_py), "--repo", str(repo), "--rounds", "0"], "--rounds 0"),
    ]
    for args, flag in cases:
        proc = subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], proc.stderr
    assert not log.exists()                                      # nothing was run
