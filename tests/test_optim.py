"""Optimisation recipe (SPEC §9.1): lr schedule, weight-decay mask, SGD/AdamW numerics, EMA ramp."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from damo_jax.train import optim


# ---------------------------------------------------------------- lr schedule
def _lr_reference(it, base, T, W, Na, ratio):
    """SPEC §9.1 formula written independently with math (the official scheduler)."""
    if it < W:
        return base * (it / W) ** 2
    if it >= T - Na:
        return base * ratio
    mn = base * ratio
    return mn + 0.5 * (base - mn) * (1 + math.cos(math.pi * (it - W) / (T - W - Na)))


def test_lr_schedule_matches_spec_formula_coco():
    # COCO numbers of SPEC §9.1: ipe = 463, T = 138 900, W = 2 315, Na = 7 408, base 0.04.
    ipe = 463
    sched, consts = optim.schedule_from_config(
        ml_collections.ConfigDict(dict(base_lr_per_img=0.01 / 64, epochs=300, warmup_epochs=5,
                                       no_aug_epochs=16, min_lr_ratio=0.05)),
        steps_per_epoch=ipe, global_batch=256)
    assert consts["total_steps"] == 138_900 and consts["warmup_steps"] == 2_315
    assert consts["no_aug_steps"] == 7_408 and consts["base_lr"] == pytest.approx(0.04)
    its = [0, 1, 100, 2314, 2315, 2316, 50_000, 131_491, 131_492, 138_899]
    got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(its)))
    want = [_lr_reference(i, 0.04, 138_900, 2_315, 7_408, 0.05) for i in its]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
    assert got[0] == 0.0                                   # quadratic warmup starts at 0
    assert got[4] == pytest.approx(0.04, rel=1e-6)         # top of the cosine at it = W
    assert got[-1] == pytest.approx(0.002, rel=1e-6)       # constant tail base·0.05
    assert got[-2] == pytest.approx(0.002, rel=1e-6)       # tail starts at T − Na


def test_lr_schedule_small_run_is_monotone_pieces():
    T, W, Na = 60, 10, 10
    lrs = np.asarray([float(optim.lr_at(i, base_lr=1.0, total_steps=T, warmup_steps=W,
                                        no_aug_steps=Na, min_lr_ratio=0.05)) for i in range(T)])
    want = np.asarray([_lr_reference(i, 1.0, T, W, Na, 0.05) for i in range(T)])
    np.testing.assert_allclose(lrs, want, rtol=1e-6, atol=1e-9)
    assert np.all(np.diff(lrs[:W + 1]) > 0) and np.all(np.diff(lrs[W:T - Na]) < 0)
    assert np.all(lrs[T - Na:] == lrs[-1])


# ---------------------------------------------------------------- weight-decay mask
class _Scale(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("scale", nn.initializers.ones, ())


class _Tiny(nn.Module):
    """conv (no bias) + BN, conv with bias, a Scale scalar, a LayerNorm (name-based rule)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.97, epsilon=1e-3, name="bn")(x)
        x = nn.Conv(3, (1, 1), use_bias=True, name="head_conv")(x)
        x = _Scale(name="scales_0")(x)
        return nn.LayerNorm(name="ln_norm")(x)


def test_decay_mask_conv_and_scales_only():
    v = _Tiny().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    mask = optim.decay_mask(v["params"], v["batch_stats"])
    assert mask["conv"]["kernel"] is True
    assert mask["head_conv"]["kernel"] is True
    assert mask["scales_0"]["scale"] is True              # per-level Scale scalar IS decayed
    assert mask["head_conv"]["bias"] is False
    assert mask["bn"]["scale"] is False and mask["bn"]["bias"] is False
    assert mask["ln_norm"]["scale"] is False and mask["ln_norm"]["bias"] is False
    counts = optim.count_decayed(mask, v["params"])
    assert counts["decayed_tensors"] == 3 and counts["plain_tensors"] == 5


def test_decay_mask_bn_found_through_batch_stats_not_name():
    params = {"blk": {"odd_name": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
                      "w": {"kernel": jnp.ones((3, 3, 4, 4))}}}
    stats = {"blk": {"odd_name": {"mean": jnp.zeros(4), "var": jnp.ones(4)}}}
    mask = optim.decay_mask(params, stats)
    assert mask["blk"]["odd_name"]["scale"] is False
    assert mask["blk"]["w"]["kernel"] is True
    assert optim.decay_mask(params)["blk"]["odd_name"]["scale"] is True  # without stats: not a norm


# ---------------------------------------------------------------- optimizer numerics
def _cfg(**kw):
    base = dict(optimizer="sgd", weight_decay=5e-4, momentum=0.9, nesterov=True,
                adam_betas=(0.9, 0.999), adam_eps=1e-8, grad_clip=0.0)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _torch_sgd_reference(p0, grads, lrs, wd, mask, momentum=0.9):
    """PyTorch SGD(nesterov=True, dampening=0) with coupled weight decay, in numpy."""
    p = {k: v.astype(np.float64).copy() for k, v in p0.items()}
    buf = {}
    for g_all, lr in zip(grads, lrs):
        for k in p:
            g = g_all[k] + (wd * p[k] if mask[k] else 0.0)
            buf[k] = g.copy() if k not in buf else momentum * buf[k] + g
            p[k] = p[k] - lr * (g + momentum * buf[k])
    return p


