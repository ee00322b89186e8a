"""The training step side by side with the official PyTorch code on this machine: alternating fresh
processes, official first, one ratio per round and their median — the protocol behind every
CPU speed ratio in docs/BENCHMARKS.md ("Side by side with the official code").

    python benchmarks/side_by_side.py --official-python /path/venv/bin/python --repo /path/DAMO-YOLO \\
        --config s --img-size 320 --batch 8 --num-gt 5 --steps 12 --rounds 14

Each round runs ``benchmarks/official_torch.py --mode train`` with the official virtualenv's
interpreter (``--official-python``; ``official_torch.py``'s docstring says how to set one up), then
``benchmarks/train_step.py`` with this interpreter: same config, image size, batch, boxes per image
and timed steps, each in a fresh process, 3 s apart. Each prints a one-line JSON summary last; the
round's ratio is the official median step time / ours, i.e. our images/s over the official
images/s (above 1: damo_jax is faster). Our step is compiled once, by the first round's child
process, into a persistent cache every round loads (``--cache``; a fresh temporary folder by
default), as the train CLI loads its precompiled step.

EMA (``--ema``): ``anchor`` (default) times the official step without its per-step EMA — the step of
``../shared/reference/ANCHORS.md`` — against our recipe step, which has one; ``both`` adds the
official EMA; ``neither`` drops ours (``train_step.py --no-ema``).

``--isa-cap avx2`` runs both codes as an AVX2-only CPU would (the stand-in of bench_train §0zl /
§0zm): ``ONEDNN_MAX_CPU_ISA=AVX2`` on both sides, ``ATEN_CPU_CAPABILITY=avx2`` for PyTorch's own
kernels, ``--xla_cpu_max_isa=AVX2`` added to ``XLA_FLAGS`` for ours. Not reached by any cap: our
native BatchNorm picks its clone from CPUID (forcing the AVX2 one made no measurable difference,
§0zm), nor libraries' own runtime dispatch (XLA's batched dot).

Per round one line is printed as it ends; at the end a Markdown table (rows: official, ours,
ratio) and one JSON line: every round's median step times and ratio, the median ratio, the ratio
of the medians, how many rounds reach ``--bar`` (1.25, issue 11's bar for S@320), the CPU
(``damo_jax.runtime.cpu_model``) and the 1-minute load average before and after. Record all of it,
with the command, in docs/bench_train.md / docs/BENCHMARKS.md. Nothing else should run on the
machine meanwhile; the spread between identical processes (~±5 % on a 2-core host) is why one
round proves nothing and the median over ten or more does.

Exit codes: 0 done; 2 a usage mistake (missing interpreter, checkout or script: one ``error:``
line); 1 a benchmark process failed or printed no JSON summary (its command and last output lines
are printed).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
EMA_CHOICES = ("anchor", "both", "neither")
ISA_CAPS = ("none", "avx2")


class RoundFailed(RuntimeError):
    """A benchmark process failed or printed no JSON summary."""


def parse_args(argv=None) -> argparse.Namespace:
    from damo_jax.cli.common import Parser     # the CLIs' error policy: one error: line, exit 2
    ap = Parser(prog="side_by_side.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--official-python", default=os.environ.get("DAMO_YOLO_PYTHON"),
                    help="the official code's virtualenv interpreter (CPU torch); $DAMO_YOLO_PYTHON")
    ap.add_argument("--repo", default=os.environ.get("DAMO_YOLO_REPO"),
                    help="the official DAMO-YOLO checkout; $DAMO_YOLO_REPO")
    ap.add_argument("--config", default="s", help="model both sides build (official_torch.py's choices)")
    ap.add_argument("--img-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--num-gt", type=int, default=5, help="boxes per image")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per process")
    ap.add_argument("--rounds", type=int, default=10, help="official + ours process pairs")
    ap.add_argument("--ema", choices=EMA_CHOICES, default="anchor",
                    help="anchor: official without EMA vs ours with (default); both; neither")
    ap.add_argument("--isa-cap", choices=ISA_CAPS, default="none",
                    help="avx2: cap oneDNN, PyTorch and XLA to AVX2 on both sides (an AVX2-only CPU's "
                         "stand-in); none (default): each code uses what the CPU has")
    ap.add_argument("--bar", type=float, default=1.25, help="ratio the summary counts rounds against")
    ap.add_argument("--pause", type=float, default=3.0, help="seconds between processes")
    ap.add_argument("--cache", default=None,
                    help="persistent compilation cache for our step (default: a fresh temporary folder)")
    ap.add_argument("--official-script", default=str(HERE / "official_torch.py"), help=argparse.SUPPRESS)
    ap.add_argument("--ours-script", default=str(HERE / "train_step.py"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.official_python:
        ap.error("--official-python (or $DAMO_YOLO_PYTHON) is required: the official code's interpreter")
    if not (os.path.isfile(args.official_python) and os.access(args.official_python, os.X_OK)):
        ap.error(f"--official-python {args.official_python}: not an executable file")
    if not args.repo or not os.path.isdir(args.repo):
        ap.error(f"--repo {args.repo}: not a directory (the official DAMO-YOLO checkout)")
    for flag, path in (("--official-script", args.official_script), ("--ours-script", args.ours_script)):
        if not os.path.isfile(path):
            ap.error(f"{flag} {path}: no such file")
    for flag in ("img_size", "batch", "num_gt", "steps", "rounds"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    return args


def environments(isa_cap: str, cache: str) -> tuple[dict, dict]:
    """(official environment, our environment) of every round (``--isa-cap``, our compile cache)."""
    official, ours = dict(os.environ), dict(os.environ, DAMO_JAX_BENCH_CACHE=cache)
    if isa_cap == "avx2":
        official.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
        ours.update(ONEDNN_MAX_CPU_ISA="AVX2",
                    XLA_FLAGS=" ".join(filter(None, (ours.get("XLA_FLAGS"), "--xla_cpu_max_isa=AVX2"))))
    return official, ours


def commands(args) -> tuple[list[str], list[str]]:
    """(official command, our command) of one round."""
    common = ["--config", args.config, "--img-size", str(args.img_size), "--batch", str(args.batch),
              "--num-gt", str(args.num_gt), "--steps", str(args.steps)]
    official = [args.official_python, args.official_script, "--repo", args.repo, "--mode", "train", *common]
    if args.ema == "both":
        official.append("--ema")
    ours = [sys.executable, args.ours_script, *common]
    if args.ema == "neither":
        ours.append("--no-ema")
    return official, ours


def run_one(cmd: list[str], env: dict | None, what: str, round_no: int) -> dict:
    """The JSON summary (last stdout line) of one benchmark process; RoundFailed otherwise."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    summary = None
    if proc.returncode == 0 and lines:
        try:
            summary = json.loads(lines[-1])
        except json.JSONDecodeError:
            summary = None
    if not isinstance(summary, dict) or not isinstance(summary.get("median_step_s"), (int, float)):
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        why = (f"exit code {proc.returncode}" if proc.returncode else
               "no JSON summary with median_step_s on its last stdout line")
        raise RoundFailed(f"round {round_no}: {what} failed ({why}): {' '.join(cmd)}\n  {tail}")
    return summary


