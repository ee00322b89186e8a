"""Benchmark: batched jit AlignOTA vs the NumPy per-image reference (ANCHORS.md row "AlignOTA").

Setting of the official measurement: batch 16, 640x640 input (A = 8400 priors), 50 GTs per image
with sides log-uniform in 12-320 px, 80 classes. Predictions are synthetic: every prior predicts a
jittered copy of a random GT (so IoUs and candidates look like a training batch), scores are
uniform**3.

    .venv/bin/python benchmarks/assign.py                 # jit x10 runs, reference x3 runs
    .venv/bin/python benchmarks/assign.py --ref-runs 1 --runs 20

Prints the median times, the ratio, whether both agree on the assignment, and the XLA memory
analysis of the compiled assigner (temporaries) for a few (B, G) to show how the (B, A, G) cost
tensors scale.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import ref_align_ota as ref  # noqa: E402

from damo_jax import assign  # noqa: E402
from damo_jax.models import make_priors  # noqa: E402


def make_batch(batch, num_gt, num_classes, size=640, seed=0):
    rng = np.random.default_rng(seed)
    priors = make_priors(size, size)
    num_priors = priors.shape[0]
    side = np.exp(rng.uniform(np.log(12), np.log(320), (batch, num_gt, 2)))
    centre = rng.uniform(0, size, (batch, num_gt, 2))
    gt = np.concatenate([centre - side / 2, centre + side / 2], -1).astype(np.float32)
    labels = rng.integers(0, num_classes, (batch, num_gt)).astype(np.int32)
    owner = rng.integers(0, num_gt, (batch, num_priors))
    pred = np.take_along_axis(gt, owner[..., None], 1)
    pred = (pred + rng.normal(0, 1, pred.shape) * side.mean() * 0.15).astype(np.float32)
    scores = (rng.uniform(0, 1, (batch, num_priors, num_classes)) ** 3).astype(np.float32)
    valid = np.ones((batch, num_gt), bool)
    return priors, scores, pred, gt, labels, valid


def time_runs(fn, runs):
    """Median wall time and median process CPU time (all threads) over ``runs`` calls."""
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), wall, statistics.median(cpu)


def memory_report(batch, num_gt, num_classes):
    priors, scores, pred, gt, labels, valid = make_batch(batch, num_gt, num_classes)
    fn = jax.jit(lambda *a: assign.align_ota(*a))
    compiled = fn.lower(scores, priors, pred, gt, labels, valid).compile()
    mem = compiled.memory_analysis()
    cost_tensor = batch * priors.shape[0] * num_gt * 4
    return dict(B=batch, G=num_gt, temp_mb=mem.temp_size_in_bytes / 2**20,
                args_mb=mem.argument_size_in_bytes / 2**20,
                one_BxAxG_f32_mb=cost_tensor / 2**20)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num-gt", type=int, default=50)
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--ref-runs", type=int, default=3)
    p.add_argument("--no-memory", action="store_true")
    args = p.parse_args()
    priors, scores, pred, gt, labels, valid = make_batch(args.batch, args.num_gt,
                                                         args.num_classes)
    fn = jax.jit(lambda *a: assign.align_ota(*a))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(scores, priors, pred, gt, labels, valid))
    compile_s = time.perf_counter() - t0
    jit_med, jit_all, jit_cpu = time_runs(
        lambda: jax.block_until_ready(fn(scores, priors, pred, gt, labels, valid)), args.runs)

    def reference():
        return [ref.assign_image(priors, scores[b], pred[b], gt[b], labels[b])
                for b in range(args.batch)]
    ref_out = reference()
    ref_med, ref_all, ref_cpu = time_runs(reference, args.ref_runs)
    agree = all(np.array_equal(np.asarray(out["gt_index"][b]), r["gt_index"])
                for b, r in enumerate(ref_out))
    print(f"devices: {jax.devices()}  A={priors.shape[0]} B={args.batch} G={args.num_gt} "
          f"C={args.num_classes}")
    num_cand = np.asarray(out["candidate_mask"]).sum(1)
    print(f"positives per image (mean): {float(np.mean(np.asarray(out['num_pos']))):.1f}; "
          f"candidates per image (mean): {float(np.mean(num_cand)):.0f}")
    print(f"jit compile+first run: {compile_s:.2f} s")
    print(f"jit batched: median {jit_med * 1e3:.1f} ms wall over {args.runs} runs "
          f"(min {min(jit_all) * 1e3:.1f}, max {max(jit_all) * 1e3:.1f}); "
          f"median CPU {jit_cpu * 1e3:.1f} ms")
    print(f"numpy per-image reference: median {ref_med:.2f} s wall over {args.ref_runs} runs "
          f"(min {min(ref_all):.2f}, max {max(ref_all):.2f}); median CPU {ref_cpu:.2f} s")
    print(f"speed-up: wall {ref_med / jit_med:.1f}x, CPU time {ref_cpu / jit_cpu:.1f}x; official "
          f"per-image loop 9.98 s -> {9.98 / jit_med:.1f}x (ANCHORS.md, measured elsewhere)")
    print(f"identical assignments (gt_index, all images): {agree}")
    if not args.no_memory:
        for b, g in ((4, 50), (16, 50), (16, 100), (32, 50)):
            print("memory:", memory_report(b, g, args.num_classes))


if __name__ == "__main__":
    main()
