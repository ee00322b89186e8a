"""Stand-alone QFL / DFL / GIoU against the official functions (golden README §6.2, tolerances §8):
values rtol 1e-5 / atol 1e-6, gradients rtol 1e-4 / atol 1e-6; plus NaN/Inf robustness checks."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_path
from damo_jax import losses

VALUE_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def golden():
    meta = json.loads(golden_path("losses", "standalone_cases.json").read_text())
    arrays = dict(np.load(golden_path("losses", "standalone_cases.npz")))
    return {c["prefix"]: (c, {k[len(c["prefix"]):]: v for k, v in arrays.items()
                              if k.startswith(c["prefix"])}) for c in meta["cases"]}


def _qfl_fns(case, params):
    use_sigmoid = params["use_sigmoid"]
    label, score, weight = case["in.label"], case["in.score"], case["in.weight"]
    avg = params["avg_factor"] * 1.0

    def elementwise(pred):
        return losses.quality_focal_loss(pred, label, score, beta=params["beta"],
                                         use_sigmoid=use_sigmoid)
    return dict(elementwise_sum=lambda p: jnp.sum(elementwise(p)),
                mean_avg_factor=lambda p: params["loss_weight"] * jnp.sum(elementwise(p)) / avg,
                weighted_avg_factor=lambda p: params["loss_weight"]
                * jnp.sum(weight * elementwise(p)) / avg), elementwise


@pytest.mark.parametrize("prefix", ["qfl00.", "qfl01.", "qfl02.", "qfl03."])
def test_qfl(golden, prefix):
    meta, case = golden[prefix]
    fns, elementwise = _qfl_fns(case, meta["params"])
    pred = jnp.asarray(case["in.pred"])
    np.testing.assert_allclose(elementwise(pred), case["out.loss_elementwise"], **VALUE_TOL)
    for name in ("mean_avg_factor", "weighted_avg_factor"):
        np.testing.assert_allclose(jax.jit(fns[name])(pred), case[f"out.loss_{name}"], **VALUE_TOL)
    for name, fn in fns.items():
        grad = jax.jit(jax.grad(fn))(pred)
        assert np.isfinite(np.asarray(grad)).all()
        if f"out.grad_{name}" in case:        # qfl03 (exact 0/1 probabilities): values only
            np.testing.assert_allclose(grad, case[f"out.grad_{name}"], **GRAD_TOL)


@pytest.mark.parametrize("prefix", ["dfl04.", "dfl05.", "dfl06."])
def test_dfl(golden, prefix):
    meta, case = golden[prefix]
    params, target, weight = meta["params"], case["in.target"], case["in.weight"]
    pred = jnp.asarray(case["in.pred_logits"])

    def weighted(p):
        loss = losses.distribution_focal_loss(p, target)
        return params["loss_weight"] * jnp.sum(weight * loss) / params["avg_factor"]
    np.testing.assert_allclose(losses.distribution_focal_loss(pred, target),
                               case["out.loss_elementwise"], **VALUE_TOL)
    np.testing.assert_allclose(weighted(pred), case["out.loss_weighted_avg_factor"], **VALUE_TOL)
    grad_sum = jax.jit(jax.grad(lambda p: jnp.sum(losses.distribution_focal_loss(p, target))))(pred)
    np.testing.assert_allclose(grad_sum, case["out.grad_elementwise_sum"], **GRAD_TOL)
    np.testing.assert_allclose(jax.jit(jax.grad(weighted))(pred),
                               case["out.grad_weighted_avg_factor"], **GRAD_TOL)


@pytest.mark.parametrize("prefix", ["giou07.", "giou08."])
def test_giou(golden, prefix):
    meta, case = golden[prefix]
    params, target, weight = meta["params"], case["in.target"], case["in.weight"]
    pred = jnp.asarray(case["in.pred"])

    def weighted(p, w):
        total = jnp.sum(w * losses.giou_loss(p, target))
        return params["loss_weight"] * total / params["avg_factor"]
    np.testing.assert_allclose(losses.giou_loss(pred, target), case["out.loss_elementwise"],
                               **VALUE_TOL)
    np.testing.assert_allclose(losses.aligned_giou(pred, target), case["out.giou_aligned"],
                               **VALUE_TOL)
    np.testing.assert_allclose(losses.pairwise_iou(pred, jnp.asarray(target)),
                               case["out.iou_pairwise"], **VALUE_TOL)
    np.testing.assert_allclose(weighted(pred, weight), case["out.loss_weighted_avg_factor"],
                               **VALUE_TOL)
    np.testing.assert_allclose(weighted(pred, 0.0 * weight), case["out.loss_all_zero_weight"],
                               **VALUE_TOL)
    grads = dict(
        elementwise_sum=jax.jit(jax.grad(lambda p: jnp.sum(losses.giou_loss(p, target))))(pred),
        weighted_avg_factor=jax.jit(jax.grad(weighted))(pred, weight))
    for name, grad in grads.items():
        assert np.isfinite(np.asarray(grad)).all()
        if prefix == "giou07.":               # giou08's gradients sit on min/max/clamp ties
            np.testing.assert_allclose(grad, case[f"out.grad_{name}"], **GRAD_TOL)


def test_losses_finite_on_extreme_inputs():
    """Probabilities exactly 0/1, degenerate / tiny / huge boxes, extreme logits: no NaN/Inf."""
    probs = jnp.array([[0.0, 1.0, 0.5], [1.0, 0.0, 1e-30], [1 - 1e-7, 1e-7, 0.0]])
    labels, scores = jnp.array([1, 0, 3]), jnp.array([1.0, 0.0, 0.3])
    val, grad = jax.value_and_grad(lambda p: jnp.sum(losses.quality_focal_loss(p, labels, scores)))(
        probs)
    assert np.isfinite(val) and np.isfinite(np.asarray(grad)).all()
    logits = jnp.array([[1e4, -1e4, 0.0], [88.0, -88.0, 30.0], [0.0, 0.0, 0.0]])
    for fn in (lambda z: jnp.sum(losses.quality_focal_loss(z, labels, scores, use_sigmoid=True)),
               lambda z: jnp.sum(losses.distribution_focal_loss(z, jnp.array([0.0, 1.9, 1.0])))):
        val, grad = jax.value_and_grad(fn)(logits)
        assert np.isfinite(val) and np.isfinite(np.asarray(grad)).all()
    boxes = jnp.array([[0, 0, 0, 0], [5, 5, 5, 9], [1e-4, 1e-4, 2e-4, 2e-4], [0, 0, 4e4, 4e4],
                       [10, 10, 5, 5]], jnp.float32)
    targets = jnp.array([[0, 0, 0, 0], [5, 5, 5, 9], [0, 0, 1e-4, 1e-4], [1, 1, 2, 2],
                         [0, 0, 1, 1]], jnp.float32)
    val, grad = jax.value_and_grad(lambda b: jnp.sum(losses.giou_loss(b, targets)))(boxes)
    assert np.isfinite(val) and np.isfinite(np.asarray(grad)).all()
