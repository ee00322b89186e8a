"""Official PyTorch ``state_dict`` <-> Flax variables (SPEC §5).

The Flax modules carry the official attribute names (list indices written ``<list>_<i>``), so the
mapping is mechanical:

* path ``backbone/block_list_1/block_list_0/conv1/conv1/kernel`` <-> key
  ``backbone.block_list.1.block_list.0.conv1.conv1.weight``;
* conv ``kernel`` [kh, kw, in/g, out] <-> ``weight`` [out, in/g, kh, kw] (transpose (3, 2, 0, 1));
* BN ``scale``/``bias`` (params) and ``mean``/``var`` (batch_stats) <-> ``weight``/``bias``/
  ``running_mean``/``running_var``; ``num_batches_tracked`` is ignored on load, written as 0;
* ``head/scales_{i}/scale`` <-> ``head.scales.{i}.scale`` (0-d); ``head.integral.project``
  (the constant 0..R) is checked on load and regenerated on save.
"""
from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from damo_jax.config import load_config
from damo_jax.errors import InputPathError, UserError

LIST_NAMES = ("block_list", "csp_stage", "convstem", "convs", "conv", "gfl_cls", "gfl_reg", "scales")
_LIST_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(LIST_NAMES))
_SCALE_MODULE_RE = re.compile(r"^scales_\d+$")
PROJECT_KEY = "head.integral.project"
TEMPLATE_SIZE = 64  # input size used to trace the variable shapes (any multiple of 32 works)


class CheckpointMismatchError(UserError, ValueError):
    """The state dict does not fit the model: missing, unexpected or mis-shaped keys (named)."""


# ----------------------------------------------------------------------------- naming
def torch_module_path(flax_path) -> str:
    """``('backbone', 'block_list_1', 'conv1')`` -> ``'backbone.block_list.1.conv1'``."""
    return ".".join(_LIST_RE.sub(r"\1.\2", name) for name in flax_path)


def torch_key(collection: str, flax_path) -> str:
    """Official state_dict key of one Flax leaf (``collection`` = params / batch_stats)."""
    *modules, leaf = flax_path
    prefix = torch_module_path(modules)
    if collection == "batch_stats":
        table = {"mean": "running_mean", "var": "running_var"}
    elif modules and _SCALE_MODULE_RE.match(modules[-1]):
        table = {"scale": "scale"}
    else:
        table = {"kernel": "weight", "bias": "bias", "scale": "weight"}
    if leaf not in table:
        raise ValueError(f"convert: no official name for leaf {collection}/{'/'.join(flax_path)}")
    return f"{prefix}.{table[leaf]}"


def to_torch_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (3, 2, 0, 1)) if leaf_name == "kernel" else value


def from_torch_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (2, 3, 1, 0)) if leaf_name == "kernel" else value


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- templates
_TEMPLATES: dict[tuple[str, str], dict] = {}  # (config JSON, deploy) -> shapes (immutable leaves)


def variable_template(config, deploy=False) -> dict:
    """Shapes of the model's variables: ``{collection: nested dict of ShapeDtypeStruct}``.

    Traced once per (config, deploy) and cached: every checkpoint load needs it."""
    from damo_jax.models import build_model
    cfg = load_config(config)
    key = (cfg.to_json_best_effort(sort_keys=True), repr(deploy))
    if key not in _TEMPLATES:
        model = build_model(cfg, deploy=deploy)
        x = jnp.zeros((1, TEMPLATE_SIZE, TEMPLATE_SIZE, 3), jnp.float32)
        _TEMPLATES[key] = dict(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x)))
    return jax.tree_util.tree_map(lambda leaf: leaf, _TEMPLATES[key])  # fresh containers


def expected_torch_entries(config, deploy=False) -> dict:
    """``{torch key: (collection, flax path, torch shape)}`` for a config and deploy mode."""
    entries = {}
    for collection, tree in variable_template(config, deploy).items():
        for path, leaf in _flatten(tree):
            shape = tuple(leaf.shape)
            if path[-1] == "kernel":
                shape = (shape[3], shape[2], shape[0], shape[1])
            entries[torch_key(collection, path)] = (collection, path, shape)
    return entries


