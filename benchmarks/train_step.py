"""Images/s of the full training update step (forward + AlignOTA + targets + loss + backward +
optimizer + EMA, one jit, donated state) on synthetic batches, with its parts timed separately.

    python benchmarks/train_step.py --config s --img-size 320 --batch 8 --steps 12 --num-gt 5
    python benchmarks/train_step.py --config s --grad-impls native matmul --parts fwd grad full
    python benchmarks/train_step.py --config s --pointwise-impls dot conv --parts full
    python benchmarks/train_step.py --config s --img-size 320 --batch 8 --steps 12 --num-gt 5 --no-ema

``--no-ema`` times the step of ANCHORS.md's official figure (forward + assignment + loss + backward +
SGD; ``benchmarks/official_torch.py`` adds the official per-step EMA only with ``--ema``); the default
is the recipe's step with its EMA.

By default a child process compiles every part into a fresh persistent cache and the timed process
loads them (``--compile-here``: compile in the timed process), as the train CLI does
(``train.precompile``): a process that compiled the step itself runs it ~1.3x slower.

Parts (each its own jit, all timed **interleaved**, one call of each per round, so load changes on
a shared machine hit them alike):

* ``model``: the bare train-mode forward (``model.apply(..., train=True)``, BN statistics updated);
* ``fwd``:   forward + AlignOTA + targets + QFL/GIoU/DFL loss (no gradient);
* ``grad``:  ``jax.value_and_grad`` of that loss (forward + backward);
* ``full``:  ``damo_jax.train.loop.make_update_fn`` (value_and_grad + optimizer + EMA + the
  non-finite guard), state donated — what the train CLI runs.

backward = grad - fwd; optimizer + EMA + guard = full - grad. ``--grad-impls`` lists values of
``model.grad_impl`` to compare (``native``: XLA's conv gradients; ``matmul``:
``damo_jax/models/conv_grad.py``; ``onednn``: dense convs in oneDNN, ``models/onednn.py``;
``auto``: onednn on a one-device CPU process when the library loads, else matmul), ``--pointwise-impls`` values of
``model.pointwise_impl`` (``conv``: 1x1 convs as ``conv_general_dilated``; ``dot``: as matrix
products, ``damo_jax/models/cpu_ops.py``; ``auto``: dot on CPU), ``--bn-impls`` values of
``model.bn_impl`` (``xla``; ``native``: one call per BatchNorm + ReLU on every core,
``damo_jax/models/batchnorm_ffi.c``; ``auto``: native in a one-device CPU process),
``--conv3x3-impls`` values of ``model.conv3x3_impl`` (``direct``: oneDNN's kernels; ``winograd``:
F(2x2, 3x3), ``damo_jax/models/winograd_ffi.c``; ``auto``: winograd where oneDNN's best ISA is
AVX2); every combination is timed (rows are labelled ``grad_impl``, plus ``/pointwise_impl``,
``/bn:bn_impl`` and ``/3x3:conv3x3_impl`` when several of those are given).
The last stdout line is a one-line JSON summary; ``images_per_s`` is the full step of the first
combination, ``step_s`` that part's wall time of every timed round in order (warm-up trends and
host-noise bursts show there, not in the median).

Official anchor (../shared/reference/ANCHORS.md, PyTorch eager on this machine kind): S@320,
batch 8, forward + assignment + loss + backward + SGD: 2.42 images/s (table, Intel AVX-512 host,
quiet); 2.61-3.44 images/s (side-by-side passes of 2026-12-01, AMD EPYC AVX2 host).
Results go to docs/bench_train.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from damo_jax.runtime import cpu_model

OFFICIAL_TABLE_IMG_S = 2.42
OFFICIAL_SIDE_BY_SIDE_IMG_S = (2.61, 3.44)


def synthetic_batch(batch: int, hw: int, num_gt: int, num_classes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.uniform(np.log(12), np.log(hw / 2), size=(batch, num_gt, 2)))
    x1y1 = rng.uniform(0, 1, size=(batch, num_gt, 2)) * (hw - sizes)
    return {"images": rng.integers(0, 256, size=(batch, hw, hw, 3), dtype=np.uint8),
            "gt_boxes": np.concatenate([x1y1, x1y1 + sizes], -1).astype(np.float32),
            "gt_labels": rng.integers(0, num_classes, size=(batch, num_gt)).astype(np.int32),
            "gt_valid": np.ones((batch, num_gt), bool)}


def make_loss(model, cfg):
    """``loss(params, batch_stats, batch) -> (total, new_batch_stats)``: the update step's loss."""
    import jax
    import jax.numpy as jnp

    from damo_jax.assign.ota import align_ota, build_targets
    from damo_jax.losses import detection_loss

    nc, reg_max = int(cfg.model.head.num_classes), int(cfg.model.head.reg_max)

    def loss(params, batch_stats, batch):
        out, mutated = model.apply({"params": params, "batch_stats": batch_stats},
                                   batch["images"].astype(jnp.float32), train=True,
                                   mutable=["batch_stats"])
        assignment = align_ota(jax.lax.stop_gradient(out["scores"]), out["priors"],
                               jax.lax.stop_gradient(out["boxes"]), batch["gt_boxes"],
                               batch["gt_labels"], batch["gt_valid"])
        targets = build_targets(assignment, out["priors"], batch["gt_boxes"], batch["gt_labels"],
                                num_classes=nc, reg_max=reg_max)
        total, _ = detection_loss(out, targets, reg_max=reg_max)
        return total, mutated["batch_stats"]
    return loss


