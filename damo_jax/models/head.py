"""ZeroHead: per-level cls/reg convs, Scale, DFL integral, priors, decode (SPEC §2.13).

Names: ``gfl_cls_{i}``, ``gfl_reg_{i}`` (convs with bias), ``scales_{i}`` (param ``scale``, shape ()).
Outputs are float32 whatever the compute dtype.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from damo_jax.errors import ConfigError
from damo_jax.models.blocks import Opts, conv

PRIOR_PROB = 0.01


def make_priors(h: int, w: int, strides=(8, 16, 32)) -> np.ndarray:
    """Prior points (A, 4) float32 rows (x, y, s, s), x = col*s, y = row*s (no 0.5 offset),
    levels stride 8 -> 16 -> 32, row-major within a level. ``h``/``w`` are the input size."""
    return make_priors_for_levels([(h // s, w // s, s) for s in strides])


def make_priors_for_levels(levels) -> np.ndarray:
    """Priors for explicit ``(H_l, W_l, stride)`` levels."""
    rows = []
    for hl, wl, s in levels:
        ys, xs = np.meshgrid(np.arange(hl), np.arange(wl), indexing="ij")
        pts = np.stack([xs.ravel() * s, ys.ravel() * s], axis=-1).astype(np.float32)
        rows.append(np.concatenate([pts, np.full((hl * wl, 2), s, np.float32)], axis=-1))
    return np.concatenate(rows, axis=0)


def dfl_integral(reg_logits_flat):
    """Expected bin index per side: (B, A, 4, R+1) logits -> (B, A, 4). Written as
    ``(softmax * arange).sum`` (a Mul + ReduceSum in ONNX; an einsum/dot exports badly)."""
    bins = reg_logits_flat.shape[-1]
    prob = nn.softmax(reg_logits_flat, axis=-1)
    return (prob * jnp.arange(bins, dtype=prob.dtype)).sum(-1)


def distance2bbox(points, distance):
    """points (A, 2) x/y; distance (B, A, 4) l, t, r, b in px -> x1y1x2y2 (no clipping)."""
    x, y = points[:, 0], points[:, 1]
    return jnp.stack([x - distance[..., 0], y - distance[..., 1],
                      x + distance[..., 2], y + distance[..., 3]], axis=-1)


class Scale(nn.Module):
    """A learnable scalar (init 1.0) multiplying the input."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, ())
        return x * scale.astype(x.dtype)


class ZeroHead(nn.Module):
    num_classes: int = 80
    in_channels: tuple = (64, 128, 256)
    reg_max: int = 16
    last_kernel_size: int = 3
    strides: tuple = (8, 16, 32)
    legacy: bool = False
    opts: Opts = Opts()

    def _level(self, i, feat):
        """Per-level (cls logits, reg logits after Scale), NHWC float32."""
        cls_out = self.num_classes + 1 if self.legacy else self.num_classes
        bias_cls = nn.initializers.constant(-math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        cls = conv(feat, cls_out, self.last_kernel_size, name=f"gfl_cls_{i}", opts=self.opts,
                   use_bias=True, init="head", bias_init=bias_cls)
        reg = conv(feat, 4 * (self.reg_max + 1), self.last_kernel_size, name=f"gfl_reg_{i}",
                   opts=self.opts, use_bias=True, init="head", bias_init=nn.initializers.zeros)
        reg = Scale(name=f"scales_{i}")(reg.astype(jnp.float32))
        return cls.astype(jnp.float32), reg

    @nn.compact
    def __call__(self, feats, train: bool = False):
        del train  # no BN, no dropout in the head
        if len(feats) != len(self.strides):
            raise ValueError(f"ZeroHead: {len(feats)} feature maps for strides {self.strides}")
        bins = self.reg_max + 1
        cls_levels, reg_levels, levels = [], [], []
        for i, feat in enumerate(feats):
            if feat.shape[-1] != self.in_channels[i]:
                raise ConfigError(f"config model.head.in_channels = {tuple(self.in_channels)}, but the "
                                  f"neck gives {tuple(f.shape[-1] for f in feats)} channels "
                                  f"(model.neck.out_channels): they must be equal")
            cls, reg = self._level(i, feat)
            cls_levels.append(cls)
            reg_levels.append(reg)
            levels.append((feat.shape[1], feat.shape[2], self.strides[i]))
        batch = feats[0].shape[0]
        cls_flat = jnp.concatenate([c.reshape(batch, -1, c.shape[-1]) for c in cls_levels], 1)
        if self.legacy:
            cls_flat = cls_flat[..., :self.num_classes]
        reg_flat = jnp.concatenate([r.reshape(batch, -1, 4, bins) for r in reg_levels], 1)
        priors = make_priors_for_levels(levels)
        dfl = dfl_integral(reg_flat)
        strides_flat = priors[:, 2]
        boxes = distance2bbox(priors[:, :2], dfl * strides_flat[:, None])
        return dict(scores=nn.sigmoid(cls_flat), boxes=boxes, cls_logits=cls_levels,
                    reg_logits=reg_levels, cls_logits_flat=cls_flat, reg_logits_flat=reg_flat,
                    dfl=dfl, priors=jnp.asarray(priors), strides_flat=jnp.asarray(strides_flat))
