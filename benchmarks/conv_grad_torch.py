#!/usr/bin/env python3
"""The convolution kinds of ``conv_grad.py`` in PyTorch (what the official DAMO-YOLO code runs on
CPU: oneDNN/mkldnn kernels), for a per-kind comparison with XLA:CPU in the same session.

    /path/venv/bin/python benchmarks/conv_grad_torch.py [--batch 8] [--runs 7] [--threads 2]

Needs only ``torch`` (runs in the official code's virtualenv, not damo_jax's; see
``official_torch.py``). Per kind and memory format (``NCHW``: what the official training runs;
``channels_last``): the forward ``F.conv2d``, the kernel gradient ``torch.nn.grad.conv2d_weight``
and the input gradient ``torch.nn.grad.conv2d_input`` (both ``aten.convolution_backward``), each
timed alone, median wall ms and process CPU ms over ``--runs`` after 2 warm-up calls, variants
interleaved. Float32, ``torch.no_grad()`` for the forward.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_kinds import KINDS  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"mkldnn {torch.backends.mkldnn.is_available()}")
    print("| kind | shape | memory format | forward ms | dW ms | dX ms | CPU ms fwd / dW / dX | load |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        hw, cin, cout, k, s, dw = KINDS[kind]
        groups, p = (cin if dw else 1), (k - 1) // 2
        for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            x = torch.randn(args.batch, cin, hw, hw).to(memory_format=fmt)
            w = (torch.randn(cout, cin // groups, k, k) * 0.1).to(memory_format=fmt)
            with torch.no_grad():
                y = F.conv2d(x, w, None, s, p, 1, groups)
            g = torch.randn_like(y).to(memory_format=fmt)
            fns = {
                "fwd": lambda: F.conv2d(x, w, None, s, p, 1, groups),
                "dW": lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, s, p, 1, groups),
                "dX": lambda: torch.nn.grad.conv2d_input(x.shape, w, g, s, p, 1, groups),
            }
            wall, cpu = {n: [] for n in fns}, {n: [] for n in fns}
            with torch.no_grad():
                for f in fns.values():
                    f()
                    f()
                for _ in range(args.runs):
                    for n, f in fns.items():
                        c0, t0 = time.process_time(), time.perf_counter()
                        f()
                        wall[n].append((time.perf_counter() - t0) * 1e3)
                        cpu[n].append((time.process_time() - c0) * 1e3)
            m = {n: statistics.median(v) for n, v in wall.items()}
            mc = {n: statistics.median(v) for n, v in cpu.items()}
            print(f"| {kind} | {'dw ' if dw else ''}{k}x{k} s{s} {cin}->{cout} @{hw} | {fmt_name} | "
                  f"{m['fwd']:.1f} | {m['dW']:.1f} | {m['dX']:.1f} | "
                  f"{mc['fwd']:.0f} / {mc['dW']:.0f} / {mc['dX']:.0f} | {os.getloadavg()[0]:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
