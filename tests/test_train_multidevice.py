"""Data parallelism: one update step on 4 (fake CPU) devices equals the same step on 1 device.

Runs in a subprocess because ``--xla_force_host_platform_device_count`` must be set before JAX
initialises (the rest of the test session has 1 device). The program is the update step of the
tiny CLI test config (tests/train_setup.py: Ns 64×64, batch 4, SGD — so float noise is not
amplified the way Adam's first step amplifies it, TOOLCHAIN §3); the state is a fresh one at the
end of warmup (lr = base lr); the global batch is the same 4 images on both meshes.

Compared: loss terms and grad norm (≤ 1e-5 relative); per tensor, the new parameters, BN running
statistics, EMA and SGD momentum buffers (= the decayed gradients): max |Δ| ≤ 1e-5 · max(1, max
|value|) (zero-initialised tensors such as BN biases / running means hold only float noise relative
to themselves); and, as whole vectors (L2-relative ≤ 5e-5), the gradients (momentum buffers) and
the BN statistics updates (tensors whose true gradient is exactly 0, like a BN bias feeding
another BN, get float-noise gradients of ~1e-12 that differ between reductions, so a per-tensor
relative test of gradients is meaningless for them). Also the non-finite guard on 4 devices: NaN parameters → ``finite`` False
and the returned state is the input state.
"""
from __future__ import annotations

import json
import subprocess
import sys

from train_setup import ROOT, shared_dir, train_env

