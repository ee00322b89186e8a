"""Evaluation in a multi-process (multi-host) run: every process decodes a disjoint slice of each
global eval batch, one jitted forward + NMS runs over the GLOBAL mesh (the same per-device batch as
a one-process run on as many devices), and the static-shape NMS outputs plus the image ids / sizes
are all-gathered, so every process holds every detection (and computes the same COCO metrics).
"""
from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from damo_jax import distributed
from damo_jax.evaluation.coco import detections_to_coco
from damo_jax.inference.pipeline import JaxBackend, detect

log = logging.getLogger(__name__)


def global_batch_size(batch_size: int, num_devices: int) -> int:
    """``batch_size`` rounded up to a multiple of the global device count (padding rows are
    invalid and dropped)."""
    return int(math.ceil(batch_size / num_devices) * num_devices)


def run_detections_global(backend: JaxBackend, dataset, image_hw, batch_size: int, params, *,
                          workers: int = 0, progress: bool = True, scored_ids: set | None = None) -> list[dict]:
    """COCO result dicts of the whole ``dataset`` on every process (original pixels, source ids).

    ``backend``: a :class:`JaxBackend` with host (numpy) variables; ``image_hw`` (H, W) test size;
    ``params``: NMS parameters (``pipeline.nms_params``)."""
    from damo_jax.data_pipelines import eval_batches
    from damo_jax.runtime import make_mesh

    mesh = make_mesh()                                      # all devices of all processes
    data_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    size = global_batch_size(batch_size, mesh.devices.size)
    if size != batch_size:
        log.info("eval batch %d -> %d (a multiple of the %d devices)", batch_size, size, mesh.devices.size)
    backend = JaxBackend(backend.model, jax.device_put(backend.variables, replicated))
    batches = eval_batches(dataset, image_hw, size, workers=workers, process_index=jax.process_index(),
                           process_count=jax.process_count())
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        batches = tqdm(batches, total=math.ceil(len(dataset) / size), desc="eval", unit="batch")
    from damo_jax.evaluation.evaluator import over_candidate_cap, warn_candidate_cap
    results, capped = [], []
    for batch in batches:
        images = jax.make_array_from_process_local_data(data_sharding, batch["images"])
        out = detect(backend, images, params)
        meta = {k: _global_rows(batch[k], data_sharding) for k in ("image_ids", "orig_sizes", "valid")}
        out, meta = distributed.allgather_rows((dict(out), meta))
        meta = {k: _local_dtype(v, batch[k]) for k, v in meta.items()}
        if scored_ids is not None:   # ids of the images run by any process (unreadable ones are invalid rows)
            scored_ids.update(np.asarray(meta["image_ids"])[np.asarray(meta["valid"], bool)].tolist())
        capped.extend(over_candidate_cap(out, meta["valid"], params))
        results.extend(detections_to_coco(out, meta["image_ids"], meta["orig_sizes"], image_hw,
                                          dataset.category_ids, valid=meta["valid"]))
    if jax.process_index() == 0:
        warn_candidate_cap(capped, len(dataset), params)
    return results


def _global_rows(x, sharding) -> jax.Array:
    """Process-local rows as a global array placed like the batch's images: gathered, they line
    up with the gathered detections whatever order the mesh gives the processes' devices (a
    process-order gather of the numpy rows assumes each process's devices form one block, which
    the device order of a TPU pod need not give). 64-bit values ride as int32 pairs (no x64)."""
    x = np.ascontiguousarray(np.asarray(x).reshape(len(x), -1))
    if x.dtype.itemsize == 8:
        x = x.view(np.int32)
    elif x.dtype == np.bool_:
        x = x.astype(np.int32)
    return jax.make_array_from_process_local_data(sharding, x)


def _local_dtype(gathered, local) -> np.ndarray:
    """The gathered rows of :func:`_global_rows` back in ``local``'s dtype and row shape."""
    local = np.asarray(local)
    y = np.ascontiguousarray(gathered)
    if local.dtype.itemsize == 8:
        y = y.view(local.dtype)
    return y.astype(local.dtype).reshape(-1, *local.shape[1:])