def build_parts(cfg, parts, lr_fn, repl, data_sh, key):
    """{part: (callable(batch) -> result to block on)} for one config; ``full`` keeps its donated
    state in a closure."""
    import jax

    from damo_jax.models import build_model
    from damo_jax.train.loop import init_state, make_tx, make_update_fn

    model = build_model(cfg)
    state = {"s": init_state(model, cfg, key, repl)}
    params, stats = state["s"]["params"], state["s"]["batch_stats"]
    params = jax.tree.map(lambda a: a.copy(), params)
    stats = jax.tree.map(lambda a: a.copy(), stats)
    loss = make_loss(model, cfg)
    fns = {}
    if "model" in parts:
        f = jax.jit(lambda p, s, b: model.apply({"params": p, "batch_stats": s},
                                                b["images"].astype("float32"), train=True,
                                                mutable=["batch_stats"])[0]["scores"])
        fns["model"] = lambda b: f(params, stats, b)
    if "fwd" in parts:
        f_fwd = jax.jit(lambda p, s, b: loss(p, s, b)[0])
        fns["fwd"] = lambda b: f_fwd(params, stats, b)
    if "grad" in parts:
        f_grad = jax.jit(lambda p, s, b: jax.value_and_grad(lambda q: loss(q, s, b), has_aux=True)(p))
        fns["grad"] = lambda b: f_grad(params, stats, b)
    if "full" in parts:
        tx = make_tx(cfg, state["s"]["params"], state["s"]["batch_stats"])
        update = jax.jit(make_update_fn(model, tx, lr_fn, cfg), in_shardings=(repl, data_sh),
                         out_shardings=(repl, repl), donate_argnums=0)

        def full(b):
            state["s"], m = update(state["s"], b)
            return m
        fns["full"] = full
    return fns


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="s")
    ap.add_argument("--img-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="timed rounds (one call of every part each)")
    ap.add_argument("--num-gt", type=int, default=10, help="valid GT boxes per image (padded G = 2x)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--grad-impls", nargs="+", default=["auto"],
                    help="model.grad_impl values to compare (auto, native, matmul, onednn)")
    ap.add_argument("--pointwise-impls", nargs="+", default=["auto"],
                    help="model.pointwise_impl values to compare (auto, conv, dot)")
    ap.add_argument("--bn-impls", nargs="+", default=["auto"],
                    help="model.bn_impl values to compare (auto, xla, native)")
    ap.add_argument("--conv3x3-impls", nargs="+", default=["auto"],
                    help="model.conv3x3_impl values to compare (auto, direct, winograd)")
    ap.add_argument("--parts", nargs="+", default=["full"], choices=("model", "fwd", "grad", "full"),
                    help="what to time (default: full); fwd/grad give the forward/backward split")
    ap.add_argument("--no-ema", action="store_true",
                    help="train.ema=False: the step of ANCHORS.md's official figure (forward + assignment + "
                         "loss + backward + SGD, no EMA); the default times the recipe's step with its EMA")
    ap.add_argument("--no-tune", action="store_true",
                    help="skip damo_jax.runtime.tune_cpu_runtime() (the train CLI applies it)")
    ap.add_argument("--compile-here", action="store_true",
                    help="compile in this process (default: a child process compiles every part into a "
                         "fresh persistent cache and this process loads them, as the train CLI does with "
                         "train.precompile: a process that compiled the step runs it ~1.3x slower)")
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)   # the child
    args = ap.parse_args(argv)
    if not args.no_tune:
        from damo_jax import runtime
        runtime.tune_cpu_runtime()

    import jax
    child_s = None
    if not args.compile_here:
        import subprocess
        import sys
        import tempfile
        cache = os.environ.get("DAMO_JAX_BENCH_CACHE")
        if not cache:                         # a fresh cache of this run's own: removed when it ends
            import atexit
            import shutil
            cache = tempfile.mkdtemp(prefix="damo_bench_xla_")
            atexit.register(shutil.rmtree, cache, True)
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        if not args.compile_only:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                            "--compile-only"], check=True, env=dict(os.environ, DAMO_JAX_BENCH_CACHE=cache))
            child_s = time.perf_counter() - t0
    from jax.sharding import NamedSharding, PartitionSpec as P

    from damo_jax.config import load_config
    from damo_jax.train import optim
    from damo_jax.train.loop import make_mesh, shard_batch

    mesh = make_mesh()
    repl, data_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    lr_fn = optim.make_lr_schedule(base_lr=0.01 / 64 * args.batch, total_steps=1000, warmup_steps=0,
                                   no_aug_steps=0, min_lr_ratio=0.05)
    load0 = os.getloadavg()[0]
    fns, compile_s = {}, {}
    batches = None
    variants = {"/".join([g] + ([p] if len(args.pointwise_impls) > 1 else [])
                         + ([f"bn:{b}"] if len(args.bn_impls) > 1 else [])
                         + ([f"3x3:{w}"] if len(args.conv3x3_impls) > 1 else [])): (g, p, b, w)
                for g in args.grad_impls for p in args.pointwise_impls for b in args.bn_impls
                for w in args.conv3x3_impls}
    for impl, (grad_impl, pointwise_impl, bn_impl, conv3x3_impl) in variants.items():
        cfg = load_config(args.config)
        cfg.data.image_size = (args.img_size, args.img_size)
        cfg.train.batch_size = args.batch
        cfg.model.dtype = args.dtype
        cfg.model.grad_impl = grad_impl
        cfg.model.pointwise_impl = pointwise_impl
        cfg.model.bn_impl = bn_impl
        cfg.model.conv3x3_impl = conv3x3_impl
        if args.no_ema:
            cfg.train.ema = False
        if batches is None:
            nc = int(cfg.model.head.num_classes)
            batches = []
            for i in range(3):
                b = synthetic_batch(args.batch, args.img_size, args.num_gt, nc, seed=i)
                pad = lambda a, v: np.concatenate([a, np.full_like(a, v)], axis=1)  # noqa: E731
                b = {"images": b["images"], "gt_boxes": pad(b["gt_boxes"], 0),
                     "gt_labels": pad(b["gt_labels"], 0), "gt_valid": pad(b["gt_valid"], False)}
                batches.append(shard_batch(b, data_sh))
        for part, fn in build_parts(cfg, args.parts, lr_fn, repl, data_sh, jax.random.PRNGKey(0)).items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(batches[0]))
            compile_s[(impl, part)] = time.perf_counter() - t0
            fns[(impl, part)] = fn
            print(f"compiled {impl}/{part} in {compile_s[(impl, part)]:.1f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    if args.compile_only:
        print(f"compile-only child: compiled {len(fns)} parts into {jax.config.jax_compilation_cache_dir}")
        return {}
    for fn in fns.values():   # one more warm-up call each
        jax.block_until_ready(fn(batches[1]))
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for i in range(args.steps):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(batches[i % len(batches)]))
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    load1 = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in wall.items()}
    medc = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"{args.config}@{args.img_size} batch {args.batch}, {args.num_gt} GT/image, "
          f"{cpu_model()}, load {load0:.1f} -> {load1:.1f}")
    print("| grad_impl | part | median s | min s | CPU s (median) | img/s (median) | compile s |")
    print("|---|---|---|---|---|---|---|")
    for (impl, part), v in wall.items():
        print(f"| {impl} | {part} | {med[(impl, part)]:.3f} | {min(v):.3f} | {medc[(impl, part)]:.3f} "
              f"| {args.batch / med[(impl, part)]:.2f} | {compile_s[(impl, part)]:.0f} |")
    for impl in variants:
        if (impl, "fwd") in med and (impl, "grad") in med:
            print(f"{impl}: backward = grad - fwd = {med[(impl, 'grad')] - med[(impl, 'fwd')]:.3f} s")
        if (impl, "grad") in med and (impl, "full") in med:
            print(f"{impl}: optimizer + EMA + guard = full - grad = "
                  f"{med[(impl, 'full')] - med[(impl, 'grad')]:.3f} s")
    first = next(iter(variants))
    key = (first, "full") if (first, "full") in med else next(iter(med))
    ips = args.batch / med[key]
    # the official anchors are S@320 batch-8 steps on this 2-core CPU kind: no ratio for anything else
    anchored = (jax.default_backend() == "cpu" and args.config == "s" and args.img_size == 320
                and args.batch == 8)
    res = {"config": args.config, "img_size": args.img_size, "batch": args.batch, "steps": args.steps,
           "num_gt": args.num_gt, "dtype": args.dtype, "tuned": not args.no_tune,
           "grad_impl": first, "part": key[1], "ema": not args.no_ema, "devices": len(jax.devices()),
           "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
           "cpu": cpu_model(), "cpu_count": os.cpu_count(),
           "compile_plus_first_step_s": round(compile_s[key], 1), "median_step_s": round(med[key], 4),
           "compiled_in": "this process" if args.compile_here else "child process (loaded from cache)",
           "child_compile_s": None if child_s is None else round(child_s, 1),
           "images_per_s": round(ips, 2), "min_step_s": round(min(wall[key]), 4),
           "max_step_s": round(max(wall[key]), 4), "cpu_s_median": round(medc[key], 4),
           "step_s": [round(v, 4) for v in wall[key]],
           "ratio_to_official_table": round(ips / OFFICIAL_TABLE_IMG_S, 2) if anchored else None,
           "ratio_to_official_side_by_side": ([round(ips / v, 2) for v in OFFICIAL_SIDE_BY_SIDE_IMG_S]
                                              if anchored else None),
           "parts_median_s": {f"{i}/{p}": round(v, 4) for (i, p), v in med.items()},
           "loadavg_1m": [round(load0, 2), round(load1, 2)]}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
