"""Forward latency of the jitted model, batch 1 (train graph and/or fully folded deploy graph).

    python benchmarks/model_latency.py [--models t:640 ns:416] [--graphs train deploy]
        [--impls auto] [--runs 20] [--tuned] [--out docs/bench_models.md]

Random (initialised) weights; the deploy variables come from ``reparam.fuse(..., fuse_bn=True)``.
``--impls`` lists ``model.depthwise_impl`` values to compare (``conv``: native grouped convs and
5/9/13 max pools, the pre-2026-11-30 graph and what ONNX export traces; ``taps``: shifted-slice
depthwise convs and separable SPP pools; ``auto``: taps on CPU, conv elsewhere); ``D/P`` also sets
``model.pointwise_impl`` to ``P`` (``conv``: 1x1 convs as convolutions, as exported; ``dot``: as
matrix products; ``auto``: dot on CPU), e.g. ``--impls auto/conv auto/dot``; ``D/P/X`` also sets
``model.dense_impl`` to ``X`` (how the deploy graph's k x k dense convs run: ``conv``: XLA's op,
as exported; ``onednn``: oneDNN's forward, ``models/onednn.py``; ``auto``: onednn in a one-device
CPU process), e.g. ``--impls auto/auto/conv auto/auto/onednn``; ``D/P/X/W`` also sets
``model.conv3x3_impl`` to ``W`` (``direct`` / ``winograd`` / ``auto``: how the 3x3 stride-1 convs
that run in oneDNN compute), e.g. ``--impls auto/auto/auto/direct auto/auto/auto/auto``. All variants of
one model are compiled first, warmed up 3 times, then timed **interleaved** (one call of each per
round) so that load changes on a shared machine hit them alike. Reports the median / min / p90
wall time, the median process CPU time per call (all threads; less sensitive to other processes
than wall time), compile time, the device and the 1-minute load average at start and end.
``--tuned`` applies ``damo_jax.runtime``: ``tune_cpu_allocator()`` first (process-wide glibc setting
that keeps XLA's per-call temp buffer mapped) and ``cpu_compiler_options()`` on every jit.
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

from damo_jax.models import build_model, init_variables, with_depthwise_impl
from damo_jax.models.conv_grad import CONV3X3_IMPLS, DENSE_IMPLS
from damo_jax.models.cpu_ops import DEPTHWISE_IMPLS, POINTWISE_IMPLS
from damo_jax.models.reparam import fuse
from damo_jax.runtime import cpu_compiler_options, tune_cpu_allocator

GRAPH_LABELS = {"train": "train graph", "deploy": "deploy=True"}


def compile_forward(model, variables, images, compiler_options=None):
    """Jitted ``(scores, boxes)`` forward (what an exported model returns) and its compile time."""
    def forward(v, x):
        out = model.apply(v, x)
        return out["scores"], out["boxes"]
    fn = jax.jit(forward, compiler_options=compiler_options or None)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(variables, images))
    return fn, time.perf_counter() - t0


def time_interleaved(variants, images, runs):
    """``variants``: {label: (fn, variables)} -> {label: stats}, calls alternating per round."""
    for fn, v in variants.values():
        for _ in range(3):
            jax.block_until_ready(fn(v, images))
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(runs):
        for label, (fn, v) in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(v, images))
            wall[label].append((time.perf_counter() - t0) * 1e3)
            cpu[label].append((time.process_time() - c0) * 1e3)
    return {k: dict(median=statistics.median(w), min=min(w), p90=float(np.percentile(w, 90)),
                    cpu=statistics.median(cpu[k])) for k, w in wall.items()}


def _split_impl(impl: str) -> tuple:
    """``"D[/P[/X[/W]]]"`` -> (depthwise_impl, pointwise_impl or None, dense_impl or None,
    conv3x3_impl or None)."""
    parts = impl.split("/")
    parts += [None] * (4 - len(parts))
    return parts[0], parts[1] or None, parts[2] or None, parts[3] or None


def bench(name, size, runs, graphs, impls, compiler_options=None):
    """Rows ``(graph label, impl, stats)`` for one model at ``size`` x ``size``."""
    images = jax.random.uniform(jax.random.PRNGKey(0), (1, size, size, 3), maxval=255.0)
    train_variables = init_variables(build_model(name), jax.random.PRNGKey(0))
    deploy_variables = fuse(train_variables, name, fuse_bn=True) if "deploy" in graphs else None
    variants, compile_s = {}, {}
    for graph in graphs:
        for impl in impls:
            depthwise, pointwise, dense, conv3x3 = _split_impl(impl)
            cfg = with_depthwise_impl(name, depthwise, pointwise, dense)
            if conv3x3 is not None:
                cfg.model.conv3x3_impl = conv3x3
            if graph == "train":
                model, v = build_model(cfg), train_variables
            else:
                model, v = build_model(cfg, deploy=True), deploy_variables
            fn, compile_s[(graph, impl)] = compile_forward(model, v, images, compiler_options)
            variants[(graph, impl)] = (fn, v)
    stats = time_interleaved(variants, images, runs)
    return [(GRAPH_LABELS[g], impl, dict(stats[(g, impl)], compile_s=compile_s[(g, impl)]))
            for g, impl in variants]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["t:640", "ns:416"])
    ap.add_argument("--graphs", nargs="+", default=["train", "deploy"], choices=sorted(GRAPH_LABELS))
    ap.add_argument("--impls", nargs="+", default=["auto"],
                    help="model.depthwise_impl values to compare (auto, conv, taps), each optionally "
                         "followed by /<model.pointwise_impl> (auto, conv, dot), "
                         "/<model.dense_impl> (auto, conv, onednn) and /<model.conv3x3_impl> "
                         "(auto, direct, winograd); default: auto")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--tuned", action="store_true",
                    help="damo_jax.runtime: tune_cpu_allocator() + cpu_compiler_options() on the jits")
    ap.add_argument("--out", default=None, help="append a markdown table to this file")
    args = ap.parse_args(argv)
    runtime, options = "default allocator, no compiler options", None
    if args.tuned:
        options = cpu_compiler_options()
        allocator = ("tune_cpu_allocator" if tune_cpu_allocator()
                     else "allocator tuning unsupported here")
        runtime = f"damo_jax.runtime tuning: {allocator}, compiler options {options}"
    load0 = os.getloadavg()[0]
    dev = jax.devices()[0]
    for impl in args.impls:
        depthwise, pointwise, dense, conv3x3 = _split_impl(impl)
        if (impl.count("/") > 3 or depthwise not in DEPTHWISE_IMPLS
                or pointwise not in (None, *POINTWISE_IMPLS) or dense not in (None, *DENSE_IMPLS)
                or conv3x3 not in (None, *CONV3X3_IMPLS)):
            ap.error(f"--impls: {impl!r} is not D, D/P, D/P/X or D/P/X/W with D in "
                     f"{'|'.join(DEPTHWISE_IMPLS)}, P in {'|'.join(POINTWISE_IMPLS)}, X in "
                     f"{'|'.join(DENSE_IMPLS)}, W in {'|'.join(CONV3X3_IMPLS)}")
    lines = ["| model | input | graph | depthwise_impl[/pointwise_impl[/dense_impl[/conv3x3_impl]]] | median ms | min ms | p90 ms | CPU ms/call | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for spec in args.models:
        name, size = spec.split(":")
        for graph, impl, r in bench(name, int(size), args.runs, args.graphs, args.impls, options):
            lines.append(f"| {name.upper()} | 1x{size}x{size} | {graph} | {impl} | {r['median']:.1f} | "
                         f"{r['min']:.1f} | {r['p90']:.1f} | {r['cpu']:.1f} | {r['compile_s']:.1f} |")
            print(lines[-1], flush=True)
    load1 = os.getloadavg()[0]
    header = (f"\n### {time.strftime('%Y-%m-%d %H:%M')} — {dev.platform} ({dev.device_kind}), "
              f"{os.cpu_count()} CPUs, jax {jax.__version__}, python {platform.python_version()}\n\n"
              f"Command: `python {' '.join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:]))}`  \n"
              f"{args.runs} timed runs after 3 warm-up calls, variants interleaved, {runtime}; "
              f"1-min load average {load0:.1f} at start, {load1:.1f} at end.\n\n")
    text = header + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
