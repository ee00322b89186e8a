"""Deploy-time folding of Flax variables (SPEC §3), as pure functions on pytrees.

``fuse(variables, config, fuse_bn=False)``: every RepConv (``rbr_dense`` 3x3+BN and ``rbr_1x1``
1x1+BN) becomes ``rbr_reparam`` (3x3 conv with bias) — the official ``switch_to_deploy``; the
result runs in ``build_model(config, deploy="reparam")``. With ``fuse_bn=True`` every remaining
conv+BN pair is folded too (ConvBNAct, ConvKXBN, Mob blocks, DepthwiseConv; also in the CSP and
mob backbones, which the official ``fuse_model`` leaves alone): no BatchNorm remains and the
result runs in ``build_model(config, deploy=True)``.

Folding (§3.1): ``t = gamma / sqrt(var + eps)``; ``W' = W * t`` (per output channel),
``b' = beta - mean * t + t * b``; computed in float64, stored as float32. eps =
``config.model.bn_epsilon`` (1e-3).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from damo_jax.config import load_config

_MOB_BN_RE = re.compile(r"^conv_(\d+)$")
_BN_PARTNERS = {"bn": "conv", "bn1": "conv1", "dwnorm": "depthwise", "pwnorm": "pointwise"}


def fold_bn(kernel, bias, bn_params, bn_stats, eps: float):
    """Fold a BN into the preceding conv. kernel [kh, kw, in/g, out]; bias [out] or None.
    Returns (kernel, bias) as float64 numpy arrays."""
    k = np.asarray(kernel, np.float64)
    b = np.zeros(k.shape[-1]) if bias is None else np.asarray(bias, np.float64)
    t = np.asarray(bn_params["scale"], np.float64) / np.sqrt(np.asarray(bn_stats["var"], np.float64) + eps)
    new_bias = np.asarray(bn_params["bias"], np.float64) - np.asarray(bn_stats["mean"], np.float64) * t + t * b
    return k * t, new_bias


def fold_repconv(params: dict, stats: dict, eps: float):
    """RepConv branches -> one 3x3 kernel + bias (the 1x1 kernel lands on the centre tap)."""
    k3, b3 = fold_bn(params["rbr_dense"]["conv"]["kernel"], None, params["rbr_dense"]["bn"],
                     stats["rbr_dense"]["bn"], eps)
    k1, b1 = fold_bn(params["rbr_1x1"]["conv"]["kernel"], None, params["rbr_1x1"]["bn"],
                     stats["rbr_1x1"]["bn"], eps)
    if k3.shape[:2] != (3, 3) or k1.shape[:2] != (1, 1):
        raise ValueError(f"RepConv: expected 3x3 and 1x1 kernels, got {k3.shape} and {k1.shape}")
    kernel = k3.copy()
    kernel[1, 1] += k1[0, 0]
    return kernel, b3 + b1


def bn_partner(bn_name: str) -> str | None:
    """Name of the conv a BN normalises (``bn`` -> ``conv``, Mob ``conv_4`` -> ``conv_3``)."""
    if bn_name in _BN_PARTNERS:
        return _BN_PARTNERS[bn_name]
    m = _MOB_BN_RE.match(bn_name)
    return f"conv_{int(m.group(1)) - 1}" if m else None


def _as_f32(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float32)), tree)


def _fuse_node(params: dict, stats: dict, eps: float, fuse_bn: bool, path: str):
    """Return (new params, new stats) of one module node (recursive, inputs untouched)."""
    new_p, new_s = {}, {}
    if "rbr_dense" in params and "rbr_1x1" in params:
        kernel, bias = fold_repconv(params, stats, eps)
        new_p["rbr_reparam"] = {"kernel": kernel, "bias": bias}
        params = {k: v for k, v in params.items() if k not in ("rbr_dense", "rbr_1x1")}
        stats = {k: v for k, v in stats.items() if k not in ("rbr_dense", "rbr_1x1")}
    folded = set()
    if fuse_bn:
        for bn_name, bn_stats in stats.items():
            if not (isinstance(bn_stats, dict) and "mean" in bn_stats and "var" in bn_stats):
                continue
            conv_name = bn_partner(bn_name)
            if conv_name is None or conv_name not in params or "kernel" not in params[conv_name]:
                raise ValueError(f"fuse: BatchNorm {path}/{bn_name} has no conv partner")
            conv = params[conv_name]
            kernel, bias = fold_bn(conv["kernel"], conv.get("bias"), params[bn_name], bn_stats, eps)
            new_p[conv_name] = {"kernel": kernel, "bias": bias}
            folded.update((bn_name, conv_name))
    for name, child in params.items():
        if name in folded:
            continue
        if isinstance(child, dict) and any(isinstance(v, dict) for v in child.values()):
            sub_p, sub_s = _fuse_node(child, stats.get(name, {}), eps, fuse_bn, f"{path}/{name}")
            new_p[name] = sub_p
            if sub_s:
                new_s[name] = sub_s
        else:
            new_p[name] = child
            if name in stats:
                new_s[name] = stats[name]
    for name, child in stats.items():
        if name not in params and name not in folded:
            raise ValueError(f"fuse: batch_stats {path}/{name} has no matching params")
    return new_p, new_s


def _to_plain(tree):
    if hasattr(tree, "items"):
        return {k: _to_plain(v) for k, v in tree.items()}
    return tree


def fuse(variables, config, fuse_bn: bool = False) -> dict:
    """Train-graph variables -> deploy variables (pure; the input pytree is not modified).

    ``fuse_bn=False`` -> for ``build_model(config, deploy="reparam")``;
    ``fuse_bn=True`` -> ``{"params": ...}`` for ``build_model(config, deploy=True)``.
    The result's structure and shapes are checked against that model.
    """
    cfg = load_config(config)
    eps = float(cfg.model.bn_epsilon)
    plain = _to_plain(variables)
    if "params" not in plain:
        raise ValueError("fuse: variables need a 'params' collection")
    if "batch_stats" not in plain:       # every model has BatchNorms: their statistics are folded
        raise ValueError("fuse: variables need the 'batch_stats' collection too (the BatchNorm "
                         "running statistics are folded into the convs)")
    params, stats = _fuse_node(plain["params"], plain.get("batch_stats", {}), eps, fuse_bn, "params")
    out = {"params": _as_f32(params)}
    if stats:
        out["batch_stats"] = _as_f32(stats)
    _check_against_model(out, cfg, True if fuse_bn else "reparam")
    return out


def _check_against_model(variables, cfg, deploy):
    from damo_jax.interop.convert import variable_template
    template = variable_template(cfg, deploy)
    want = {jax.tree_util.keystr(p): tuple(s.shape)
            for p, s in jax.tree_util.tree_flatten_with_path(template)[0]}
    got = {jax.tree_util.keystr(p): tuple(a.shape)
           for p, a in jax.tree_util.tree_flatten_with_path(variables)[0]}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"fuse: result does not match build_model(deploy={deploy!r}): "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for key, shape in want.items():
        if got[key] != shape:
            raise ValueError(f"fuse: {key} has shape {got[key]}, model expects {shape}")
