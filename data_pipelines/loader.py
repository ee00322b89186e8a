"""Training iterator over global steps, and evaluation batches.

``TrainLoader`` yields the batches of steps ``start_step, start_step + 1, ..., total_steps - 1``.
Batch k depends only on (seed, k): epoch = k // steps_per_epoch selects a permutation of the
dataset (``default_rng((seed, 1, epoch))``), the global batch takes ``batch_size`` consecutive
positions of it (wrapping modulo the dataset length), and sample j of the global batch is
augmented with ``default_rng((seed, 2, k, j))``. With several processes (multi-host) each gets
the contiguous slice ``[process_index · B/P, (process_index + 1) · B/P)`` of the global batch, so
``batch_size`` is the GLOBAL batch. Mosaic/mixup are on for k < ``no_aug_start_step``; SADA uses
progress k / total_steps.

Workers: ``workers`` > 0 runs whole batches in a ``ProcessPoolExecutor`` with the ``spawn`` start
method (safe after JAX started threads) and keeps ``workers + prefetch`` batches in flight;
``workers=0`` builds batches in-process; ``backend="grain"`` (or ``data.loader = "grain"``) runs the
same per-step work in grain worker processes with shared-memory transfer (``grain_loader.py``,
for hosts feeding many accelerators). A worker that dies raises ``RuntimeError`` naming the
step; a worker exception is re-raised. Scripts using workers need the usual
``if __name__ == "__main__":`` guard (spawn re-imports the main module).
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import multiprocessing
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from typing import Any, Iterator

import numpy as np

from damo_jax.data_pipelines.augment.pipeline import NOTE_PREFIX, AugParams, as_hw, train_sample
from damo_jax.data_pipelines.augment.resize import stretch_resize
from damo_jax.data_pipelines.batching import collate_train
from damo_jax.data_pipelines.records import DataError, log

_WORKER: dict[str, Any] = {}


def _cfg_get(cfg, key, default):
    """:func:`damo_jax.config.config_value`, also reading attributes of plain objects."""
    from damo_jax.config import config_value
    value = config_value(cfg, key, None)
    value = getattr(cfg, key, None) if value is None else value
    return default if value is None else value


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((seed, 1, epoch)).permutation(n)


def global_indices(seed: int, step: int, batch_size: int, steps_per_epoch: int, n: int) -> np.ndarray:
    """Dataset indices of the global batch of ``step``."""
    epoch, pos = divmod(step, steps_per_epoch)
    positions = (pos * batch_size + np.arange(batch_size)) % n
    return _permutation(seed, epoch, n)[positions]


def build_batch(ds, spec: dict, step: int) -> tuple[dict, collections.Counter]:
    """The local batch of ``step`` (pure function of the spec and step) and its counters."""
    stats: collections.Counter = collections.Counter()
    idx = global_indices(spec["seed"], step, spec["batch_size"], spec["steps_per_epoch"], len(ds))
    lo = spec["process_index"] * spec["local_batch"]
    mosaic_on = step < spec["no_aug_start_step"]
    progress = step / max(1, spec["total_steps"])
    samples = []
    for j in range(lo, lo + spec["local_batch"]):
        rng = np.random.default_rng((spec["seed"], 2, step, j))
        samples.append(train_sample(ds, int(idx[j]), rng, spec["params"], mosaic_on=mosaic_on,
                                    progress=progress, stats=stats))
    batch, truncated_images, dropped = collate_train(samples, spec["max_boxes"])
    stats["truncated_images"] += truncated_images
    stats["truncated_boxes"] += dropped
    return batch, stats


def _init_worker(ds, spec):
    import signal

    import cv2
    cv2.setNumThreads(1)
    # Ctrl-C in a terminal reaches the whole process group: the main process stops the run and
    # shuts this pool down; a worker that raised KeyboardInterrupt too would only print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from damo_jax.runtime import exit_with_parent
    exit_with_parent()                  # a parent killed with -9 leaves no orphan workers
    _WORKER["ds"], _WORKER["spec"] = ds, spec


def _worker_batch(step: int):
    return build_batch(_WORKER["ds"], _WORKER["spec"], step)


class TrainLoader:
    """Iterator of static-shape training batches; see the module docstring."""

    def __init__(self, ds, data_cfg, *, batch_size: int, seed: int, steps_per_epoch: int,
                 total_steps: int, no_aug_start_step: int, start_step: int = 0, process_index: int = 0,
                 process_count: int = 1, workers: int | None = None, backend: str | None = None):
        if batch_size % process_count:
            raise ValueError(f"TrainLoader: global batch_size {batch_size} is not divisible by "
                             f"process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"TrainLoader: process_index {process_index} not in [0, {process_count})")
        if len(ds) == 0:
            raise DataError(f"dataset {getattr(ds, 'name', ds)!r} has no images (nothing to load)")
        if steps_per_epoch < 1:
            raise ValueError(f"TrainLoader: steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.ds = ds
        self.spec = {
            "seed": int(seed), "batch_size": int(batch_size), "steps_per_epoch": int(steps_per_epoch),
            "total_steps": int(total_steps), "no_aug_start_step": int(no_aug_start_step),
            "process_index": int(process_index), "local_batch": int(batch_size) // int(process_count),
            "max_boxes": int(_cfg_get(data_cfg, "max_boxes", 200)),
            "params": AugParams.from_config(data_cfg),
        }
        self.workers = int(_cfg_get(data_cfg, "workers", 0) if workers is None else workers)
        self.prefetch = int(_cfg_get(data_cfg, "prefetch", 2))
        self.backend = str(backend or _cfg_get(data_cfg, "loader", "process"))
        if self.backend not in ("process", "grain"):
            raise ValueError(f"TrainLoader: data.loader {self.backend!r} is not 'process' or 'grain'")
        self._grain = None
        self.stats: collections.Counter = collections.Counter()
        self._next_step = int(start_step)
        self._submit_step = int(start_step)
        self._pending: collections.deque = collections.deque()
        self._pool: cf.ProcessPoolExecutor | None = None
        self._warned_truncation = False
        self._notes: set[str] = set()

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        step = self._next_step
        if step >= self.spec["total_steps"]:
            raise StopIteration
        if self.workers <= 0:
            batch, stats = build_batch(self.ds, self.spec, step)
        elif self.backend == "grain":        # shared-memory transfer (pod hosts): grain_loader.py
            if self._grain is None:
                from damo_jax.data_pipelines.grain_loader import grain_batches
                self._grain = grain_batches(self.ds, self.spec, step, self.workers, self.prefetch)
            batch, stats = next(self._grain)
        else:
            batch, stats = self._from_pool(step)
        self._next_step = step + 1
        self._account(stats, step)
        return batch

    def _from_pool(self, step: int):
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self.ds, self.spec))
        in_flight = self.workers + max(0, self.prefetch)
        while len(self._pending) < in_flight and self._submit_step < self.spec["total_steps"]:
            self._pending.append((self._submit_step, self._pool.submit(_worker_batch, self._submit_step)))
            self._submit_step += 1
        got_step, future = self._pending.popleft()
        assert got_step == step, (got_step, step)
        try:
            return future.result()
        except BrokenProcessPool as e:
            self.close()
            raise RuntimeError(f"TrainLoader: a data worker process died while building step {step} "
                               f"({e}); see the worker's output above") from e

    def _account(self, stats: collections.Counter, step: int) -> None:
        for key in [k for k in stats if isinstance(k, str) and k.startswith(NOTE_PREFIX)]:
            del stats[key]
            if key not in self._notes:          # once per run, not once per worker process
                self._notes.add(key)
                log.warning("%s", key[len(NOTE_PREFIX):])
        self.stats.update(stats)
        if stats.get("truncated_images") and not self._warned_truncation:
            self._warned_truncation = True
            log.warning("step %d: images with more than max_boxes=%d boxes; keeping the largest "
                        "(counted in loader.stats['truncated_boxes']; warning shown once)",
                        step, self.spec["max_boxes"])

    def state(self) -> dict:
        """Checkpointable position: ``{"step": next step to be yielded}``."""
        return {"step": self._next_step}

    # -- shutdown ----------------------------------------------------------------------------
    def close(self) -> None:
        if self._grain is not None:
            self._grain.close()
            self._grain = None
        pool, self._pool = self._pool, None
        self._pending.clear()
        self._submit_step = self._next_step
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _eval_item(ds, index: int, out_hw) -> tuple[np.ndarray, int, tuple[int, int]]:
    s = ds[index]
    img, _ = stretch_resize(s["image"], np.zeros((0, 4), np.float32), out_hw)
    return img, s["image_id"], s["orig_size"]


def _eval_item_or_skip(ds, index: int, out_hw):
    """``_eval_item`` or, for an image that cannot be read, a skip record
    ``{"index", "image_id", "file", "reason"}`` (image_id / file None when the dataset has no
    per-record metadata)."""
    try:
        return _eval_item(ds, index, out_hw)
    except DataError as e:
        rec = getattr(ds, "records", None)
        rec = rec[index] if rec is not None else None
        image_id = getattr(rec, "image_id", None)
        return {"index": int(index), "image_id": None if image_id is None else int(image_id),
                "file": getattr(rec, "name", None), "reason": str(e)}


def eval_batches(ds, image_size, batch_size: int, *, workers: int = 0, skipped: list | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Stretch-resized evaluation batches over the whole dataset, in order.

    Yields ``images`` (B, H, W, 3) uint8, ``image_ids`` (B,) int64, ``orig_sizes`` (B, 2) int32
    (h, w), ``valid`` (B,) bool; the last batch is padded with zero images (id -1, size = H, W).
    ``workers`` > 0 decodes with that many threads (PIL and cv2 release the GIL).

    An image that cannot be read (missing, truncated, undecodable: a :class:`DataError`) becomes
    an invalid row like the padding (zero image, id -1, ``valid`` False), so every process yields
    the same number of batches; it is logged with its file and reason and appended to ``skipped``
    (a list the caller passes) as ``{"index", "image_id", "file", "reason"}``. Consumers score
    only the valid rows' images (``damo_jax.evaluation``).

    Multi-process: ``batch_size`` is the GLOBAL batch; process ``p`` of ``P`` decodes and yields
    rows ``[p·B/P, (p+1)·B/P)`` of each global batch (``B`` must be divisible by ``P``).
    """
    if batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(f"eval_batches: batch_size {batch_size} / process {process_index} of "
                         f"{process_count}: the global batch must split evenly over the processes")
    out_hw = as_hw(image_size)
    n = len(ds)
    local = batch_size // process_count
    pool = cf.ThreadPoolExecutor(workers) if workers > 0 else None

    def load(i):
        return _eval_item_or_skip(ds, i, out_hw) if i < n else None

    try:
        for start in range(0, n, batch_size):
            idx = range(start + process_index * local, start + (process_index + 1) * local)
            items = list(pool.map(load, idx) if pool else map(load, idx))
            images = np.zeros((local, out_hw[0], out_hw[1], 3), np.uint8)
            ids, sizes, valid = np.full(local, -1, np.int64), np.tile(np.int32(out_hw), (local, 1)), \
                np.zeros(local, bool)
            for row, item in enumerate(items):
                if isinstance(item, tuple):
                    images[row], ids[row], sizes[row], valid[row] = item[0], item[1], item[2], True
                elif item is not None:
                    _log_skip(item)
                    if skipped is not None:
                        skipped.append(item)
            yield {"images": images, "image_ids": ids, "orig_sizes": sizes, "valid": valid}
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def _log_skip(item: dict) -> None:
    where = item["file"] or f"#{item['index']}"
    log.warning("evaluation: skipping image (not scored): %s",
                item["reason"] if where in item["reason"] else f"{where}: {item['reason']}")
