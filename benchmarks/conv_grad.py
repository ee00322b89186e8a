"""Forward vs kernel-/input-gradient time per convolution kind, native XLA vs ``model.grad_impl``
"matmul" (damo_jax/models/conv_grad.py) vs "onednn" (damo_jax/models/onednn.py, dense and depthwise
convs) vs Winograd (``model.conv3x3_impl``, damo_jax/models/winograd_ffi.c: 3x3 stride-1 kinds),
jit, float32.

    python benchmarks/conv_grad.py [--batch 8] [--runs 7] [--kinds 1x1 3x3 3x3s2 1x1s2 dw5 dw5s2]

Shapes are those of S@320 / Ns@320 at batch 8 (64->64 at 80x80 etc., ``conv_kinds.py``; the same
kinds in PyTorch: ``conv_grad_torch.py``). "matmul" is the CPU default (``grad_impl`` and
``pointwise_impl`` "auto": 1x1 convs as dot, depthwise convs as taps) where oneDNN is not
available; where it is, dense and depthwise convs run in oneDNN (rows "... onednn"; skipped
with a printed reason when libdnnl cannot be loaded). For every kind the variants
are compiled first and then timed interleaved (one call of each per round); the table gives the
median wall ms and the median process CPU ms (all threads) per call, the machine's CPU model and
the load average. Ratios to the forward of the same conv are what the issue's goal is about
(kernel gradient <= ~2x forward).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_kinds import KINDS  # noqa: E402

from damo_jax.models import onednn  # noqa: E402
from damo_jax.models.conv_grad import make_conv_general_dilated  # noqa: E402
from damo_jax.models.cpu_ops import _NHWC_DIMS, depthwise_conv_taps, pointwise_conv_dot  # noqa: E402
from damo_jax.runtime import cpu_model  # noqa: E402

def variants(kind, batch):
    hw, cin, cout, k, s, dw = KINDS[kind]
    p, groups = (k - 1) // 2, (cin if dw else 1)
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (batch, hw, hw, cin))
    w = jax.random.normal(key, (k, k, cin // groups, cout)) * 0.1
    args = ((s, s), ((p, p), (p, p)))
    native = depthwise_conv_taps if dw else lax.conv_general_dilated
    matmul = make_conv_general_dilated(taps=dw, pointwise=True)   # what grad_impl="auto" runs on CPU

    def conv(fn):
        return lambda x_, w_: fn(x_, w_, *args, dimension_numbers=_NHWC_DIMS, feature_group_count=groups)
    g = jax.random.normal(key, conv(native)(x, w).shape)

    def dw_of(fn):
        return lambda x, w, g: jax.vjp(lambda w_: conv(fn)(x, w_), w)[1](g)[0]

    def dx_of(fn):
        return lambda x, w, g: jax.vjp(lambda x_: conv(fn)(x_, w), x)[1](g)[0]
    fns = {"forward": lambda x, w, g: conv(native)(x, w),
           "dW native": dw_of(native), "dW matmul": dw_of(matmul),
           "dX native": dx_of(native), "dX matmul": dx_of(matmul)}
    if k == 1 and not dw:  # model.pointwise_impl="dot" (the CPU default): forward as one GEMM
        fns["forward dot"] = lambda x, w, g: conv(pointwise_conv_dot)(x, w)
    if onednn.available() and onednn.supported(x, w, *args, groups):  # grad_impl "onednn" (CPU auto)
        def dnnl(x_, w_, *a, **kw):
            return onednn.conv(x_, w_, *a)
        fns["forward onednn"] = lambda x, w, g: conv(dnnl)(x, w)
        # its backward call returns dX and dW together (what training needs); dW alone is the
        # call made for an input without gradient (the image into the stem)
        fns["dW onednn"], fns["dX+dW onednn"] = dw_of(dnnl), dx_of(dnnl)
        if onednn.winograd_available() and onednn.winograd_eligible(x, w, *args, groups):
            def wino(x_, w_, *a, **kw):   # model.conv3x3_impl "winograd" (winograd_ffi.c)
                return onednn.conv(x_, w_, *a, algo="winograd")
            fns["forward winograd"] = lambda x, w, g: conv(wino)(x, w)
            fns["dW winograd"], fns["dX+dW winograd"] = dw_of(wino), dx_of(wino)
    if dw:  # what XLA's own grouped conv gradient costs (depthwise_impl="conv", grad_impl="native")
        fns["dW grouped conv"] = dw_of(lax.conv_general_dilated)
    return fns, (x, w, g)


def bench(fns, args, runs):
    jf = {k: jax.jit(f) for k, f in fns.items()}
    for f in jf.values():
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    wall, cpu = {k: [] for k in jf}, {k: [] for k in jf}
    for _ in range(runs):
        for k, f in jf.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(f(*args))
            wall[k].append((time.perf_counter() - t0) * 1e3)
            cpu[k].append((time.process_time() - c0) * 1e3)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in jf}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = ap.parse_args(argv)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__}, batch {args.batch}")
    if not onednn.available():
        print(f"oneDNN rows skipped: {onednn.unavailable_reason()}")
    print("| kind | shape | variant | wall ms | CPU ms | CPU / forward CPU | load |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        hw, cin, cout, k, s, dw = KINDS[kind]
        fns, a = variants(kind, args.batch)
        res = bench(fns, a, args.runs)
        fwd_cpu = res["forward"][1]
        for name, (wall, cpu) in res.items():
            print(f"| {kind} | {'dw ' if dw else ''}{k}x{k} s{s} {cin}->{cout} @{hw} | {name} | "
                  f"{wall:.1f} | {cpu:.1f} | {cpu / fwd_cpu:.1f}x | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
