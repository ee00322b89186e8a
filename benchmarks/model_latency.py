"""Forward latency of the jitted model, batch 1 (train graph and fully folded deploy graph).

    python benchmarks/model_latency.py [--models t:640 ns:416] [--runs 20] [--out docs/bench_models.md]

Random (initialised) weights; the deploy variables come from ``reparam.fuse(..., fuse_bn=True)``.
Reports the median (and min / p90) over ``--runs`` timed calls after 3 warm-up calls, compile
time, the device and the 1-minute load average at start and end (other processes on the machine
skew CPU numbers; read them together with the load).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from damo_jax.config import load_config
from damo_jax.models import build_model, init_variables
from damo_jax.reparam import fuse


def time_forward(model, variables, size, runs):
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, size, size, 3), maxval=255.0)
    def forward(v, x):
        out = model.apply(v, x)
        return out["scores"], out["boxes"]  # what an exported model returns (before NMS)
    fn = jax.jit(forward)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, x))
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        jax.block_until_ready(fn(variables, x))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(variables, x))
        times.append((time.perf_counter() - t0) * 1e3)
    return dict(median=statistics.median(times), min=min(times),
                p90=float(np.percentile(times, 90)), compile_s=compile_s)


def bench(name, size, runs):
    cfg = load_config(name)
    train_net = build_model(cfg)
    variables = init_variables(train_net, jax.random.PRNGKey(0))
    rows = [("train graph", time_forward(train_net, variables, size, runs))]
    deployed = fuse(variables, cfg, fuse_bn=True)
    rows.append(("deploy=True", time_forward(build_model(cfg, deploy=True), deployed, size, runs)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["t:640", "ns:416"])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default=None, help="append a markdown table to this file")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    dev = jax.devices()[0]
    lines = [f"| model | input | graph | median ms | min ms | p90 ms | compile s |",
             "|---|---|---|---|---|---|---|"]
    for spec in args.models:
        name, size = spec.split(":")
        for graph, r in bench(name, int(size), args.runs):
            lines.append(f"| {name.upper()} | 1x{size}x{size} | {graph} | {r['median']:.1f} | "
                         f"{r['min']:.1f} | {r['p90']:.1f} | {r['compile_s']:.1f} |")
            print(lines[-1], flush=True)
    load1 = os.getloadavg()[0]
    header = (f"\n### {time.strftime('%Y-%m-%d %H:%M')} — {dev.platform} ({dev.device_kind}), "
              f"{os.cpu_count()} CPUs, jax {jax.__version__}, python {platform.python_version()}\n\n"
              f"Command: `python {' '.join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))}`  \n"
              f"{args.runs} timed runs after 3 warm-up calls; 1-min load average {load0:.1f} at start, "
              f"{load1:.1f} at end.\n\n")
    text = header + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
