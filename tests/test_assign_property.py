"""Properties of the batched AlignOTA: jit vs the NumPy per-image reference on random cases
(hypothesis), invariants, vmap, sharding, Sinkhorn OT, and NaN-free losses on empty batches."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import ref_align_ota as ref
from damo_jax import losses
from damo_jax.assign import ota as assign
from damo_jax.assign import sinkhorn as sinkhorn_ota
from damo_jax.models import make_priors

H, W, B, G_PAD, C = 64, 96, 3, 6, 4
PRIORS = make_priors(H, W)                                  # A = 96 + 24 + 6 = 126
NUM_PRIORS = PRIORS.shape[0]
# (H, W, G) shape buckets of the property test: one compile each
BUCKETS = ((H, W, G_PAD), (32, 64, 3))                      # A = 126 and 42


def random_image(rng, num_gt, style, size=(H, W)):
    """GT boxes, labels, predicted boxes and scores of one image, in a named style."""
    h, w = size
    num_priors = make_priors(h, w).shape[0]
    cx, cy = rng.uniform(-8, w + 8, num_gt), rng.uniform(-8, h + 8, num_gt)
    side = np.exp(rng.uniform(np.log(2), np.log(80), (num_gt, 2)))
    gt = np.stack([cx - side[:, 0] / 2, cy - side[:, 1] / 2, cx + side[:, 0] / 2,
                   cy + side[:, 1] / 2], 1)
    if style == "degenerate" and num_gt:
        gt[0, 2] = gt[0, 0]                                    # zero-width GT
    if style == "duplicates" and num_gt > 1:
        gt[1] = gt[0]
    if style == "on_grid":
        gt = np.round(gt / 8) * 8                              # edges on prior points
    labels = rng.integers(0, C, num_gt)
    owner = rng.integers(0, max(num_gt, 1), num_priors)
    base = gt[owner] if num_gt else np.tile([[10.0, 10.0, 30.0, 30.0]], (num_priors, 1))
    pred = base + rng.normal(0, rng.uniform(0.5, 12), (num_priors, 4))
    if style == "degenerate":
        pred[::5, 2] = pred[::5, 0]                            # zero-area predictions
    scores = rng.uniform(0, 1, (num_priors, C)) ** 3
    if style == "extreme_scores":
        scores[rng.uniform(size=scores.shape) < 0.2] = 0.0
        scores[rng.uniform(size=scores.shape) < 0.1] = 1.0
    return gt.astype(np.float32), labels, pred.astype(np.float32), scores.astype(np.float32)


@jax.jit
def _assign_batch(scores, pred, gt, labels, valid):
    return assign.align_ota(scores, make_priors(*_size_of(scores)), pred, gt, labels, valid)


def _size_of(scores):
    """(H, W) of a bucket from the number of priors (static under jit)."""
    return next((h, w) for h, w, _ in BUCKETS if make_priors(h, w).shape[0] == scores.shape[1])


STYLES = ("plain", "degenerate", "duplicates", "on_grid", "extreme_scores")


@settings(max_examples=100, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1),
       num_gts=st.lists(st.integers(0, G_PAD), min_size=B, max_size=B),
       style=st.sampled_from(STYLES), bucket=st.sampled_from(BUCKETS))
def test_jit_batched_matches_numpy_reference(seed, num_gts, style, bucket):
    rng = np.random.default_rng(seed)
    h, w, g_pad = bucket
    priors = make_priors(h, w)
    num_gts = [min(n, g_pad) for n in num_gts]
    gt = np.full((B, g_pad, 4), 5.0, np.float32)               # padding overlaps the image
    labels = np.full((B, g_pad), C + 3, np.int32)              # out-of-range padding labels
    valid = np.zeros((B, g_pad), bool)
    pred = np.zeros((B, priors.shape[0], 4), np.float32)
    scores = np.zeros((B, priors.shape[0], C), np.float32)
    for b, n in enumerate(num_gts):
        gt[b, :n], labels[b, :n], pred[b], scores[b] = random_image(rng, n, style, (h, w))
        valid[b, :n] = True
    out = jax.tree.map(np.asarray, _assign_batch(scores, pred, gt, labels, valid))
    for b, n in enumerate(num_gts):
        want = ref.assign_image(priors, scores[b], pred[b], gt[b, :n], labels[b, :n])
        np.testing.assert_array_equal(out["candidate_mask"][b], want["candidate_mask"])
        np.testing.assert_array_equal(out["dynamic_ks"][b, :n], want["dynamic_ks"])
        np.testing.assert_array_equal(out["gt_index"][b], want["gt_index"])
        np.testing.assert_array_equal(out["fg_mask"][b], want["fg_mask"])
        np.testing.assert_allclose(out["iou"][b], want["iou"], atol=1e-6)
        _check_invariants({k: v[b] for k, v in out.items()}, n)


def _check_invariants(one, num_gt):
    fg, idx = one["fg_mask"], one["gt_index"]
    assert not (fg & ~one["candidate_mask"]).any()
    assert ((idx >= 0) == fg).all() and (idx < max(num_gt, 1)).all()
    assert (idx[fg] < num_gt).all() and ((one["iou"] >= 0) & (one["iou"] <= 1)).all()
    assert (one["dynamic_ks"][num_gt:] == 0).all()
    # (a GT may end up with more than k_t priors: conflicts go to the row argmin over ALL GTs)
    assert int(fg.sum()) <= int(one["dynamic_ks"].sum())
    assert int(one["num_pos"]) == int(fg.sum())


def _easy_case(num_good=5):
    """Three well separated GTs; for each, the ``num_good`` priors nearest its centre predict it
    exactly (IoU 1, so k = num_good), every other prior predicts a far box (IoU 0); constant
    scores (so the background cost is the same for every prior)."""
    gt = np.array([[8, 8, 48, 56], [56, 8, 96, 48], [10, 60, 50, 110]], np.float32)[None]
    h, w = 128, 128
    priors = make_priors(h, w)
    centres = (gt[0, :, :2] + gt[0, :, 2:]) / 2
    dist = np.hypot(priors[:, None, 0] - centres[:, 0], priors[:, None, 1] - centres[:, 1])
    owner = dist.argmin(1)
    pred = gt[0, owner] + 300.0
    for t in range(3):
        pred[np.argsort(dist[:, t])[:num_good]] = gt[0, t]
    scores = np.full((1, priors.shape[0], C), 0.1, np.float32)
    labels, valid = np.array([[0, 1, 2]]), np.ones((1, 3), bool)
    return scores, priors, pred[None].astype(np.float32), gt, labels, valid


def test_sinkhorn_agrees_with_dynamic_k_on_easy_case():
    args = _easy_case()
    dyn = jax.jit(assign.align_ota)(*args)
    ot = jax.jit(lambda *a: assign.align_ota(*a, method="sinkhorn", return_intermediates=True))(
        *args)
    np.testing.assert_array_equal(np.asarray(dyn["dynamic_ks"]), [[5, 5, 5]])
    np.testing.assert_array_equal(np.asarray(ot["gt_index"]), np.asarray(dyn["gt_index"]))
    plan, cand = np.asarray(ot["transport_plan"][0]), np.asarray(ot["candidate_mask"][0])
    np.testing.assert_allclose(plan.sum(1), cand.astype(np.float32), atol=1e-5)     # demand
    # supply: this optimum sits on the boundary (each GT column can only use its 5 exact
    # priors), which Sinkhorn approaches like 1/iterations: 4.91 of 5 after 50 iterations
    np.testing.assert_allclose(plan.sum(0)[:3], [5, 5, 5], atol=0.1)


@pytest.mark.parametrize("ks, expected_gt_supply", [((1, 3, 2, 4), (1, 3, 2, 4)),
                                                     ((9, 9, 9, 9), (7.5, 7.5, 7.5, 7.5))])
def test_sinkhorn_plan_marginals(ks, expected_gt_supply):
    """Random interior costs: rows sum to 1 on candidates, columns reach the supplies (GT k_t,
    background the rest; Σk > #candidates scales the GT supplies to fill exactly)."""
    rng = np.random.default_rng(7)
    num_priors, num_gt = 40, 5
    candidate = np.arange(num_priors) % 4 != 0                        # 30 candidates
    gt_valid = np.array([True] * 4 + [False])
    cost = rng.uniform(0, 3, (num_priors, num_gt)).astype(np.float32)
    cost = np.where(candidate[:, None] & gt_valid[None], cost, np.inf).astype(np.float32)
    bg_cost = rng.uniform(0, 3, num_priors).astype(np.float32)
    plan = np.asarray(sinkhorn_ota.transport_plan(
        jnp.asarray(cost), jnp.asarray(bg_cost), jnp.asarray(ks + (1,)), jnp.asarray(candidate),
        jnp.asarray(gt_valid), epsilon=0.5, iters=200))
    assert np.isfinite(plan).all() and (plan >= 0).all()
    np.testing.assert_allclose(plan.sum(1), candidate.astype(np.float32), atol=1e-5)
    supply = list(expected_gt_supply) + [0.0, 30 - sum(expected_gt_supply)]
    np.testing.assert_allclose(plan.sum(0), supply, atol=1e-3)


def test_vmap_over_extra_axis_and_no_gradient_through_assignment():
    rng = np.random.default_rng(0)
    imgs = [random_image(rng, 4, "plain") for _ in range(4)]
    gt, labels, pred, scores = (np.stack([im[i] for im in imgs]).reshape((2, 2) + imgs[0][i].shape)
                                for i in range(4))
    valid = np.ones(labels.shape, bool)
    mapped = jax.jit(jax.vmap(lambda s, p, g, l, v: assign.align_ota(s, PRIORS, p, g, l, v)))(
        scores, pred, gt, labels, valid)
    for i in range(2):
        single = _assign_batch(scores[i], pred[i], gt[i], labels[i], valid[i])
        np.testing.assert_array_equal(mapped["gt_index"][i], single["gt_index"])
    grad = jax.jit(jax.grad(lambda s: jnp.sum(assign.align_ota(
        s, PRIORS, pred[0], gt[0], labels[0], valid[0])["iou"])))(jnp.asarray(scores[0]))
    assert not np.asarray(grad).any()


def test_loss_on_empty_and_all_background_batches_is_finite():
    rng = np.random.default_rng(1)
    reg_max = 7
    scores = jnp.asarray(rng.uniform(0, 1, (2, NUM_PRIORS, C)).astype(np.float32))
    scores = scores.at[0, :5].set(1.0)
    reg = jnp.asarray(rng.normal(0, 3, (2, NUM_PRIORS, 4, reg_max + 1)).astype(np.float32))
    boxes = jnp.asarray(rng.normal(40, 30, (2, NUM_PRIORS, 4)).astype(np.float32))
    gt = np.zeros((2, G_PAD, 4), np.float32)
    labels, valid = np.zeros((2, G_PAD), np.int32), np.zeros((2, G_PAD), bool)

    def loss_fn(s, b, r):
        out = assign.align_ota(s, PRIORS, b, gt, labels, valid)
        tgt = assign.build_targets(out, PRIORS, gt, labels, num_classes=C, reg_max=reg_max)
        return losses.detection_loss(dict(scores=s, boxes=b, reg_logits_flat=r), tgt,
                                     reg_max=reg_max)
    (total, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2),
                                                         has_aux=True))(scores, boxes, reg)
    assert float(metrics["num_pos"]) == 0 and float(metrics["loss_bbox"]) == 0
    assert float(metrics["loss_dfl"]) == 0 and np.isfinite(float(total)) and float(total) > 0
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    assert not np.asarray(grads[1]).any() and not np.asarray(grads[2]).any()


