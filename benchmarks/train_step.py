"""Images/s of the full training update step (forward + AlignOTA + targets + loss + backward +
optimizer + EMA, one jit, donated state) on synthetic batches.

    python benchmarks/train_step.py --config s --img-size 320 --batch 8 --steps 20

Official anchor (ANCHORS.md): S@320, batch 8, forward + assignment + loss + backward + SGD on the
same 2-core CPU: 2.42 images/s (3.3 s/step). Results go to docs/bench_train.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def synthetic_batch(batch: int, hw: int, num_gt: int, num_classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(12), np.log(hw / 2), size=(batch, num_gt, 2)))
    x1y1 = rng.uniform(0, 1, size=(batch, num_gt, 2)) * (hw - sizes)
    return {"images": rng.integers(0, 256, size=(batch, hw, hw, 3), dtype=np.uint8),
            "gt_boxes": np.concatenate([x1y1, x1y1 + sizes], -1).astype(np.float32),
            "gt_labels": rng.integers(0, num_classes, size=(batch, num_gt)).astype(np.int32),
            "gt_valid": np.ones((batch, num_gt), bool)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="s")
    ap.add_argument("--img-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-gt", type=int, default=10, help="valid GT boxes per image (padded G = 2x)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-tune", action="store_true",
                    help="skip damo_jax.runtime.tune_cpu_runtime() (the train CLI applies it)")
    args = ap.parse_args(argv)
    if not args.no_tune:
        from damo_jax import runtime
        runtime.tune_cpu_runtime()

    from damo_jax.train import optim
    from damo_jax.config import load_config
    from damo_jax.models import build_model
    from damo_jax.train.loop import init_state, make_mesh, make_tx, make_update_fn, shard_batch

    cfg = load_config(args.config)
    cfg.data.image_size = (args.img_size, args.img_size)
    cfg.train.batch_size = args.batch
    cfg.model.dtype = args.dtype
    mesh = make_mesh()
    repl, data_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    model = build_model(cfg)
    lr_fn = optim.make_lr_schedule(base_lr=0.01 / 64 * args.batch, total_steps=1000, warmup_steps=0,
                                   no_aug_steps=0, min_lr_ratio=0.05)

    t0 = time.perf_counter()
    state = init_state(model, cfg, jax.random.PRNGKey(0), repl)
    tx = make_tx(cfg, state["params"], state["batch_stats"])
    update = jax.jit(make_update_fn(model, tx, lr_fn, cfg), in_shardings=(repl, data_sh),
                     out_shardings=(repl, repl), donate_argnums=0)
    nc = int(cfg.model.head.num_classes)
    batches = []
    for i in range(3):
        b = synthetic_batch(args.batch, args.img_size, args.num_gt, nc, seed=i)
        pad = lambda a, v: np.concatenate([a, np.full_like(a, v)], axis=1)  # noqa: E731
        b = {"images": b["images"], "gt_boxes": pad(b["gt_boxes"], 0), "gt_labels": pad(b["gt_labels"], 0),
             "gt_valid": pad(b["gt_valid"], False)}
        batches.append(shard_batch(b, data_sh))
    state, m = update(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps):
        t = time.perf_counter()
        state, m = update(state, batches[i % len(batches)])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    res = {"config": args.config, "img_size": args.img_size, "batch": args.batch, "steps": args.steps,
           "dtype": args.dtype, "tuned": not args.no_tune, "devices": len(jax.devices()), "backend": jax.default_backend(),
           "compile_plus_first_step_s": round(compile_s, 1), "median_step_s": round(med, 4),
           "images_per_s": round(args.batch / med, 2), "min_step_s": round(min(times), 4),
           "max_step_s": round(max(times), 4), "cpu_count": os.cpu_count(),
           "loadavg_1m": round(os.getloadavg()[0], 2), "loss_last": float(m["total_loss"])}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
