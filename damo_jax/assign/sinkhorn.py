"""Original OTA (Ge et al., CVPR 2021) as an alternative matching step for AlignOTA.

Label assignment as entropic optimal transport, per image:

* suppliers: every valid GT t supplies k_t units (its dynamic k, the same as in the official
  dynamic-k matching) and one background column supplies the rest, n_cand − Σ k_t (if Σ k_t
  exceeds the number of candidates n_cand, the GT supplies are scaled by n_cand / Σ k_t and the
  background supplies 0, so the problem stays balanced);
* demanders: every candidate prior demands exactly 1 unit (non-candidates take no part);
* cost: the AlignOTA cost of :mod:`damo_jax.assign.ota` (QFL class cost + 3·IoU cost) plus
  ``penalty``·[prior not in the GT's box ∩ centre square]; the background column costs the
  class cost against an all-zero target, Σ_c BCE(p_c, 0)·p_c². The official 1e8 penalty cannot
  be used: float32 potentials of magnitude 1e8 have an ulp of 8, i.e. errors of 80 in the
  exponent at ε = 0.1, so a moderate penalty (default 1e3) is used instead;
* solver: log-domain Sinkhorn with a fixed number of iterations (static, jit friendly), each
  iteration updating the column potentials then the row potentials; the plan is read out as a
  row softmax, so the row marginals (one unit per candidate) hold to float precision and the
  column marginals approach the supplies;
* assignment: every candidate prior goes to the column carrying most of its unit (argmax of
  its row of the plan); priors whose argmax is the background column are negatives.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from damo_jax.assign.cost import background_cost, penalised_cost

NEG_BIG = -1e30


def _supplies(ks: jax.Array, candidate: jax.Array, gt_valid: jax.Array) -> jax.Array:
    """Supplies (G + 1,): k_t for valid GTs (scaled down if Σk > n_cand), background last."""
    n_cand = jnp.sum(candidate).astype(jnp.float32)
    ks = jnp.where(gt_valid, ks, 0).astype(jnp.float32)
    total = jnp.sum(ks)
    scale = jnp.where(total > n_cand, n_cand / jnp.maximum(total, 1.0), 1.0)
    ks = ks * scale
    background = jnp.maximum(n_cand - jnp.sum(ks), 0.0)
    return jnp.concatenate([ks, background[None]])


def _safe_log(x: jax.Array) -> jax.Array:
    return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), NEG_BIG)


def transport_plan(cost: jax.Array, bg_cost: jax.Array, ks: jax.Array, candidate: jax.Array,
                   gt_valid: jax.Array, *, epsilon: float = 0.1, iters: int = 50) -> jax.Array:
    """Entropic OT plan (A, G + 1) (last column = background) for one image.

    cost (A, G) with +inf on non-candidate rows / padded GTs; bg_cost (A,); ks (G,) dynamic k;
    candidate (A,) bool; gt_valid (G,) bool. Rows of candidates sum to 1; other rows are 0.
    """
    full = jnp.concatenate([cost, bg_cost[:, None]], axis=1)
    usable = jnp.concatenate([jnp.isfinite(cost), jnp.ones_like(bg_cost[:, None], bool)], axis=1)
    usable = usable & candidate[:, None]
    log_kernel = jnp.where(usable, -jnp.where(usable, full, 0.0) / epsilon, NEG_BIG)
    log_supply = _safe_log(_supplies(ks, candidate, gt_valid))             # (G + 1,)
    log_demand = _safe_log(candidate.astype(jnp.float32))                 # (A,)

    def body(_, potentials):
        f, g = potentials
        g = log_supply - jax.nn.logsumexp(log_kernel + f[:, None], axis=0)
        g = jnp.where(log_supply > NEG_BIG, g, NEG_BIG)
        f = log_demand - jax.nn.logsumexp(log_kernel + g[None, :], axis=1)
        f = jnp.where(candidate, f, NEG_BIG)
        return f, g

    f0 = jnp.zeros(cost.shape[0], jnp.float32)
    g0 = jnp.zeros(cost.shape[1] + 1, jnp.float32)
    _, g = jax.lax.fori_loop(0, iters, body, (f0, g0))
    # the final row update written as a row softmax of the same rounded logits: rows sum to 1 to
    # float precision even when the potentials are large (|logits| ~ penalty / epsilon)
    plan = jax.nn.softmax(jnp.where(usable, log_kernel + g[None, :], -jnp.inf), axis=1)
    return jnp.where(usable, plan, 0.0)


def plan_to_assignment(plan: jax.Array, candidate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row argmax of the plan -> (fg_mask (A,), gt_index (A,) int32, −1 for background)."""
    num_gt = plan.shape[1] - 1
    best = jnp.argmax(plan, axis=1).astype(jnp.int32)
    fg = candidate & (best < num_gt)
    return fg, jnp.where(fg, best, -1)


def assign_image(scores, costs, ks, gt_valid, *, cls_weight, epsilon, iters, penalty):
    """One image: the OT plan on the AlignOTA cost with ``penalty`` instead of 1e8.

    scores (A, C); costs: :func:`damo_jax.assign.cost.image_costs` output (GT-major (G, A));
    ks (G,); gt_valid (G,). Returns (fg (A,), gt_index (A,) int32, plan (A, G + 1)).
    """
    cost = penalised_cost(costs["base"], costs["strict"], costs["candidate"], gt_valid, penalty)
    plan = transport_plan(cost.T, background_cost(scores) * cls_weight, ks, costs["candidate"],
                          gt_valid, epsilon=epsilon, iters=iters)
    fg, gt_index = plan_to_assignment(plan, costs["candidate"])
    return fg, gt_index, plan