def model_signature(shapes) -> str:
    """A short digest of ``{torch key: shape}``: every key but ``module.`` prefixes,
    ``num_batches_tracked``, ``head.integral.project`` and the classifier ``head.gfl_cls.*``
    (other class counts), with its shape. Equal signatures = the same architecture."""
    import hashlib
    items = sorted((k[len("module."):] if k.startswith("module.") else k, tuple(int(d) for d in v))
                   for k, v in shapes.items())
    text = ";".join(f"{k}:{v}" for k, v in items if k != PROJECT_KEY
                    and not k.endswith(".num_batches_tracked") and not k.startswith("head.gfl_cls."))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# model_signature of each bundled config's state dict: train graph, re-parameterised
# (``rbr_reparam``) graph, and each after the official ``fuse_model`` (ConvBNAct / res-backbone
# ConvKXBN BNs folded into conv biases). tests/test_convert.py recomputes them from the traced
# variable templates.
MODEL_SIGNATURES = {
    "2b5f134f9bb42e5d": "t",
    "af53810fae0bfdc1": "t (re-parameterised)",
    "68c24d6c6e8f6417": "s",
    "756913f3f36f3400": "s (re-parameterised)",
    "1e016692f789ff00": "m",
    "3fec1096f5bc6468": "m (re-parameterised)",
    "a9fbacf2855e35bf": "l",
    "4797c08a8240d3b5": "l (re-parameterised)",
    "5028e1b8b81be10e": "ns",
    "2fa66f817f641288": "nm",
    "e017de2233198ba8": "nl",
    "5fbcf9229406700d": "n",
    # the official ``fuse_model`` applied to each (official_fuse_shapes)
    "c4f16711bc9f1b37": "t (fused)",
    "b0c7c04bcb1e3330": "t (re-parameterised, fused)",
    "4755c2cb6dfdd970": "s (fused)",
    "ee672e9e89844685": "s (re-parameterised, fused)",
    "c0c47af032526037": "m (fused)",
    "cac2c08415473f6e": "m (re-parameterised, fused)",
    "ac98f86cf123d01c": "l (fused)",
    "597e14f08162d93e": "l (re-parameterised, fused)",
    "c6ef0832dff7c44f": "ns (fused)",
    "f6c634c2faaf4d82": "nm (fused)",
    "7d52065719900ac5": "nl (fused)",
    "6d04ab552b7d3119": "n (fused)",
}   # the nano models have no RepConv: no re-parameterised form


def identify_model(state_dict) -> str | None:
    """The bundled model config (``t``, ``s``, ... ``n``; ``"t (re-parameterised)"`` for a
    deploy state dict, ``"... fused)"`` after the official ``fuse_model``) whose keys and shapes
    the state dict holds, the classifier ``head.gfl_cls.*`` aside (other class counts); None when
    none fits. Table lookup of
    :func:`model_signature` in :data:`MODEL_SIGNATURES` (no tracing)."""
    signature = model_signature({k: np.shape(v) for k, v in state_dict.items()})
    return MODEL_SIGNATURES.get(signature)


def classifier_outputs(state_dict) -> int | None:
    """The number of outputs of the classifier ``head.gfl_cls.0`` of an official state dict
    (``module.`` prefix or not): the class count (+1 for legacy heads); None without that key."""
    key = next((k for k in state_dict if k.removeprefix("module.") == "head.gfl_cls.0.bias"), None)
    return None if key is None else int(np.shape(state_dict[key])[0])


def model_hint(state_dict, flag: str = "--config", unless: str | None = None) -> str | None:
    """"the file holds DAMO-YOLO-X: use ``flag`` x" when a bundled model other than ``unless``
    fits the state dict (:func:`identify_model`), else None; never raises (a hint must never hide
    the real error)."""
    try:
        found = identify_model(state_dict)
    except Exception:              # noqa: BLE001
        found = None
    if not found or found.split()[0] == unless:
        return None
    name = found.split()[0]
    return f"the file holds DAMO-YOLO-{name.upper()}{found[len(name):]}: use {flag} {name}"


def _with_model_hint(err: "CheckpointMismatchError", state_dict, cfg) -> "CheckpointMismatchError":
    """``err`` with "; the file holds DAMO-YOLO-X: use --config x" appended when another bundled
    model fits the state dict."""
    hint = model_hint(state_dict, "--config", unless=cfg.model.name)
    return CheckpointMismatchError(f"{err}; {hint}") if hint else err


