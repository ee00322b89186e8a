"""``build_model(config_or_name, deploy=False)``: the DAMO-YOLO detector as one Flax module."""
from __future__ import annotations

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from damo_jax.config import config_value, load_config, neck_depth_n, validate_model
from damo_jax.errors import ConfigError
from damo_jax.ops.boxes import check_image_size
from damo_jax.models.backbone_csp import TinyNASCSP
from damo_jax.models.backbone_mob import TinyNASMob
from damo_jax.models.backbone_res import TinyNASRes
from damo_jax.models.blocks import Opts
from damo_jax.models.conv_grad import DENSE_IMPLS
from damo_jax.models.cpu_ops import check_impl, resolve_depthwise_impl, resolve_pointwise_impl
from damo_jax.models.head import ZeroHead
from damo_jax.models.neck import GiraffeNeckV2
from damo_jax.models.structures import load_structure


class DamoYolo(nn.Module):
    """backbone -> neck -> head. ``images`` (B, H, W, 3) float RGB 0-255, H and W multiples of 32.

    Returns the head's dict (``scores``, ``boxes``, ``cls_logits``, ``reg_logits``,
    ``cls_logits_flat``, ``reg_logits_flat``, ``dfl``, ``priors``, ``strides_flat``) plus
    ``backbone`` and ``neck``: lists of three NHWC maps (strides 8, 16, 32).
    """
    backbone: nn.Module
    neck: nn.Module
    head: nn.Module
    dtype: str = "float32"

    @nn.compact
    def __call__(self, images, train: bool = False):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3) NHWC RGB, got shape {images.shape}")
        check_image_size(tuple(images.shape[1:3]), "model input (H, W)")
        x = images.astype(jnp.dtype(self.dtype))
        feats = self.backbone(x, train)
        neck_feats = self.neck(feats, train)
        check_strides(images.shape[1:3], neck_feats, self.head.strides)
        out = dict(self.head(neck_feats, train))
        out["backbone"] = list(feats)
        out["neck"] = list(neck_feats)
        return out


_get = config_value  # section[key] when present and not None, else default


