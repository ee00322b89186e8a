"""GiraffeNeckV2 (efficient RepGFPN) and its blocks (SPEC §2.11, §2.12).

Names: ``bu_conv13/24/57/46/76`` down-sampling convs (ConvBNAct, or DepthwiseConv for nano),
``merge_3/4/5/7/6`` CSPStage fusion nodes with ``conv1``, ``conv2``, ``convs_{j}``, ``conv3``.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from damo_jax.errors import ConfigError
from damo_jax.models.blocks import (ConvBNAct, MobBlock, Opts, RepConv, conv_bn,
                                    make_divisible, upsample2x)

NECK_MOB_RATIO = 3.0


class DepthwiseConv(nn.Module):
    """``depthwise`` kxk (groups=C) -> ``dwnorm`` -> act -> ``pointwise`` 1x1 -> ``pwnorm`` -> act;
    kaiming-normal(fan_out) init (SPEC §2.11, §4)."""
    features: int
    kernel: int = 3
    stride: int = 2
    act: str = "silu"
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(opts=self.opts, train=train, init="fan_out", act=self.act)
        y = conv_bn(x, x.shape[-1], self.kernel, conv_name="depthwise", bn_name="dwnorm",
                    stride=self.stride, groups=x.shape[-1], **kw)
        return conv_bn(y, self.features, 1, conv_name="pointwise", bn_name="pwnorm", **kw)


class BasicBlock3x3Reverse(nn.Module):
    """Non-depthwise: x + conv1(conv2(x)) with ``conv2`` = RepConv(C -> h) run first and
    ``conv1`` = ConvBNAct(h -> C, 3x3); depthwise: one neck Mob block stored as ``conv``."""
    features: int
    hidden_ratio: float = 1.0
    act: str = "relu"
    depthwise: bool = False
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depthwise:
            hidden = make_divisible(math.ceil(self.features * NECK_MOB_RATIO), 8)
            return MobBlock(self.features, hidden, 1, self.act, se_slot=False, opts=self.opts,
                            name="conv")(x, train)
        hidden = int(self.features * self.hidden_ratio)
        y = RepConv(hidden, 1, self.act, self.opts, name="conv2")(x, train)
        y = ConvBNAct(self.features, 3, act=self.act, opts=self.opts, name="conv1")(y, train)
        return x + y


class CSPStage(nn.Module):
    """ELAN-style fusion node: conv3(concat[conv1(x), z_1, ..., z_n]) with z_j the outputs of the
    n blocks applied in sequence to conv2(x)."""
    features: int
    num_blocks: int
    hidden_ratio: float = 1.0
    act: str = "relu"
    depthwise: bool = False
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        ch_first = self.features // 2
        ch_mid = self.features - ch_first
        y1 = ConvBNAct(ch_first, 1, act=self.act, opts=self.opts, name="conv1")(x, train)
        z = ConvBNAct(ch_mid, 1, act=self.act, opts=self.opts, name="conv2")(x, train)
        parts = [y1]
        for j in range(self.num_blocks):
            z = BasicBlock3x3Reverse(ch_mid, self.hidden_ratio, self.act, self.depthwise, self.opts,
                                     name=f"convs_{j}")(z, train)
            parts.append(z)
        y = jnp.concatenate(parts, axis=-1)
        return ConvBNAct(self.features, 1, act=self.act, opts=self.opts, name="conv3")(y, train)


class GiraffeNeckV2(nn.Module):
    """Inputs [C3, C4, C5] (strides 8/16/32), outputs [P3, P4, P5] (SPEC §2.12 graph)."""
    in_channels: tuple
    out_channels: tuple
    num_blocks: int = 3
    hidden_ratio: float = 1.0
    act: str = "relu"
    depthwise: bool = False
    opts: Opts = Opts()

    def _down(self, x, name, train):
        c = x.shape[-1]
        if self.depthwise:
            return DepthwiseConv(c, 3, 2, self.act, self.opts, name=name)(x, train)
        return ConvBNAct(c, 3, 2, act=self.act, opts=self.opts, name=name)(x, train)

    def _merge(self, parts, features, name, train):
        return CSPStage(features, self.num_blocks, self.hidden_ratio, self.act, self.depthwise,
                        self.opts, name=name)(jnp.concatenate(parts, axis=-1), train)

    @nn.compact
    def __call__(self, feats, train: bool = False):
        x2, x1, x0 = feats
        for x, c, lvl in zip(feats, self.in_channels, (3, 4, 5)):
            if x.shape[-1] != c:
                raise ConfigError(f"config model.neck.in_channels = {tuple(self.in_channels)}, but the "
                                  f"backbone gives {tuple(f.shape[-1] for f in feats)} channels at "
                                  f"model.backbone.out_indices (C3, C4, C5): set the neck's "
                                  f"in_channels to those of the backbone structure")
        ic0, ic1, ic2 = self.in_channels
        oc0, oc1, oc2 = self.out_channels
        x13 = self._down(x1, "bu_conv13", train)
        x3 = self._merge([x0, x13], ic2, "merge_3", train)
        x24 = self._down(x2, "bu_conv24", train)
        x4 = self._merge([x1, x24, upsample2x(x3)], ic1, "merge_4", train)
        x5 = self._merge([x2, upsample2x(x4)], oc0, "merge_5", train)
        x57 = self._down(x5, "bu_conv57", train)
        x7 = self._merge([x4, x57], oc1, "merge_7", train)
        x46 = self._down(x4, "bu_conv46", train)
        x76 = self._down(x7, "bu_conv76", train)
        x6 = self._merge([x3, x46, x76], oc2, "merge_6", train)
        return [x5, x7, x6]
