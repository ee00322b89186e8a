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
        # the meta rows placed like the images' rows: they line up with the gathered detections
        # whatever order the mesh gives the processes' devices (TPU pods)
        out, meta = distributed.allgather_rows(
            (dict(out), {k: batch[k] for k in ("image_ids", "orig_sizes", "valid")}), sharding=data_sharding)
        if scored_ids is not None:   # ids of the images run by any process (unreadable ones are invalid rows)
            scored_ids.update(np.asarray(meta["image_ids"])[np.asarray(meta["valid"], bool)].tolist())
        capped.extend(over_candidate_cap(out, meta["valid"], params))
        results.extend(detections_to_coco(out, meta["image_ids"], meta["orig_sizes"], image_hw,
                                          dataset.category_ids, valid=meta["valid"]))
    if jax.process_index() == 0:
        warn_candidate_cap(capped, len(dataset), params)
    return results