def summarise(official_s: list[float], ours_s: list[float], bar: float) -> dict:
    """Per-round ratios (official / ours step time) and their medians."""
    ratios = [o / u for o, u in zip(official_s, ours_s)]
    return {"official_s": official_s, "ours_s": ours_s, "ratios": [round(r, 4) for r in ratios],
            "median_ratio": round(statistics.median(ratios), 4),
            "official_median_s": round(statistics.median(official_s), 4),
            "ours_median_s": round(statistics.median(ours_s), 4),
            "ratio_of_medians": round(statistics.median(official_s) / statistics.median(ours_s), 4),
            "rounds_at_or_above_bar": sum(r >= bar for r in ratios), "bar": bar}


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:          # --help: 0; a usage mistake: its error line is printed, 2
        return int(e.code or 0)
    from damo_jax.runtime import cpu_model
    cache = args.cache
    if not cache:                             # a fresh cache of this run's own: removed when it ends
        cache = tempfile.mkdtemp(prefix="damo_side_by_side_")
        atexit.register(shutil.rmtree, cache, True)
    official_cmd, ours_cmd = commands(args)
    official_env, ours_env = environments(args.isa_cap, cache)
    started, load0 = datetime.now(timezone.utc), os.getloadavg()[0]
    print(f"side by side: {args.config}@{args.img_size} batch {args.batch}, {args.num_gt} boxes/image, "
          f"{args.steps} steps x {args.rounds} rounds, EMA {args.ema}"
          + (f", both capped to {args.isa_cap.upper()}" if args.isa_cap != "none" else "")
          + f"; {cpu_model()}; load {load0:.2f}",
          flush=True)
    official_s, ours_s = [], []
    try:
        for r in range(1, args.rounds + 1):
            o = run_one(official_cmd, official_env, "official_torch.py", r)   # it changes into --repo itself
            time.sleep(args.pause)
            u = run_one(ours_cmd, ours_env, "train_step.py", r)
            official_s.append(float(o["median_step_s"]))
            ours_s.append(float(u["median_step_s"]))
            print(f"round {r}: official {official_s[-1]:.3f} s, damo_jax {ours_s[-1]:.3f} s, ratio "
                  f"{official_s[-1] / ours_s[-1]:.3f} (load {os.getloadavg()[0]:.2f})", flush=True)
            if r < args.rounds:
                time.sleep(args.pause)
    except RoundFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    res = summarise(official_s, ours_s, args.bar)
    print(f"\n| {args.config}@{args.img_size} b{args.batch} | " + " / ".join(f"round {i}" for i in
                                                                         range(1, args.rounds + 1))
          + " | median |")
    print("|---|---|---|")
    print("| official (s/step) | " + " / ".join(f"{v:.3f}" for v in official_s)
          + f" | {res['official_median_s']:.3f} |")
    print("| damo_jax (s/step) | " + " / ".join(f"{v:.3f}" for v in ours_s) + f" | {res['ours_median_s']:.3f} |")
    print("| ratio | " + " / ".join(f"{v:.3f}" for v in res["ratios"]) + f" | **{res['median_ratio']:.3f}x** |")
    res.update(config=args.config, img_size=args.img_size, batch=args.batch, num_gt=args.num_gt,
               steps=args.steps, rounds=args.rounds, ema=args.ema, isa_cap=args.isa_cap, cpu=cpu_model(),
               cpu_count=os.cpu_count(), loadavg_1m=[round(load0, 2), round(os.getloadavg()[0], 2)],
               started_utc=started.strftime("%Y-%m-%d %H:%M"),
               ended_utc=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
               official_command=" ".join(official_cmd[1:]), ours_command=" ".join(ours_cmd[1:]))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