SHARDED_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from damo_jax import losses
    from damo_jax.assign import ota as assign
    import test_assign_property as t
    assert jax.device_count() == 2, jax.devices()
    rng = np.random.default_rng(5)
    imgs = [t.random_image(rng, n, "plain") for n in (3, 0, 6, 2)]
    def pad(arrays, fill):
        out = np.full((len(arrays), t.G_PAD) + arrays[0].shape[1:], fill, arrays[0].dtype)
        for i, x in enumerate(arrays):
            out[i, :len(x)] = x
        return out
    gt, labels = pad([im[0] for im in imgs], 0.0), pad([im[1] for im in imgs], 0)
    valid = pad([np.ones(len(im[1]), bool) for im in imgs], False)
    pred, scores = np.stack([im[2] for im in imgs]), np.stack([im[3] for im in imgs])
    def step(s, p, g, l, v):
        out = assign.align_ota(s, t.PRIORS, p, g, l, v)
        tgt = assign.build_targets(out, t.PRIORS, g, l, num_classes=t.C, reg_max=7)
        reg = jax.numpy.zeros(p.shape[:2] + (4, 8))
        _, m = losses.detection_loss(dict(scores=s, boxes=p, reg_logits_flat=reg), tgt, reg_max=7)
        return out["gt_index"], m["total_loss"], m["num_pos"]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, shard) for a in (scores, pred, gt, labels, valid)]
    sharded = jax.jit(step)(*args)
    plain = jax.jit(step)(scores, pred, gt, labels, valid)
    assert sharded[0].sharding.spec[0] == "data", sharded[0].sharding
    np.testing.assert_array_equal(np.asarray(sharded[0]), np.asarray(plain[0]))
    np.testing.assert_allclose(float(sharded[1]), float(plain[1]), rtol=1e-6)
    assert float(sharded[2]) == float(plain[2]) > 0

    def local_step(s, p, g, l, v):         # official DDP semantics: pmean-ed normalisers
        out = assign.align_ota(s, t.PRIORS, p, g, l, v)
        tgt = assign.build_targets(out, t.PRIORS, g, l, num_classes=t.C, reg_max=7)
        reg = jax.numpy.zeros(p.shape[:2] + (4, 8))
        total, _ = losses.detection_loss(dict(scores=s, boxes=p, reg_logits_flat=reg), tgt,
                                         reg_max=7, axis_name="data")
        return jax.lax.pmean(total, "data")  # = what averaging the device gradients optimises
    mapped = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=P("data"), out_specs=P()))
    np.testing.assert_allclose(float(mapped(*args)), float(plain[1]), rtol=1e-5)
    print("SHARDED_OK")
""")


def test_batch_sharded_over_two_devices_matches_unsharded():
    """NamedSharding on the batch axis (2 fake CPU devices, in a subprocess because the device
    count is fixed when jax is first imported)."""
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.format(tests=tests)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr
