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
"""
from __future__ import annotations

import argparse
import ctypes
import os
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
    """``"B,C,H,W,D,k,stride,prop"`` -> tuple (argparse type: a ValueError becomes a usage error)."""
    f = spec.split(",")
    if len(f) != 8 or f[7] not in ("fwd", "bwd_d", "bwd_w"):
        raise ValueError(spec)
    return tuple(int(v) for v in f[:7]) + (f[7],)


def implementations(lib, engine, problem, x, y):
    """[(name, primitive, exec args)] for every non-reference implementation of ``problem``."""
    n, c, h, w, d, k, s, prop = problem
    pds, _ = o._conv_pds(lib, engine, (n, h, w, c), (k, k, c, d), (s, s), ((k // 2,) * 2,) * 2)
    pd = pds[{"fwd": "fwd", "bwd_d": "bwd_data", "bwd_w": "bwd_weights"}[prop]]

    def md(q):
        return c_void_p(lib.dnnl_primitive_desc_query_md(pd, q, 0))

    def mem(m, arr=None):
        out = c_void_p()
        handle = o._ALLOCATE if arr is None else c_void_p(arr.ctypes.data)
        o._check(lib.dnnl_memory_create(byref(out), m, engine, handle), "memory")
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
                args = [(o._ARG_SRC, mem(md(_Q_SRC), x)), (o._ARG_WEIGHTS, mem(md(_Q_W))),
                        (o._ARG_DST, mem(md(_Q_DST), y))]
            elif prop == "bwd_d":
                args = [(o._ARG_DIFF_DST, mem(md(_Q_DIFF_DST), y)), (o._ARG_WEIGHTS, mem(md(_Q_W))),
                        (o._ARG_DIFF_SRC, mem(md(_Q_DIFF_SRC), x))]
            else:
                args = [(o._ARG_SRC, mem(md(_Q_SRC), x)), (o._ARG_DIFF_DST, mem(md(_Q_DIFF_DST), y)),
                        (o._ARG_DIFF_WEIGHTS, mem(md(_Q_DIFF_W)))]
            found.append((name, prim, args))
        if lib.dnnl_primitive_desc_next_impl(pd) != 0:
            return found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", default=None, type=problem_spec,
                    help="B,C,H,W,D,k,stride,fwd|bwd_d|bwd_w (repeatable; default: the S@320 set)")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds (default 9)")
    args = ap.parse_args(argv)
    if not o.available():
        print(f"oneDNN not available: {o.unavailable_reason()}", file=sys.stderr)
        return 2
    lib, engine, stream = o._runtime()
    lib.dnnl_primitive_desc_next_impl.restype = ctypes.c_int
    rng = np.random.default_rng(0)
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, {o._STATE['where']}")
    print("| problem | impl (first = oneDNN's pick) | median ms | min ms |\n|---|---|---|---|")
    for problem in args.shape or [problem_spec(spec) for spec in S320_GAPS]:
        spec = ",".join(map(str, problem))
        n, c, h, w, d, k, s, prop = problem
        ho, wo = o._out_hw((h, w), (k, k), (s, s), ((k // 2,) * 2,) * 2)
        x = rng.random((n, h, w, c), np.float32)
        y = rng.random((n, ho, wo, d), np.float32)
        impls = implementations(lib, engine, problem, x, y)
        times = {name: [] for name, _, _ in impls}
        for r in range(args.rounds + 2):
            for name, prim, exec_args in impls:
                t = time.perf_counter()
                o._execute(lib, stream, prim, exec_args)
                o._check(lib.dnnl_stream_wait(stream), "stream_wait")
                if r >= 2:
                    times[name].append((time.perf_counter() - t) * 1e3)
        for i, (name, _, _) in enumerate(impls):
            ts = times[name]
            print(f"| {spec if i == 0 else ''} | {name} | {statistics.median(ts):.2f} | {min(ts):.2f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