def _torch_adamw_reference(p0, grads, lrs, wd, mask, b1=0.9, b2=0.999, eps=1e-8):
    p = {k: v.astype(np.float64).copy() for k, v in p0.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (g_all, lr) in enumerate(zip(grads, lrs), start=1):
        for k in p:
            if mask[k]:
                p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g_all[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g_all[k] ** 2
            denom = np.sqrt(v2[k]) / math.sqrt(1 - b2 ** t) + eps
            p[k] = p[k] - lr / (1 - b1 ** t) * m[k] / denom
    return p


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_matches_pytorch_semantics(kind):
    rng = np.random.default_rng(0)
    p0 = {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
          "bias": rng.normal(size=(4,)).astype(np.float32),
          "scale": np.asarray(1.3, np.float32)}
    mask = {"kernel": True, "bias": False, "scale": True}
    grads = [{k: rng.normal(size=np.shape(v)).astype(np.float32) for k, v in p0.items()} for _ in range(5)]
    sched = optim.make_lr_schedule(base_lr=0.1, total_steps=5, warmup_steps=2, no_aug_steps=1,
                                   min_lr_ratio=0.05)
    lrs = [float(sched(i)) for i in range(5)]
    wd = 5e-4 if kind == "sgd" else 1e-2
    reference = _torch_sgd_reference if kind == "sgd" else _torch_adamw_reference

    def library(weight_decay):
        tx = optim.make_optimizer(_cfg(optimizer=kind, weight_decay=weight_decay), sched, mask)
        params = {k: jnp.asarray(v) for k, v in p0.items()}
        state = tx.init(params)
        for g in grads:
            upd, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
            params = jax.tree.map(lambda a, b: a + b, params, upd)
        return {k: np.asarray(v, np.float64) for k, v in params.items()}

    # the library's optimizer against the reference, with decay on AND off
    on, off = library(wd), library(0.0)
    ref_on, ref_off = reference(p0, grads, lrs, wd, mask), reference(p0, grads, lrs, 0.0, mask)
    for got, ref in ((on, ref_on), (off, ref_off)):
        for k in p0:
            np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # the decay acts on the library's masked parameters (far beyond the tolerance above), and
    # only there: a library that ignored weight_decay or the mask fails here
    for k in p0:
        change = np.abs(on[k] - off[k]).max()
        if mask[k]:
            expected = np.abs(ref_on[k] - ref_off[k]).max()
            assert change > 20 * 2e-6 and change == pytest.approx(expected, rel=0.05), (k, change, expected)
        else:
            assert change < 1e-6, (k, change)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_unit_lr_times_external_lr_equals_scheduled_optimizer(kind):
    """The trainer's form: optimizer with lr 1.0, updates multiplied by lr(step) (damo_jax.train.loop)."""
    rng = np.random.default_rng(1)
    params = {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "bias": jnp.zeros(4)}
    mask = {"kernel": True, "bias": False}
    sched = optim.make_lr_schedule(base_lr=0.1, total_steps=6, warmup_steps=2, no_aug_steps=1,
                                   min_lr_ratio=0.05)
    a = optim.make_optimizer(_cfg(optimizer=kind), sched, mask)
    b = optim.make_optimizer(_cfg(optimizer=kind), 1.0, mask)
    pa, pb, sa, sb = params, params, a.init(params), b.init(params)
    for step in range(6):
        g = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
        ua, sa = a.update(g, sa, pa)
        ub, sb = b.update(g, sb, pb)
        pa = jax.tree.map(lambda p, u: p + u, pa, ua)
        pb = jax.tree.map(lambda p, u: p + sched(step) * u, pb, ub)
    for k in params:
        np.testing.assert_allclose(np.asarray(pa[k]), np.asarray(pb[k]), rtol=1e-6, atol=1e-7)


def test_optimizer_bad_name_raises():
    with pytest.raises(ValueError, match="train.optimizer"):
        optim.make_optimizer(_cfg(optimizer="rmsprop"), lambda s: 0.1, {"w": True})


# ---------------------------------------------------------------- EMA
def test_ema_ramp_and_first_update_is_copy():
    its = np.array([0, 1, 100, 2000, 20000])
    d = np.asarray(optim.ema_decay(its))
    np.testing.assert_allclose(d, 0.9998 * (1 - np.exp(-its / 2000)), rtol=1e-6)
    assert d[0] == 0.0
    ema = {"w": jnp.full((3,), 7.0), "n": jnp.asarray(3, jnp.int32)}
    new = {"w": jnp.asarray([1.0, 2.0, 3.0]), "n": jnp.asarray(5, jnp.int32)}
    out0 = optim.ema_update(ema, new, 0)
    np.testing.assert_array_equal(np.asarray(out0["w"]), [1.0, 2.0, 3.0])
    assert int(out0["n"]) == 5
    out = optim.ema_update(ema, new, 2000)
    dd = 0.9998 * (1 - math.exp(-1))
    np.testing.assert_allclose(np.asarray(out["w"]), dd * 7.0 + (1 - dd) * np.array([1, 2, 3.0]), rtol=1e-6)
