"""Throughput of the data pipelines (images/s), written to ``docs/bench_data.md``.

    python benchmarks/data_pipeline.py --data demo:640 --size 640 --batch 8 --steps 12 \
        --workers 0 1 2 --out docs/bench_data.md

Training pipeline = decode + mosaic + random affine + mixup (p 0.15) + resize + flip + SADA (at the
middle of the schedule, progress 0.5) + static batching, with the official DAMO-YOLO-S recipe.
The first batch of each run (pool start-up, page cache) is timed separately and excluded.
Eval pipeline = decode + stretch resize + batching (``eval_batches``, thread workers).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from damo_jax.data_pipelines import TrainLoader, eval_batches, open_dataset

OFFICIAL = "official DAMO-YOLO anchor (SPEC/ANCHORS): 16.4 img/s without workers, 26.7 img/s with 2 workers"


def recipe(size: int) -> dict:
    return {"image_size": (size, size), "mosaic_size": (640, 640), "mosaic_prob": 1.0,
            "mosaic_scale": (0.1, 2.0), "mixup_prob": 0.15, "degrees": 10.0, "translate": 0.2,
            "shear": 2.0, "flip_prob": 0.5, "sada": True, "max_boxes": 200, "prefetch": 2}


def bench_train(ds, size: int, batch: int, steps: int, workers: int) -> tuple[float, float, float]:
    """(images/s wall, images per CPU-second of this process (meaningful for workers=0), first batch s)."""
    total = 100_000
    loader = TrainLoader(ds, recipe(size), batch_size=batch, seed=0, steps_per_epoch=max(1, len(ds) // batch),
                         total_steps=total, no_aug_start_step=total, start_step=total // 2, workers=workers)
    with loader:
        t0 = time.perf_counter()
        next(loader)
        first = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            next(loader)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return steps * batch / dt, steps * batch / max(dc, 1e-9), first


def bench_eval(ds, size: int, batch: int, steps: int, workers: int) -> tuple[float, float]:
    it = eval_batches(ds, size, batch, workers=workers)
    next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for b in it:
        n += int(b["valid"].sum())
        if n >= steps * batch:
            break
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo:640")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="docs/bench_data.md")
    args = ap.parse_args(argv)

    ds = open_dataset(args.data, "train")
    load_before = os.getloadavg()
    rows = []
    for w in args.workers:
        ips, cpu_ips, first = bench_train(ds, args.size, args.batch, args.steps, w)
        cpu = f"{cpu_ips:.1f}" if w == 0 else "(in workers)"
        rows.append(f"| train (full recipe) | {w} | {ips:.1f} | {cpu} | {first:.1f} s |")
        print(rows[-1], flush=True)
    for w in (0, 2):
        ips, cpu_ips = bench_eval(ds, args.size, args.batch, args.steps, w)
        rows.append(f"| eval (decode + resize) | {w} threads | {ips:.1f} | {cpu_ips:.1f} | - |")
        print(rows[-1], flush=True)
    load_after = os.getloadavg()
    cmd = "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:]))
    text = "\n".join([
        "# Data pipeline throughput", "",
        f"Command: `{cmd}`", "",
        f"Dataset: `{args.data}` ({len(ds)} train images), output {args.size}x{args.size}, batch {args.batch}, "
        f"{args.steps} timed batches per row after one warm-up batch (its time, incl. worker start-up, "
        "in the last column).", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f}"
        + (" — other jobs were running, so the wall-clock numbers are noisy lower bounds and worker "
           "scaling cannot show (no idle core)." if max(load_before[0], load_after[0]) > 1.5 else "."), "",
        "The demo images are 640x640 JPEGs (quality 92), slightly more pixels to decode than the average "
        "COCO image (~640x480).", "",
        "images/CPU-s = images per CPU-second used by the main process (all its threads): a "
        "contention-robust estimate of one idle core's throughput.", "",
        "| pipeline | workers | images/s (wall) | images/CPU-s | first batch |", "|---|---|---|---|---|",
        *rows, "",
        OFFICIAL + "; goal ≥ 1.5× those.", "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
