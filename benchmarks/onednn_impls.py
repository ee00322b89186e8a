"""Every oneDNN implementation of a convolution problem, timed alone: which kernel oneDNN picks
for our NHWC problems (``model.grad_impl = "onednn"``, ``damo_jax/models/onednn.py``) and whether
another one it offers is faster on this CPU.

    python benchmarks/onednn_impls.py                       # the S@320 batch-8 convs of bench_train §0h/§0i
    python benchmarks/onednn_impls.py --rounds 15 --shape 8,128,80,80,88,1,1,fwd

A problem is ``B,C,H,W,D,k,stride,prop`` (NHWC input B×H×W×C, k×k kernel C→D, padding k//2,
``prop`` one of ``fwd`` (forward training), ``bwd_d`` (input gradient), ``bwd_w`` (kernel
gradient)), float32, activations NHWC, kernel in oneDNN's preferred layout (``format_tag_any``,
as damo_jax does). oneDNN's implementation list is walked with ``dnnl_primitive_desc_next_impl``
(the first one is what oneDNN, and damo_jax, uses); reference (``ref:any``) and SSE4.1 kernels
are skipped (100-1000x slower). Timing: ``--rounds`` rounds, each executing every implementation
once in turn (interleaved, so load changes on a shared host hit them alike), after two warm-up
runs each; the table gives the median and min in ms. No JAX involved: oneDNN alone on random data.
Results go to docs/bench_train.md.

    ONEDNN_VERBOSE=1 python benchmarks/train_step.py --config s --img-size 320 --batch 8 \
        --steps 3 --num-gt 5 > step.log
    python benchmarks/onednn_impls.py --verbose-log step.log --layouts

``--verbose-log`` takes the problems from a ``ONEDNN_VERBOSE=1`` log of a run instead: every
convolution it executed, with its calls per step (the number of executions of the step is the
greatest common divisor of the problems' call counts; printed), grouped convs included.
``--layouts`` times oneDNN's pick twice per problem instead of every implementation: with NHWC
activations (what damo_jax runs) and with activations in the layout oneDNN chooses (its blocked
``nChw16c``-style ones: what a network kept in oneDNN's layout end to end would run), the
reorders into that layout excluded; the table ends with both sums weighted by calls per step, and
the sum of the faster of the two per problem. It bounds what a whole-network blocked layout could
save on the convolutions (bench_train §0za). Without ``--layouts`` the table ends with the sum (by
calls per step, with ``--verbose-log``) of oneDNN's pick and of the fastest implementation per
problem: what choosing the implementation per problem could save.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import math
import os
import re
import statistics
import sys
import time
from ctypes import byref, c_char_p, c_void_p

import numpy as np

from damo_jax.models import onednn as o
from damo_jax.runtime import cpu_model

# the S@320 batch-8 problems with the largest gaps to the official code's in-graph times (§0h)
S320_GAPS = [
    "8,88,80,80,128,3,2,bwd_w", "8,12,160,160,32,3,1,fwd", "8,128,80,80,88,1,1,fwd",
    "8,32,160,160,24,1,1,fwd", "8,128,80,80,88,1,1,bwd_w", "8,256,20,20,80,3,1,bwd_d",
    "8,128,40,40,256,3,2,bwd_w", "8,128,40,40,128,3,2,bwd_w", "8,88,80,80,128,3,2,fwd",
    "8,128,40,40,80,3,1,fwd", "8,88,40,40,128,1,1,fwd", "8,128,80,80,88,1,1,bwd_d",
]
_Q_IMPL_INFO_STR = 8   # dnnl_query_impl_info_str
_Q_SRC, _Q_DIFF_SRC, _Q_W, _Q_DIFF_W, _Q_DST, _Q_DIFF_DST = 129, 130, 131, 132, 133, 134


def problem_spec(spec: str):
    """``"B,C,H,W,D,k,stride,prop"`` -> ``(B, C, H, W, D, k, stride, prop, groups=1)`` (argparse
    type: a ValueError becomes a usage error)."""
    f = spec.split(",")
    if len(f) != 8 or f[7] not in ("fwd", "bwd_d", "bwd_w"):
        raise ValueError(spec)
    return tuple(int(v) for v in f[:7]) + (f[7], 1)


_VERBOSE_PROPS = {"forward_training": "fwd", "backward_data": "bwd_d", "backward_weights": "bwd_w"}


def problems_from_verbose(path) -> tuple[list, int]:
    """``([(problem, calls per step)], executions)`` from a ``ONEDNN_VERBOSE=1`` log: every
    executed convolution (``onednn_verbose,exec,cpu,convolution,...``) by problem descriptor
    (``[gG]mbB_icCocD_ihHohHokhKshSph.._iw..``), square kernels with symmetric ``k // 2`` padding
    as damo_jax's convs have (others raise ValueError). ``executions`` = the gcd of the call counts."""
    counts = {}
    with open(path, errors="replace") as f:
        for line in f:
            if not line.startswith("onednn_verbose,exec,cpu,convolution,"):
                continue
            fields = line.rstrip("\n").split(",")
            prop, desc = _VERBOSE_PROPS.get(fields[5]), fields[-2]
            v = {key: int(num) for key, num in re.findall(r"([a-z]+)(\d+)", desc)}
            if prop is None or not {"mb", "ic", "oc", "ih", "kh", "kw", "sh"} <= v.keys():
                raise ValueError(f"{path}: unreadable convolution line: {line.strip()[:160]}")
            if v["kh"] != v["kw"] or v.get("ph", 0) != v["kh"] // 2:
                raise ValueError(f"{path}: not a square k//2-padded conv: {desc}")
            problem = (v["mb"], v["ic"], v["ih"], v["iw"], v["oc"], v["kh"], v["sh"], prop,
                       v.get("g", 1))
            counts[problem] = counts.get(problem, 0) + 1
    if not counts:
        raise ValueError(f"{path}: no 'onednn_verbose,exec,cpu,convolution' lines (run with ONEDNN_VERBOSE=1)")
    executions = functools.reduce(math.gcd, counts.values())
    return [(p, k // executions) for p, k in sorted(counts.items())], executions


def _pd(lib, engine, problem, activations="nhwc"):
    n, c, h, w, d, k, s, prop, g = problem
    pds, _ = o._conv_pds(lib, engine, (n, h, w, c), (k, k, c // g, d), (s, s),
                         ((k // 2,) * 2,) * 2, activations)
    return pds[{"fwd": "fwd", "bwd_d": "bwd_data", "bwd_w": "bwd_weights"}[prop]]


def implementations(lib, engine, problem, rng, activations="nhwc", first_only=False):
    """[(name, primitive, exec args, the buffers behind the args)] for every non-reference
    implementation of ``problem``
    (``first_only``: oneDNN's pick alone), activations in ``activations`` (``"nhwc"`` or ``"any"``,
    :func:`damo_jax.models.onednn._conv_pds`); every argument gets a buffer of its descriptor's size
    filled with uniform [0, 1) floats (no denormals, zeros in a blocked layout's padding aside)."""
    prop = problem[7]
    pd = _pd(lib, engine, problem, activations)
    buffers = []

    def mem(q):
        m = c_void_p(lib.dnnl_primitive_desc_query_md(pd, q, 0))
        buf = rng.random(lib.dnnl_memory_desc_get_size(m) // 4 + 16, np.float32)
        buffers.append(buf)
        out = c_void_p()
        o._check(lib.dnnl_memory_create(byref(out), m, engine, c_void_p(buf.ctypes.data)), "memory")
        return out

    found = []
    while True:
        name = c_char_p()
        lib.dnnl_primitive_desc_query(pd, _Q_IMPL_INFO_STR, 0, byref(name))
        name = name.value.decode()
        if not (name.startswith("ref") or "sse41" in name):
            prim = c_void_p()
            o._check(lib.dnnl_primitive_create(byref(prim), pd), f"primitive {name}")
            if prop == "fwd":
                args = [(o._ARG_SRC, mem(_Q_SRC)), (o._ARG_WEIGHTS, mem(_Q_W)), (o._ARG_DST, mem(_Q_DST))]
            elif prop == "bwd_d":
                args = [(o._ARG_DIFF_DST, mem(_Q_DIFF_DST)), (o._ARG_WEIGHTS, mem(_Q_W)),
                        (o._ARG_DIFF_SRC, mem(_Q_DIFF_SRC))]
            else:
                args = [(o._ARG_SRC, mem(_Q_SRC)), (o._ARG_DIFF_DST, mem(_Q_DIFF_DST)),
                        (o._ARG_DIFF_WEIGHTS, mem(_Q_DIFF_W))]
            found.append((name, prim, args, buffers))
        if first_only or lib.dnnl_primitive_desc_next_impl(pd) != 0:
            return found


def _time_interleaved(lib, stream, impls, rounds) -> list:
    """Per implementation, the wall ms of ``rounds`` executions, each round running every
    implementation once in turn, after two warm-up rounds."""
    times = [[] for _ in impls]
    for r in range(rounds + 2):
        for i, (_, prim, exec_args, _) in enumerate(impls):
            t = time.perf_counter()
            o._execute(lib, stream, prim, exec_args)
            o._check(lib.dnnl_stream_wait(stream), "stream_wait")
            if r >= 2:
                times[i].append((time.perf_counter() - t) * 1e3)
    return times


def _spec(problem) -> str:
    spec = ",".join(map(str, problem[:8]))
    return spec if problem[8] == 1 else f"{spec} (groups {problem[8]})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", default=None, type=problem_spec,
                    help="B,C,H,W,D,k,stride,fwd|bwd_d|bwd_w (repeatable; default: the S@320 set)")
    ap.add_argument("--verbose-log", metavar="FILE",
                    help="take the problems and their calls per step from this ONEDNN_VERBOSE=1 log")
    ap.add_argument("--layouts", action="store_true",
                    help="time oneDNN's pick with NHWC activations and with oneDNN's own "
                         "(blocked) activation layout, instead of every implementation")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    args = ap.parse_args(argv)
    if args.shape and args.verbose_log:
        ap.error("--shape and --verbose-log both name the problems: give one")
    calls = None
    if args.verbose_log:
        try:
            listed, executions = problems_from_verbose(args.verbose_log)
        except OSError as e:
            ap.error(f"--verbose-log {args.verbose_log}: {e.strerror}")
        except ValueError as e:
            ap.error(f"--verbose-log {e}")
        problems, calls = [p for p, _ in listed], dict(listed)
    else:
        problems = args.shape or [problem_spec(spec) for spec in S320_GAPS]
    if not o.available():
        print(f"oneDNN not available: {o.unavailable_reason()}", file=sys.stderr)
        return 2
    lib, engine, stream = o._runtime()
    lib.dnnl_primitive_desc_next_impl.restype = ctypes.c_int
    lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
    rng = np.random.default_rng(0)
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {o._STATE['where']}")
    if calls:
        print(f"# {args.verbose_log}: {len(problems)} problems, {executions} executions of the step")
    if args.layouts:
        return _compare_layouts(lib, engine, stream, problems, calls, rng, args.rounds)
    print("| problem | impl (first = oneDNN's pick) | median ms | min ms |\n|---|---|---|---|")
    picked = fastest = 0.0
    for problem in problems:
        impls = implementations(lib, engine, problem, rng)
        times = _time_interleaved(lib, stream, impls, args.rounds)
        medians = [statistics.median(ts) for ts in times]
        for i, ((name, _, _, _), ts) in enumerate(zip(impls, times)):
            print(f"| {_spec(problem) if i == 0 else ''} | {name} | {medians[i]:.2f} | {min(ts):.2f} |")
        k = (calls or {}).get(problem, 1)
        picked, fastest = picked + k * medians[0], fastest + k * min(medians)
        sys.stdout.flush()
    print(f"\nsum{' x calls per step' if calls else ''}: oneDNN's pick {picked:.1f} ms, the fastest "
          f"implementation per problem {fastest:.1f} ms")
    return 0


def _compare_layouts(lib, engine, stream, problems, calls, rng, rounds) -> int:
    print("| problem | calls per step | NHWC: impl, median ms | oneDNN's layout: impl, median ms |\n"
          "|---|---|---|---|")
    sums = {"nhwc": 0.0, "any": 0.0, "best": 0.0}
    for problem in problems:
        impls = [implementations(lib, engine, problem, rng, layout, first_only=True)[0]
                 for layout in ("nhwc", "any")]
        a, b = (statistics.median(ts) for ts in _time_interleaved(lib, stream, impls, rounds))
        k = (calls or {}).get(problem, 1)
        sums["nhwc"] += k * a
        sums["any"] += k * b
        sums["best"] += k * min(a, b)
        print(f"| {_spec(problem)} | {k} | {impls[0][0]}, {a:.2f} | {impls[1][0]}, {b:.2f} |")
        sys.stdout.flush()
    print(f"\nsum x calls: NHWC {sums['nhwc']:.1f} ms, oneDNN's layout {sums['any']:.1f} ms, "
          f"the faster of the two per problem {sums['best']:.1f} ms (reorders between layouts not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
