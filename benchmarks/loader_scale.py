"""Can ``TrainLoader`` feed a TPU pod host? Host-side loader cost per image and per received batch,
against the step time a TPU v5e-8 needs for DAMO-YOLO-S at 640 (estimated from FLOPs).

    python benchmarks/loader_scale.py --data demo:640 --size 640 --batch 8 --steps 6

Measured on this machine (CPU time, so the numbers hold on a loaded machine):

1. build — images per CPU-second of ONE process building its slice of the global batch with the
   full official recipe (decode, mosaic, mixup p=0.15, affine, SADA, flip, static batching),
   ``workers=0`` (in-process): what one core delivers.
2. transfer — the main process's CPU seconds per received batch when a worker process sends it
   (``ProcessPoolExecutor``: pickle → pipe → unpickle of the uint8 batch), measured with a worker
   that returns a prebuilt batch of the same shape: the ceiling on how many batches per second
   ONE training process can take from its data workers (it runs under the GIL); the same for
   grain's ``mp_prefetch`` (shared-memory transfer) when grain is installed.

Estimate (printed with its assumptions): training FLOPs per image ≈ 3 × forward FLOPs (forward +
backward ≈ 2× forward; AlignOTA and the loss are small), S@640 forward 37.8 GFLOP (SPEC §1.7),
v5e 197 TFLOP/s bf16 per chip at 30–50 % utilisation, 8 chips on one host with 224 vCPUs
(ct5lp-hightpu-8t). Results: docs/SCALING.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import platform
import time

import numpy as np

from damo_jax.data_pipelines import TrainLoader, open_dataset

S640_FWD_GFLOP = 37.8          # SPEC §1.7, deploy graph, 640x640
TRAIN_FACTOR = 3.0             # forward + backward
V5E_TFLOPS = 197.0             # bf16 peak per chip (Cloud TPU v5e docs)
CHIPS, HOST_VCPUS = 8, 224     # v5e-8 = one ct5lp-hightpu-8t host


def recipe(size: int) -> dict:
    """The official S recipe's augmentation (as benchmarks/data_pipeline.py)."""
    return {"image_size": (size, size), "mosaic_size": (size, size), "mosaic_prob": 1.0,
            "mosaic_scale": (0.1, 2.0), "mixup_prob": 0.15, "degrees": 10.0, "translate": 0.2,
            "shear": 2.0, "flip_prob": 0.5, "sada": True, "max_boxes": 200, "prefetch": 2}


def measure_build(ds, size: int, batch: int, steps: int) -> tuple[float, float]:
    """(images per CPU-second, images per wall-second) of in-process batch building."""
    total = 100_000
    loader = TrainLoader(ds, recipe(size), batch_size=batch, seed=0, steps_per_epoch=max(1, len(ds) // batch),
                         total_steps=total, no_aug_start_step=total, start_step=total // 2, workers=0)
    with loader:
        next(loader)                                   # page cache, lazy imports
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            next(loader)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return steps * batch / dc, steps * batch / dt


_BATCH: dict = {}


def _init(shape):
    _BATCH["images"] = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)


def _send(_):
    return {"images": _BATCH["images"]}


def measure_transfer(shape, repeats: int) -> tuple[float, float]:
    """(main-process CPU ms per received batch, MB per batch) for a worker → main batch transfer."""
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=_init, initargs=(shape,)) as pool:
        pool.submit(_send, 0).result()
        c0 = time.process_time()
        futures = [pool.submit(_send, i) for i in range(repeats)]
        for f in futures:
            f.result()
        dc = time.process_time() - c0
    return 1e3 * dc / repeats, float(np.prod(shape)) / 1e6


class _GrainBatch:
    """grain map transform: index -> the prebuilt batch (made once per worker)."""

    def __init__(self, shape):
        self.shape = shape

    def __call__(self, _):
        if "images" not in _BATCH:
            _init(self.shape)
        return {"images": _BATCH["images"]}


def measure_grain_transfer(shape, repeats: int) -> float | None:
    """Main-process CPU ms per batch received through grain's ``mp_prefetch`` (shared memory), or
    None when grain is not installed."""
    try:
        import grain
    except ImportError:
        return None
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()          # grain reads absl flags
    ds = grain.MapDataset.range(repeats + 2).map(_GrainBatch(shape)).to_iter_dataset()
    it = iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1, per_worker_buffer_size=2)))
    next(it)
    c0 = time.process_time()
    for _ in range(repeats):
        next(it)
    return 1e3 * (time.process_time() - c0) / repeats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo:640")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--batch", type=int, default=8, help="images per built batch (one process's slice)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--transfer-batch", type=int, default=32, help="images per transferred batch")
    ap.add_argument("--global-batch", type=int, default=256, help="v5e-8 global batch for the estimate")
    args = ap.parse_args(argv)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    ds = open_dataset(args.data, "train")
    per_cpu_s, per_wall_s = measure_build(ds, args.size, args.batch, args.steps)
    print(f"build: {per_cpu_s:.1f} images/CPU-s ({per_wall_s:.1f} images/s wall) at {args.size}", flush=True)
    shape = (args.transfer_batch, args.size, args.size, 3)
    ms, mb = measure_transfer(shape, repeats=max(4, args.steps))
    print(f"transfer: {ms:.1f} ms main-process CPU per {mb:.0f} MB batch of {args.transfer_batch} "
          f"({mb / ms * 1e3 / 1e3:.2f} GB/s per core; {args.transfer_batch / ms * 1e3:.0f} images/s "
          f"ceiling for one receiving process)", flush=True)
    grain_ms = measure_grain_transfer(shape, repeats=max(4, args.steps))
    if grain_ms is not None:
        print(f"transfer via grain mp_prefetch (shared memory): {grain_ms:.1f} ms main-process CPU per "
              f"batch ({args.transfer_batch / grain_ms * 1e3:.0f} images/s ceiling)", flush=True)
    flop = S640_FWD_GFLOP * TRAIN_FACTOR * 1e9
    print(f"load after: {os.getloadavg()[0]:.1f}")
    for mfu in (0.3, 0.5):
        ips = CHIPS * V5E_TFLOPS * 1e12 * mfu / flop
        step_ms = args.global_batch / ips * 1e3
        cores = ips / per_cpu_s
        print(f"v5e-8 at {mfu:.0%} utilisation: {ips:,.0f} images/s = {step_ms:.0f} ms per step of "
              f"{args.global_batch}; building needs {cores:.0f} busy cores of {HOST_VCPUS} vCPUs; "
              f"receiving in one process needs {ips / (args.transfer_batch / ms * 1e3):.1f} cores")


if __name__ == "__main__":
    main()
