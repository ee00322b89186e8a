"""``TrainLoader``'s per-step work in grain worker processes (``TrainLoader(backend="grain")``).

For hosts that feed many accelerators (a TPU v5e-8 needs thousands of images/s): grain's
``mp_prefetch`` hands batches from its workers to the training process through shared memory,
13–17× less of the training process's CPU per batch than pickling them through a pipe
(``benchmarks/loader_scale.py``, docs/SCALING.md). The batches are the same: step ``k`` is still
``build_batch(ds, spec, k)``, a pure function of ``(seed, k)``, and the grain dataset is the range
of steps ``[start_step, total_steps)``, so resuming needs no grain iterator state (the start step
comes from the checkpoint) and is exact.
"""
from __future__ import annotations

import collections
from typing import Iterator


class _Step:
    """grain map transform: global step -> (this process's batch, counters as a plain dict)."""

    def __init__(self, ds, spec: dict):
        self.ds, self.spec = ds, spec

    def __call__(self, step) -> tuple[dict, dict]:
        from damo_jax.data_pipelines.loader import build_batch
        import cv2
        cv2.setNumThreads(1)
        batch, stats = build_batch(self.ds, self.spec, int(step))
        return batch, dict(stats)


def grain_batches(ds, spec: dict, start_step: int, workers: int, buffer: int = 2) -> Iterator[tuple]:
    """(batch, Counter) of steps ``start_step .. spec["total_steps"] - 1`` in order, built by
    ``workers`` grain processes (each keeps ``buffer`` batches ready)."""
    try:
        import grain
    except ImportError as e:
        raise RuntimeError("TrainLoader(backend='grain') needs grain: pip install 'damo_jax[scale]' "
                           "(or pip install grain)") from e
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()              # grain reads absl flags; we use their defaults
    steps = grain.MapDataset.range(int(start_step), int(spec["total_steps"]))
    it = iter(steps.map(_Step(ds, spec)).to_iter_dataset().mp_prefetch(
        grain.MultiprocessingOptions(num_workers=int(workers), per_worker_buffer_size=max(1, int(buffer)))))
    try:
        for batch, stats in it:
            yield batch, collections.Counter(stats)
    finally:        # a run that stops early (max_steps, Ctrl-C): stop the workers, and free the
        it.close()  # shared memory of the batches they had ready
        _finish_async_unlinks()


def _finish_async_unlinks() -> None:
    """grain unlinks a received batch's shared memory from a background thread when the batch is
    garbage-collected; requests still queued when Python exits were never run ("resource_tracker:
    There appear to be N leaked shared_memory objects" at the end of a run). Run the queued ones
    now and unlink the batches dropped from here on synchronously. (grain 0.2's
    ``SharedMemoryArray._del_thread_pool``; nothing happens where it does not exist.)"""
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
        with SharedMemoryArray._lock:
            pool, SharedMemoryArray._del_thread_pool = SharedMemoryArray._del_thread_pool, None
    except (ImportError, AttributeError):
        return
    if pool is not None:
        pool.close()
        pool.join()
