"""Deploy folding (``damo_jax.models.reparam.fuse``) against the official deploy models (golden §4).

* key names/shapes and per-key sums of the folded state_dict (via ``to_torch_state_dict``) equal
  ``deploy/<M>_<variant>.json`` (sums to 1e-5 of the key's abs-sum);
* the deploy graphs reproduce ``deploy/*_b2_128x128.npz`` (tolerance as in test_models_golden);
* folding is exact: in float64 the fused and unfused graphs agree to 1e-5 relative (also for the
  nano models, whose mob/depthwise BNs the official tools never fold);
* ``fuse`` is pure (the input pytree is left untouched).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_path
from damo_jax.config import load_config
from damo_jax.interop.convert import (from_torch_state_dict, official_fuse_state_dict,
                                      to_torch_state_dict)
from damo_jax.models import build_model
from damo_jax.models.blocks import Opts, RepConv
from damo_jax.models.reparam import fold_repconv, fuse
from golden_weights import golden_variables
from test_models_golden import FLOOR_FACTOR, RTOL, golden_input_nhwc, nhwc

KNOWN_CASES = [("T", "reparam"), ("S", "reparam"), ("M", "reparam"), ("L", "reparam"),
               ("T", "reparam_fuse"), ("S", "reparam_fuse")]


def deploy_cases():
    """(model, variant) of every ``deploy/<M>_<variant>.json`` the golden folder holds (another
    set of official files may cover other models, e.g. M or Ns ``reparam_fuse``), else the known
    list (each case then skips: no golden data)."""
    from conftest import GOLDEN
    found = sorted(tuple(p.stem.split("_", 1)) for p in (GOLDEN / "deploy").glob("*_*.json")
                   if p.stem.split("_", 1)[1] in ("reparam", "reparam_fuse"))
    return found or KNOWN_CASES


DEPLOY_CASES = deploy_cases()


def fresh_golden(model):
    """A private copy of the cached golden (config, variables): tests may mutate the config."""
    cfg, variables = golden_variables(model)
    return load_config(model.lower()), variables


def deploy_mode(variant):
    return True if variant == "reparam_fuse" else "reparam"


@pytest.mark.parametrize("model,variant", DEPLOY_CASES)
def test_folded_model_matches_official(model, variant):
    """``reparam``: our RepConv fold; ``reparam_fuse``: that fold then the official
    ``fuse_model``'s conv+BN folds (``official_fuse_state_dict``: ConvBNAct and res-backbone
    ConvKXBN; on T and S no BN is left, so it equals our full fold). Key list, per-key sums and
    parameter count against the official file; outputs of the loaded official form and of our
    fully folded graph against the official outputs."""
    cfg, variables = fresh_golden(model)
    meta = json.loads(golden_path("deploy", f"{model}_{variant}.json").read_text())
    reparam = fuse(variables, cfg, fuse_bn=False)
    sd = to_torch_state_dict(reparam, cfg)
    if variant == "reparam_fuse":
        sd = official_fuse_state_dict(sd, cfg)
    check_state_dict(sd, meta)
    assert parameter_count(sd) == meta["num_parameters"]
    graphs = [(deploy_mode(variant), from_torch_state_dict(sd, cfg, deploy=deploy_mode(variant)))]
    if variant == "reparam_fuse":               # our own full fold gives the same outputs
        graphs.append((True, fuse(variables, cfg, fuse_bn=True)))
    for deploy, deployed in graphs:
        with jax.default_matmul_precision("highest"):
            out = jax.jit(build_model(cfg, deploy=deploy).apply)(deployed, golden_input_nhwc())
        check_outputs(model, variant, out)


def parameter_count(state_dict) -> int:
    """PyTorch's ``sum(p.numel() for p in model.parameters())`` of a state dict: every entry but
    the BN running statistics and the head's ``integral.project`` buffer."""
    return sum(int(np.prod(np.shape(v))) for k, v in state_dict.items()
               if not k.endswith((".running_mean", ".running_var", ".num_batches_tracked"))
               and k != "head.integral.project")


def check_state_dict(sd, meta):
    ref = {e["key"]: e for e in meta["deploy_state_dict"]}
    assert sorted(sd) == sorted(ref)
    for key, e in ref.items():
        assert list(sd[key].shape) == e["shape"], key
        got = float(np.asarray(sd[key], np.float64).sum())
        assert abs(got - e["sum"]) <= 1e-5 * max(e["abs_sum"], 1e-6), (key, got, e["sum"])