def check_strides(hw, feats, strides) -> None:
    """The priors assume level i is the input downsampled ``strides[i]`` times: a backbone whose
    stem strides otherwise (``use_focus`` off with a stride-1 stem structure) or other
    ``head.strides`` placed every anchor point wrongly, silently. Static shapes: checked when traced."""
    got = tuple(hw[0] // f.shape[1] if f.shape[1] else 0 for f in feats)
    if len(feats) != len(strides) or any(f.shape[1] * s != hw[0] or f.shape[2] * s != hw[1]
                                         for f, s in zip(feats, strides)):
        raise ConfigError(f"config model.head.strides = {tuple(strides)}, but the backbone and neck "
                          f"give feature maps {[tuple(f.shape[1:3]) for f in feats]} for a "
                          f"{hw[0]}x{hw[1]} input, i.e. strides {got}: check model.backbone."
                          f"use_focus / structure (its stem stride) or model.head.strides")


def build_backbone(bb, opts: Opts) -> nn.Module:
    name = bb["name"]
    try:
        structure = load_structure(bb["structure"])
    except FileNotFoundError as e:
        raise ConfigError(f"config model.backbone.structure: {e}") from e
    common = dict(structure=structure, out_indices=tuple(bb["out_indices"]),
                  with_spp=bool(_get(bb, "with_spp", True)), use_focus=bool(bb["use_focus"]),
                  act=bb["act"], opts=opts)
    if name == "TinyNAS_res":
        return TinyNASRes(reparam=bool(bb["reparam"]), **common)
    if name == "TinyNAS_csp":
        return TinyNASCSP(reparam=bool(bb["reparam"]), **common)
    return TinyNASMob(**common)      # the names and unsupported options: config.validate_model


def build_neck(nk, opts: Opts) -> nn.Module:
    return GiraffeNeckV2(
        in_channels=tuple(nk["in_channels"]), out_channels=tuple(nk["out_channels"]),
        num_blocks=neck_depth_n(nk["depth"]), hidden_ratio=float(nk["hidden_ratio"]),
        act=nk["act"], depthwise=bool(nk["depthwise"]), opts=opts)


def build_head(hd, opts: Opts) -> nn.Module:
    return ZeroHead(
        num_classes=int(hd["num_classes"]), in_channels=tuple(hd["in_channels"]),
        reg_max=int(hd["reg_max"]), last_kernel_size=int(hd["last_kernel_size"]),
        strides=tuple(_get(hd, "strides", (8, 16, 32))), legacy=bool(_get(hd, "legacy", False)),
        opts=opts)


def build_model(config_or_name, deploy=False) -> DamoYolo:
    """Build the detector from a config (ConfigDict, config name like ``"s"``, or path).

    ``deploy``: ``False`` train graph; ``"reparam"`` RepConvs folded (BNs kept);
    ``True`` fully folded inference graph (no BatchNorm). Variables for the deploy forms come
    from ``damo_jax.models.reparam.fuse``. ``cfg.model.depthwise_impl`` (``"auto"`` default, ``"conv"``,
    ``"taps"``) picks how depthwise convs and the SPP pools are computed (``models/cpu_ops.py``;
    ``"auto"`` = shifted-slice forms on CPU; exporters use ``"conv"``, see :func:`with_depthwise_impl`);
    ``cfg.model.pointwise_impl`` (``"auto"``, ``"conv"``, ``"dot"``) whether 1x1 convs run as
    matrix products (``"auto"`` = on CPU; exporters use ``"conv"``).
    ``cfg.model.grad_impl`` (``"auto"`` default, ``"native"``, ``"matmul"``, ``"onednn"``) picks
    how the train graph's convs and their gradients are computed (``models/conv_grad.py``;
    ``"auto"`` on CPU = dense convs in oneDNN when it loads in a one-device process, else
    matmul-shaped kernel gradients); it changes no parameter, and forward outputs only by float32
    rounding (oneDNN sums in another order). ``cfg.model.dense_impl`` (``"auto"``, ``"conv"``,
    ``"onednn"``) how the folded graphs' dense k x k convs run (``"auto"`` = oneDNN in a one-device
    CPU process; exporters use ``"conv"``). ``cfg.model.bn_impl`` (``"auto"``, ``"xla"``,
    ``"native"``) how training-mode BatchNorm (+ its ReLU) runs (``models/batchnorm.py``; ``"auto"``
    = one native call per BatchNorm on every core in a one-device CPU process).
    ``cfg.model.conv3x3_impl`` (``"auto"``, ``"direct"``, ``"winograd"``) how the 3x3 stride-1 convs
    that run in oneDNN compute (``conv_grad.resolve_conv3x3_impl``; ``"auto"`` = Winograd where its
    x86-64 AVX2 / AVX-512 kernels run).
    """
    cfg = load_config(config_or_name)
    m = cfg.model
    validate_model(m, where=f"config {m.get('name', '?')!r}")
    opts = Opts(deploy=deploy, dtype=str(_get(m, "dtype", "float32")),
                bn_epsilon=float(_get(m, "bn_epsilon", 1e-3)),
                bn_momentum=float(_get(m, "bn_momentum", 0.97)),
                depthwise_impl=str(_get(m, "depthwise_impl", "auto")),
                grad_impl=str(_get(m, "grad_impl", "auto")),
                pointwise_impl=str(_get(m, "pointwise_impl", "auto")),
                dense_impl=str(_get(m, "dense_impl", "auto")),
                bn_impl=str(_get(m, "bn_impl", "auto")),
                conv3x3_impl=str(_get(m, "conv3x3_impl", "auto")))
    return DamoYolo(backbone=build_backbone(m.backbone, opts), neck=build_neck(m.neck, opts),
                    head=build_head(m.head, opts), dtype=opts.dtype)


# XLA:CPU spends most of an optimised compile of ``model.init`` on the hundreds of inlined RNG
# calls (T: ~50 s vs ~10 s without backend optimisation); the init runs once, so skip them.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def init_variables(model: nn.Module, key, input_shape=(1, 64, 64, 3)) -> dict:
    """``model.init(key, zeros(input_shape))`` under jit -> ``{"params", "batch_stats"}``.

    Variable shapes do not depend on the image size, so a small input is enough. On CPU the
    compile runs with XLA backend optimisations off (several times faster, same values).
    """
    images = jnp.zeros(input_shape, jnp.float32)
    lowered = jax.jit(model.init).lower(key, images)
    options = FAST_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
    return dict(lowered.compile(compiler_options=options)(key, images))


def with_depthwise_impl(config_or_name, impl: str, pointwise_impl: str | None = None,
                        dense_impl: str | None = None):
    """A copy of the config with ``model.depthwise_impl = impl`` (``"auto"``/``"conv"``/``"taps"``)
    and, when given, ``model.pointwise_impl = pointwise_impl`` (``"auto"``/``"conv"``/``"dot"``)
    and ``model.dense_impl = dense_impl`` (``"auto"``/``"conv"``/``"onednn"``).

    Exporters call ``with_depthwise_impl(cfg, "conv", "conv", "conv")`` so that every depthwise
    conv is traced as one grouped convolution, every 1x1 conv as a convolution and every k x k conv
    as XLA's op (one ONNX ``Conv`` node each, no oneDNN custom call) whatever the tracing backend.
    """
    resolve_depthwise_impl(impl)  # validates the names
    if pointwise_impl is not None:
        resolve_pointwise_impl(pointwise_impl)
    if dense_impl is not None:
        check_impl("dense_impl", dense_impl, DENSE_IMPLS)
    cfg = load_config(config_or_name)
    cfg = (ml_collections.ConfigDict(cfg) if isinstance(cfg, ml_collections.FrozenConfigDict)
           else copy.deepcopy(cfg))
    with cfg.unlocked():
        cfg.model.depthwise_impl = impl
        if pointwise_impl is not None:
            cfg.model.pointwise_impl = pointwise_impl
        if dense_impl is not None:
            cfg.model.dense_impl = dense_impl
    return cfg