# ----------------------------------------------------------------------------- conversion
def _strip_module_prefix(state_dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _check_project(value, reg_max: int):
    value = np.asarray(value)
    if value.shape != (reg_max + 1,) or not np.allclose(value, np.arange(reg_max + 1)):
        raise CheckpointMismatchError(f"{PROJECT_KEY}: expected 0..{reg_max} (shape "
                                      f"({reg_max + 1},)), got shape {value.shape}")


def _split_known(state_dict, config, entries):
    """Drop ignorable entries; return (tensors to map, list of unexpected keys)."""
    reg_max = int(config.model.head.reg_max)
    bn_prefixes = {k.rsplit(".", 1)[0] for k in entries if k.endswith(".running_mean")}
    tensors, unexpected = {}, []
    for key, value in state_dict.items():
        if key == PROJECT_KEY:
            _check_project(value, reg_max)
        elif key.endswith(".num_batches_tracked") and key.rsplit(".", 1)[0] in bn_prefixes:
            continue
        elif key in entries:
            tensors[key] = value
        else:
            unexpected.append(key)
    return tensors, unexpected


def from_torch_state_dict(state_dict, config, *, deploy=False, source: str = "") -> dict:
    """Official state_dict (name -> array) -> Flax ``{"params", "batch_stats"}``; strict.

    Missing, unexpected or mis-shaped entries raise :class:`CheckpointMismatchError` (a
    ``ValueError`` and a user error) naming the key, prefixed with ``source`` (the file). A leading
    ``module.`` is stripped; ``num_batches_tracked`` and ``head.integral.project`` are ignored
    (the latter's values are checked). ``deploy`` selects the graph the keys belong to
    (train graph by default; ``"reparam"`` for ``rbr_reparam`` state dicts).
    """
    cfg = load_config(config)
    try:
        return _from_torch_state_dict(state_dict, cfg, deploy, f"{source}: " if source else "")
    except CheckpointMismatchError as err:
        raise _with_model_hint(err, state_dict, cfg) from None


def _from_torch_state_dict(state_dict, cfg, deploy, where: str) -> dict:
    state_dict = _strip_module_prefix(state_dict)
    if deploy is True and any(k.endswith(".running_mean") for k in state_dict):
        # ``fuse_model``'s output keeps the BNs it does not fold (CSP / Mob backbones, nano neck):
        # loaded in the re-parameterised graph, the rest folded here
        from damo_jax.models.reparam import fuse
        return fuse(_from_torch_state_dict(state_dict, cfg, "reparam", where), cfg, fuse_bn=True)
    entries = expected_torch_entries(cfg, deploy)
    if deploy is not True:
        state_dict = _unfold_official_fuse(state_dict, cfg, entries)
    try:
        tensors, unexpected = _split_known(state_dict, cfg, entries)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{where}{exc}") from None
    if unexpected:
        hint = " (a re-parameterised state_dict? pass deploy='reparam')" if any(
            "rbr_reparam" in k for k in unexpected) else ""
        raise CheckpointMismatchError(f"{where}unexpected key(s) for config {cfg.model.name!r}: "
                                      f"{sorted(unexpected)[:10]}{hint}")
    missing = sorted(set(entries) - set(tensors))
    if missing:
        raise CheckpointMismatchError(
            f"{where}missing key(s) for config {cfg.model.name!r}: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all)")
    variables: dict = {}
    for key, (collection, path, shape) in entries.items():
        value = np.asarray(tensors[key])
        if tuple(value.shape) != shape:
            raise CheckpointMismatchError(f"{where}key {key!r}: expected shape {shape}, "
                                          f"got {tuple(value.shape)}")
        flax_value = from_torch_layout(path[-1], value.astype(np.float32))
        _set(variables.setdefault(collection, {}), path, jnp.asarray(flax_value))
    return variables


# ----------------------------------------------------------------------------- official fuse_model
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def official_fuse_pairs(keys, config) -> list[tuple[str, str]]:
    """``(conv, bn)`` module prefixes of the conv+BN pairs among the BNs in ``keys`` (a state
    dict's keys) that the official ``damo.utils.fuse_model`` folds. It matches exact module types:
    every ``ConvBNAct`` (``P.conv`` + ``P.bn``: Focus stem, SPP, neck, CSP-backbone convs of that
    type) and, in the ``TinyNAS_res`` backbone only, every ``ConvKXBN`` (``P.conv1`` + ``P.bn1``).
    The CSP and Mob backbones' own ``ConvKXBN``, the Mob blocks' ``conv.<i>`` BNs, the nano
    neck's ``DepthwiseConv`` and un-folded RepConv branches (``rbr_dense`` / ``rbr_1x1``) keep
    theirs (golden README §4; checked against the official tool's output for T, Ns, Nm and M)."""
    cfg = load_config(config)
    res = str(cfg.model.backbone.name) == "TinyNAS_res"
    pairs = []
    for key in sorted(keys):
        if not key.endswith(".running_mean"):
            continue
        bn = key[:-len(".running_mean")]
        parent, _, leaf = bn.rpartition(".")
        if leaf == "bn" and parent.rpartition(".")[2] not in ("rbr_dense", "rbr_1x1"):
            pairs.append((f"{parent}.conv", bn))
        elif leaf == "bn1" and res and bn.startswith("backbone."):
            pairs.append((f"{parent}.conv1", bn))
    return pairs


def official_fuse_state_dict(state_dict, config) -> dict[str, np.ndarray]:
    """What ``damo.utils.fuse_model`` makes of an official state dict (train or re-parameterised
    graph): each pair of :func:`official_fuse_pairs` folded into ``<conv>.weight`` /
    ``<conv>.bias`` (``t = gamma / sqrt(var + eps)``, float64, stored float32), its BN keys gone;
    every other entry unchanged. ``eps`` = ``config.model.bn_epsilon``."""
    cfg = load_config(config)
    eps = float(cfg.model.bn_epsilon)
    out = dict(state_dict)
    for conv, bn in official_fuse_pairs(state_dict, cfg):
        g = {leaf: np.asarray(out.pop(f"{bn}.{leaf}"), np.float64) for leaf in _BN_LEAVES[:4]}
        out.pop(f"{bn}.num_batches_tracked", None)
        t = g["weight"] / np.sqrt(g["running_var"] + eps)
        w = np.asarray(out[f"{conv}.weight"], np.float64)
        b = np.asarray(out.get(f"{conv}.bias", np.zeros(w.shape[0])), np.float64)
        out[f"{conv}.weight"] = (w * t.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        out[f"{conv}.bias"] = (g["bias"] - g["running_mean"] * t + t * b).astype(np.float32)
    return dict(sorted(out.items()))


def official_fuse_shapes(shapes, config) -> dict:
    """``{key: shape}`` of :func:`official_fuse_state_dict`'s result for a state dict whose keys
    have the shapes ``shapes`` (no arrays needed: :data:`MODEL_SIGNATURES`)."""
    out = dict(shapes)
    for conv, bn in official_fuse_pairs(shapes, config):
        for leaf in _BN_LEAVES:
            out.pop(f"{bn}.{leaf}", None)
        out[f"{conv}.bias"] = (int(tuple(shapes[f"{conv}.weight"])[0]),)
    return out


def _unfold_official_fuse(state_dict, cfg, entries) -> dict:
    """A state dict ``fuse_model`` folded -> the form with BNs that ``entries`` (train or
    re-parameterised graph) expects: a pair of :func:`official_fuse_pairs` whose BN keys are all
    absent while its conv carries a bias the graph lacks becomes conv (no bias) + an identity BN
    (weight 1, bias = the conv's bias, mean 0, var 1 - eps: ``1 / sqrt(var + eps)`` is 1.0 in
    float32, so the graph computes the folded conv exactly). Other state dicts pass unchanged."""
    eps = float(cfg.model.bn_epsilon)
    out = None
    for conv, bn in official_fuse_pairs(entries, cfg):
        bias = f"{conv}.bias"
        if bias in entries or bias not in state_dict or \
                any(f"{bn}.{leaf}" in state_dict for leaf in _BN_LEAVES):
            continue
        out = dict(state_dict) if out is None else out
        b = np.asarray(out.pop(bias), np.float32)
        out.update({f"{bn}.weight": np.ones_like(b), f"{bn}.bias": b,
                    f"{bn}.running_mean": np.zeros_like(b),
                    f"{bn}.running_var": np.full_like(b, 1.0 - eps)})
    return state_dict if out is None else out


def to_torch_state_dict(variables, config) -> dict[str, np.ndarray]:
    """Flax variables (any deploy form) -> official state_dict (numpy, official key names),
    including ``num_batches_tracked`` (0) for every BN and ``head.integral.project``."""
    cfg = load_config(config)
    out: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        for path, value in _flatten(variables.get(collection, {})):
            out[torch_key(collection, path)] = to_torch_layout(path[-1], np.asarray(value))
            if collection == "batch_stats" and path[-1] == "mean":
                out[torch_module_path(path[:-1]) + ".num_batches_tracked"] = np.zeros((), np.int64)
    reg_max = int(cfg.model.head.reg_max)
    out[PROJECT_KEY] = np.arange(reg_max + 1, dtype=np.float32)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- files
def read_state_dict_file(path) -> dict[str, np.ndarray]:
    """``.pth``/``.pt``/``.npz``... -> ``{name: array}`` via the bounded torch-free reader
    (:func:`damo_jax.interop.pth_io.read_state_dict`); a missing file is an ``InputPathError``."""
    from damo_jax.interop.pth_io import read_state_dict
    p = Path(path)
    if not p.is_file():
        raise InputPathError(f"checkpoint {p} does not exist" if not p.exists() else
                             f"checkpoint {p} is not a file")
    return read_state_dict(p)


def load_official_checkpoint(path, config, *, deploy=False) -> dict:
    """Official ``.pth`` (no torch needed) or ``.npz`` state_dict -> Flax variables (strict)."""
    return from_torch_state_dict(read_state_dict_file(path), config, deploy=deploy, source=str(path))


def load_pretrained(path, config, *, skip_head_if_mismatch=True, fresh_head=False):
    """Load a checkpoint for fine-tuning, tolerating a different class count.

    Returns ``(variables_subset, report)``: the subset holds every loaded leaf (nested like the
    model's variables); when ``head.gfl_cls.*`` shapes differ from the config (other
    ``num_classes``) and ``skip_head_if_mismatch``, those tensors are skipped (left for the
    caller's fresh initialisation). ``fresh_head``: skip every ``head.*`` tensor (the official
    fine-tuning, ``Detector.load_pretrain_detector``: the whole head starts fresh, SPEC §9.1).
    ``report`` = ``{"loaded": [keys], "skipped": [(key, reason)], "num_loaded": int}``. Any other
    missing / unexpected / mis-shaped key raises ValueError.
    """
    cfg = load_config(config)
    state_dict = read_state_dict_file(path)
    try:
        return _load_pretrained(path, state_dict, cfg, skip_head_if_mismatch, fresh_head)
    except CheckpointMismatchError as err:
        raise _with_model_hint(err, state_dict, cfg) from None


FRESH_HEAD_REASON = "fresh head"


def _load_pretrained(path, state_dict, cfg, skip_head_if_mismatch, fresh_head=False):
    entries = expected_torch_entries(cfg)
    try:
        tensors, unexpected = _split_known(state_dict, cfg, entries)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(f"{path}: {exc}") from None
    if unexpected:
        raise CheckpointMismatchError(f"{path}: unexpected key(s) for config {cfg.model.name!r}: "
                                      f"{sorted(unexpected)[:10]}")
    subset: dict = {}
    loaded, skipped = [], []
    for key, (collection, path_, shape) in entries.items():
        if key not in tensors:
            raise CheckpointMismatchError(f"{path}: missing key {key!r} for config "
                                          f"{cfg.model.name!r}")
        if fresh_head and key.startswith("head."):
            skipped.append((key, FRESH_HEAD_REASON))
            continue
        value = np.asarray(tensors[key])
        if tuple(value.shape) != shape:
            if skip_head_if_mismatch and key.startswith("head.gfl_cls."):
                skipped.append((key, f"shape {tuple(value.shape)} != model {shape}"))
                continue
            raise CheckpointMismatchError(f"{path}: key {key!r}: expected shape {shape}, "
                                          f"got {tuple(value.shape)}")
        _set(subset.setdefault(collection, {}), path_,
             jnp.asarray(from_torch_layout(path_[-1], value.astype(np.float32))))
        loaded.append(key)
    return subset, {"loaded": loaded, "skipped": skipped, "num_loaded": len(loaded)}


def merge_variables(base, subset):
    """Return a copy of ``base`` with every leaf present in ``subset`` replaced (pure)."""
    if not isinstance(subset, dict) and not hasattr(subset, "items"):
        return subset
    out = dict(base)
    for k, v in subset.items():
        if k not in out:
            raise KeyError(f"merge_variables: {k!r} not in the base variables")
        out[k] = merge_variables(out[k], v)
    return out