def check_outputs(model, variant, out):
    ref = np.load(golden_path("deploy", f"{model}_{variant}_b2_128x128.npz"))
    floors = json.loads(golden_path("models", f"{model}.json").read_text())["runs"][0]["fp32_vs_fp64"]
    pairs = [("head.scores", out["scores"], ref["head.scores"]),
             ("head.boxes", out["boxes"], ref["head.boxes"])]
    for part in ("backbone", "neck"):
        pairs += [(f"{part}.out{i}", out[part][i], nhwc(ref[f"{part}.out{i}"]))
                  for i in range(3) if f"{part}.out{i}" in ref]
    for name, got, want in pairs:
        diff = np.abs(np.asarray(got, np.float64) - want)
        tol = np.maximum(RTOL * np.maximum(1.0, np.abs(want)), FLOOR_FACTOR * floors[name]["max_abs"])
        assert (diff <= tol).all(), f"{model}_{variant} {name}: max|d| {diff.max():.3g}"


@pytest.mark.parametrize("model", ["Ns"])
def test_full_fusion_is_exact_in_float64(model):
    """Ns: stem, Mob-block and DepthwiseConv BNs, which no official deploy file folds (the
    RepConv / ConvBNAct / ConvKXBN folds are checked against the official T/S files above)."""
    cfg, variables = fresh_golden(model)
    deployed = fuse(variables, cfg, fuse_bn=True)
    cfg.model.dtype = "float64"
    assert "batch_stats" not in deployed
    x = golden_input_nhwc()[:1, :64, :96].astype(np.float64)
    with jax.enable_x64(True):
        ref = jax.jit(build_model(cfg).apply)(variables, jnp.asarray(x))
        out = jax.jit(build_model(cfg, deploy=True).apply)(deployed, jnp.asarray(x))
        for name in ("scores", "boxes", "dfl"):
            r, o = np.asarray(ref[name]), np.asarray(out[name])
            assert o.dtype == np.float32
            assert np.abs(o - r).max() <= 1e-5 * max(1.0, np.abs(r).max()), name
        for i in range(3):
            r, o = np.asarray(ref["neck"][i]), np.asarray(out["neck"][i])
            assert o.dtype == np.float64
            assert np.abs(o - r).max() <= 1e-5 * max(1.0, np.abs(r).max()), f"neck {i}"


def test_fuse_is_pure():
    cfg, variables = fresh_golden("Ns")
    before = jax.tree_util.tree_map(lambda a: np.array(a, copy=True), variables)
    fuse(variables, cfg, fuse_bn=True)
    fuse(variables, cfg, fuse_bn=False)
    flat_a = jax.tree_util.tree_flatten_with_path(variables)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (p, a), (_, b) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(p))


@pytest.mark.parametrize("stride", [1, 2])
def test_single_repconv_fold(stride):
    """A lone RepConv with random weights and BN statistics: folded == branches (odd input)."""
    rng = np.random.default_rng(stride)

    def branch(k):
        conv = {"kernel": rng.normal(0, 0.3, (k, k, 6, 8)).astype(np.float32)}
        bn = {"scale": rng.uniform(0.5, 1.5, 8).astype(np.float32),
              "bias": rng.normal(0, 0.1, 8).astype(np.float32)}
        stats = {"mean": rng.normal(0, 0.1, 8).astype(np.float32),
                 "var": rng.uniform(0.5, 2.0, 8).astype(np.float32)}
        return {"conv": conv, "bn": bn}, {"bn": stats}

    (p3, s3), (p1, s1) = branch(3), branch(1)
    variables = {"params": {"rbr_dense": p3, "rbr_1x1": p1},
                 "batch_stats": {"rbr_dense": s3, "rbr_1x1": s1}}
    kernel, bias = fold_repconv(variables["params"], variables["batch_stats"], 1e-3)
    deployed = {"params": {"rbr_reparam": {"kernel": kernel.astype(np.float32),
                                           "bias": bias.astype(np.float32)}}}
    x = rng.normal(size=(2, 11, 9, 6)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(RepConv(8, stride, "relu", Opts()).apply)(variables, x)
        got = jax.jit(RepConv(8, stride, "relu", Opts(deploy="reparam")).apply)(deployed, x)
    assert got.shape == want.shape == (2, 11 // stride + stride - 1, 9 // stride + stride - 1, 8)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
