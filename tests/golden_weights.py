"""The golden weight recipe (golden README §2): a deterministic numpy state_dict per model.

``make_state_dict(key_shapes, seed, gain)`` is the recipe itself; ``golden_state_dict(model)``
reads ``models/<model>.json`` from the golden folder, regenerates the state_dict and verifies the
per-entry sha256 digests (and the whole-state_dict digest) before returning it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math

import numpy as np

C = dict(conv_bias_std=0.1,
         cls_bias_mean=-math.log((1 - 0.01) / 0.01),
         cls_bias_std=0.1,
         bn_weight_range=(0.5, 1.5), bn_bias_std=0.1,
         bn_running_mean_std=0.1, bn_running_var_range=(0.5, 2.0),
         scale_range=(0.75, 1.25))
SEED = 1000
GOLDEN_MODELS = ("T", "S", "M", "L", "Ns", "Nm", "Nl", "N")


def kind_of(key: str, all_keys) -> str:
    parent, leaf = key.rsplit(".", 1)
    is_bn = parent + ".running_mean" in all_keys
    if leaf == "num_batches_tracked":
        return "bn_num_batches_tracked"
    if leaf == "running_mean":
        return "bn_running_mean"
    if leaf == "running_var":
        return "bn_running_var"
    if leaf == "project":
        return "integral_project"
    if leaf == "scale":
        return "scale"
    if leaf == "weight":
        return "bn_weight" if is_bn else "conv_weight"
    if leaf == "bias":
        if is_bn:
            return "bn_bias"
        return "cls_bias" if key.startswith("head.gfl_cls.") else "conv_bias"
    raise ValueError(f"golden recipe: cannot classify key {key!r}")


def make_value(kind: str, shape, rng: np.random.Generator, gain: float) -> np.ndarray:
    shape = tuple(shape)
    if kind == "conv_weight":  # PyTorch layout [out, in/groups, kh, kw]
        fan_in = int(np.prod(shape[1:]))
        w = rng.standard_normal(shape)
        if fan_in > 1:
            w = w - w.mean(axis=(1, 2, 3), keepdims=True)
            w = w / w.std(axis=(1, 2, 3), keepdims=True)
        return (w * (gain * math.sqrt(2.0 / fan_in))).astype(np.float32)
    if kind == "conv_bias":
        return (rng.standard_normal(shape) * C["conv_bias_std"]).astype(np.float32)
    if kind == "cls_bias":
        return (rng.standard_normal(shape) * C["cls_bias_std"] + C["cls_bias_mean"]).astype(np.float32)
    if kind == "bn_weight":
        return rng.uniform(*C["bn_weight_range"], size=shape).astype(np.float32)
    if kind == "bn_bias":
        return (rng.standard_normal(shape) * C["bn_bias_std"]).astype(np.float32)
    if kind == "bn_running_mean":
        return (rng.standard_normal(shape) * C["bn_running_mean_std"]).astype(np.float32)
    if kind == "bn_running_var":
        return rng.uniform(*C["bn_running_var_range"], size=shape).astype(np.float32)
    if kind == "bn_num_batches_tracked":
        return np.zeros(shape, np.int64)
    if kind == "scale":
        return rng.uniform(*C["scale_range"], size=shape).astype(np.float32)
    if kind == "integral_project":
        return np.arange(shape[0], dtype=np.float32)
    raise ValueError(f"golden recipe: unknown kind {kind!r}")


def make_state_dict(key_shapes, seed: int = SEED, gain: float = 1.0) -> dict[str, np.ndarray]:
    """``key_shapes``: {torch key: shape}. Keys sorted by plain string order; key i uses
    ``np.random.default_rng(seed + i)``."""
    keys = sorted(key_shapes)
    ks = set(keys)
    return {k: make_value(kind_of(k, ks), key_shapes[k], np.random.default_rng(seed + i), gain)
            for i, k in enumerate(keys)}


def digest16(value: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
                          ).hexdigest()[:16]


def load_model_json(model: str) -> dict:
    from conftest import golden_path
    return json.loads(golden_path("models", f"{model}.json").read_text())


def golden_state_dict(model: str, verify: bool = True) -> dict[str, np.ndarray]:
    """Regenerate the golden state_dict of ``model`` (T, S, M, L, Ns, Nm, Nl, N) and check its
    digests against ``models/<model>.json`` (raises AssertionError naming the first bad key)."""
    meta = load_model_json(model)["weights"]
    entries = meta["entries"]
    sd = make_state_dict({e["key"]: e["shape"] for e in entries}, meta["seed"], meta["conv_gain"])
    if verify:
        whole = hashlib.sha256()
        for e in sorted(entries, key=lambda e: e["key"]):
            v = sd[e["key"]]
            assert e["kind"] == kind_of(e["key"], sd.keys()), f"{model}: kind of {e['key']}"
            assert digest16(v) == e["sha256_16"], (
                f"{model}: digest mismatch for {e['key']} (sum {float(v.astype(np.float64).sum())} "
                f"vs {e['sum']})")
            whole.update(np.ascontiguousarray(v).tobytes())
        assert whole.hexdigest() == meta["state_dict_sha256"], f"{model}: state_dict sha256 differs"
    return sd


@functools.lru_cache(maxsize=None)
def golden_variables(model: str):
    """(config, Flax variables) of the golden weights of ``model`` (cached per test process)."""
    from damo_jax.config import load_config
    from damo_jax.interop.convert import from_torch_state_dict
    cfg = load_config(model.lower())
    return cfg, from_torch_state_dict(golden_state_dict(model), cfg)
