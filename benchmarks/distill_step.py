"""Step-time cost of distillation: the train CLI's update step without and with a teacher
(teacher backbone + neck forward, align convs, CWD loss and their backward included), same
student, batch and size, timed interleaved (one call of each per round) on synthetic batches.

    python benchmarks/distill_step.py --student ns --teacher nm --img-size 128 --batch 8 --rounds 5

The teacher has random weights (the cost does not depend on the values). The last stdout line is
a one-line JSON summary. Results go to docs/BENCHMARKS.md ("Distillation").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="ns")
    p.add_argument("--teacher", default="nm")
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    from damo_jax import runtime
    runtime.tune_cpu_runtime()
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from damo_jax.config import load_config
    from damo_jax.models import build_model, init_variables
    from damo_jax.train import distill, loop, optim

    cfg = load_config(args.student)
    size = args.img_size
    cfg.data.image_size, cfg.train.batch_size, cfg.data.max_boxes = (size, size), args.batch, 8
    cfg.distill.teacher, cfg.distill.teacher_weights = args.teacher, "(random)"
    distill.resolve_grad_clip(cfg)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    repl, dsh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    lr_fn, _ = optim.schedule_from_config(cfg.train, steps_per_epoch=100, global_batch=args.batch)
    model = build_model(cfg)
    tcfg = distill._teacher_cfg(cfg, load_config(args.teacher).model)
    tmodel = build_model(tcfg)
    tvars = jax.tree.map(np.asarray, init_variables(tmodel, jax.random.PRNGKey(1)))
    teacher = distill.Teacher(cfg=tcfg, model=tmodel, variables=tvars, has_head=True, source="random")

    rng = np.random.default_rng(0)
    b, g = args.batch, 8
    wh = rng.uniform(8, size / 3, size=(b, g, 2))
    xy = rng.uniform(0, 1, size=(b, g, 2)) * (size - wh)
    batch = loop.shard_batch({"images": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
                              "gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
                              "gt_labels": rng.integers(0, 6, (b, g)).astype(np.int32),
                              "gt_valid": np.ones((b, g), bool)}, dsh)
    cfg.model.head["num_classes"] = 6
    plain_state = loop.init_state(model, cfg, jax.random.PRNGKey(0), repl)
    tx = loop.make_tx(cfg, plain_state["params"], plain_state["batch_stats"])
    align_tx, kd_state = distill.attach(loop.init_state(model, cfg, jax.random.PRNGKey(0), repl), cfg,
                                        teacher, repl)
    steps = {
        "plain": [jax.jit(loop.make_update_fn(model, tx, lr_fn, cfg), donate_argnums=0), plain_state],
        "distill": [jax.jit(loop.make_update_fn(model, tx, lr_fn, cfg, teacher=teacher, align_tx=align_tx,
                                                total_steps=1000), donate_argnums=0), kd_state],
    }
    compile_s, times = {}, {k: [] for k in steps}
    for name, entry in steps.items():
        t0 = time.perf_counter()
        entry[1], m = entry[0](entry[1], batch)
        jax.block_until_ready(m)
        compile_s[name] = time.perf_counter() - t0
    for _ in range(args.rounds):
        for name, entry in steps.items():
            t0 = time.perf_counter()
            entry[1], m = entry[0](entry[1], batch)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    summary = {"student": args.student, "teacher": args.teacher, "img_size": size, "batch": b,
               "median_s": med, "all_s": times, "compile_s": compile_s,
               "overhead": med["distill"] / med["plain"] - 1.0, "load": os.getloadavg()}
    for name in steps:
        print(f"{name:8s} median {med[name]:.3f} s/step  ({', '.join(f'{t:.2f}' for t in times[name])})")
    print(f"distillation overhead: {100 * summary['overhead']:+.1f}% per step")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