SCRIPT = r'''
import json, sys
from damo_jax import runtime
runtime.tune_cpu_runtime()                 # as the train CLI does (same XLA flags -> same cache keys)
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from damo_jax.train import optim
from damo_jax.train import loop as train
from damo_jax.config import load_config
from damo_jax.models import build_model

assert len(jax.devices()) == 4, jax.devices()
# the tiny CLI test config and what the CLI derives from its data (2 classes, 16 images, batch 4),
# so init and the 4-device step are the very programs of the CLI test runs (shared XLA cache)
cfg = load_config(sys.argv[1])
cfg.model.head["num_classes"] = 2
cfg.model.class_names = ("square", "disc")
rl = train.run_length(cfg, 16)
lr_fn, _ = optim.schedule_from_config(cfg.train, steps_per_epoch=rl.steps_per_epoch,
                                      global_batch=int(cfg.train.batch_size))
model = build_model(cfg)

rng = np.random.default_rng(0)
B, G = 4, int(cfg.data.max_boxes)
wh = rng.uniform(10, 40, size=(B, G, 2))
xy = rng.uniform(0, 1, size=(B, G, 2)) * (64 - wh)
valid = np.zeros((B, G), bool)
valid[0, :2], valid[1, :1], valid[2, :3] = True, True, True      # image 3 has no GT
batch = {"images": rng.integers(0, 256, size=(B, 64, 64, 3), dtype=np.uint8),
         "gt_boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
         "gt_labels": rng.integers(0, 2, size=(B, G)).astype(np.int32), "gt_valid": valid}

def shardings(n):
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

state0 = jax.device_get(train.init_state(model, cfg, jax.random.PRNGKey(0), shardings(4)[0]))
state0["step"] = np.asarray(rl.warmup_steps, np.int32)     # end of warmup: lr = base lr
tx = train.make_tx(cfg, state0["params"], state0["batch_stats"])
runs, updates = {}, {}
for n in (4, 1):
    repl, dsh = shardings(n)
    updates[n] = jax.jit(train.make_update_fn(model, tx, lr_fn, cfg), in_shardings=(repl, dsh),
                         out_shardings=(repl, repl), donate_argnums=0)
    new, metrics = updates[n](jax.device_put(state0, repl), train.shard_batch(batch, dsh))
    assert len(new["step"].sharding.device_set) == n
    runs[n] = (jax.device_get(new), jax.device_get(metrics))

(n1, m1), (n4, m4) = runs[1], runs[4]
out = {"metrics": {k: [float(m1[k]), float(m4[k])] for k in
                   ("total_loss", "loss_cls", "loss_bbox", "loss_dfl", "grad_norm", "lr")},
       "finite": [bool(m1["finite"]), bool(m4["finite"])], "base_lr": float(lr_fn(rl.warmup_steps))}

def compare(a_new, a_old, b_new, b_old):
    """Worst per-tensor difference of the NEW values, max |a − b| / max(1, max |a|), and the global
    L2-relative difference of the UPDATES Δ = new − old (a gradient-level comparison that is not
    dominated by tensors whose true gradient is 0, e.g. a BN bias right before another BN)."""
    worst, num, den = (0.0, ""), 0.0, 0.0
    for (path, an), ao, bn, bo in zip(jax.tree_util.tree_leaves_with_path(a_new),
                                      *(jax.tree.leaves(t) for t in (a_old, b_new, b_old))):
        an, bn = np.asarray(an, np.float64), np.asarray(bn, np.float64)
        rel = float(np.abs(an - bn).max() / max(np.abs(an).max(), 1.0))
        worst = max(worst, (rel, jax.tree_util.keystr(path)))
        da, db = an - ao, bn - bo
        num, den = num + float(((da - db) ** 2).sum()), den + float((da ** 2).sum())
    return {"worst_new_rel": worst, "update_l2_rel": (num / max(den, 1e-300)) ** 0.5}

for name in ("params", "batch_stats", "ema_params", "ema_batch_stats"):
    out[name] = compare(n1[name], state0[name], n4[name], state0[name])
# SGD momentum buffers after one step = the (decayed) gradients: a direct gradient comparison
out["momentum"] = compare(n1["opt_state"], jax.tree.map(np.zeros_like, state0["opt_state"]),
                          n4["opt_state"], jax.tree.map(np.zeros_like, state0["opt_state"]))
out["params_moved"] = max(float(np.abs(np.asarray(x) - y).max()) for x, y in
                          zip(jax.tree.leaves(n1["params"]), jax.tree.leaves(state0["params"])))
out["steps"] = [int(n1["step"]), int(n4["step"])]

# non-finite guard on 4 devices (same compiled step): NaN parameters -> finite False, state unchanged
repl, dsh = shardings(4)
bad_host = dict(n4, params=jax.tree.map(lambda x: x * np.nan, n4["params"]))
kept, m = updates[4](jax.device_put(bad_host, repl), train.shard_batch(batch, dsh))
kept = jax.device_get(kept)
out["nan_finite_flag"] = bool(m["finite"])
out["nan_state_kept"] = all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in
                            zip(jax.tree.leaves(kept), jax.tree.leaves(bad_host)))
print("RESULT " + json.dumps(out))
'''


def test_one_step_on_4_devices_equals_1_device():
    env = train_env()                       # 4 CPU devices, the XLA cache of the CLI test runs
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(shared_dir() / "tiny.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res["finite"] == [True, True] and res["steps"] == [5, 5]
    for key, (one, four) in res["metrics"].items():
        assert abs(one - four) <= 1e-5 * max(abs(one), 1e-6), (key, one, four)
    assert res["metrics"]["lr"][0] == res["base_lr"] > 0
    assert res["params_moved"] > 1e-7                       # the step really changed the weights
    print("multi-device comparison:", json.dumps(res))
    for name in ("params", "batch_stats", "ema_params", "ema_batch_stats", "momentum"):
        assert res[name]["worst_new_rel"][0] <= 1e-5, (name, res[name])
    # gradient-level: the momentum buffers ARE the (decayed) gradients, the BN statistics moved by
    # 3% of the batch moments (the parameters' own new − old is dominated by float32 rounding of
    # ~1e-6 updates on O(0.1) weights, so it is not compared as a vector)
    for name in ("momentum", "batch_stats"):
        assert res[name]["update_l2_rel"] <= 5e-5, (name, res[name])
    assert res["nan_finite_flag"] is False and res["nan_state_kept"], res
