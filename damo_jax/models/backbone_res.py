"""TinyNAS_res backbone (DAMO-YOLO T/S) and its residual block (SPEC §2.7, §2.8).

Module tree (official names): ``block_list_0`` stem (Focus), ``block_list_{1..5}`` one stage each,
holding ``block_list_{j}`` res blocks; the last stage holds the SPPBottleneck at inner index 1.
"""
from __future__ import annotations

import flax.linen as nn

from damo_jax.models.blocks import ConvKXBN, ConvKXBNAct, Focus, Opts, RepConv, SPPBottleneck
from damo_jax.models.structures import Stage, Structure


class ResBlock(nn.Module):
    """``conv1`` (1x1 for k1kx, kxk for kxkx; BN) -> act -> ``conv2`` (RepConv with identity act,
    or ConvKXBN) -> + residual (none when stride 2; ``residual_proj`` when in != out) -> act."""
    features: int
    bottleneck: int
    kernel: int = 3
    stride: int = 1
    act: str = "relu"
    reparam: bool = True
    kind: str = "k1kx"
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        first_kernel = 1 if self.kind == "k1kx" else self.kernel
        y = ConvKXBN(self.bottleneck, first_kernel, 1, opts=self.opts, act=self.act, name="conv1")(x, train)
        residual = None
        if self.stride != 2:
            residual = x
            if x.shape[-1] != self.features:
                residual = ConvKXBN(self.features, 1, opts=self.opts, name="residual_proj")(x, train)
        if self.reparam:        # act(conv2(y) + residual), the add and act inside conv2's last BN
            if self.kernel != 3:
                raise ValueError(f"RepConv supports kernel 3 only, got {self.kernel}")
            return RepConv(self.features, self.stride, self.act, self.opts, name="conv2")(
                y, train, residual=residual)
        return ConvKXBN(self.features, self.kernel, self.stride, opts=self.opts, act=self.act,
                        name="conv2")(y, train, residual=residual)


class ResStage(nn.Module):
    """One NAS stage of res blocks; ``with_spp`` inserts the SPP after block 0 (index shift)."""
    stage: Stage
    act: str
    reparam: bool
    with_spp: bool = False
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        st = self.stage
        index = 0
        for j in range(st.num_blocks):
            x = ResBlock(st.out_ch, st.btn, st.k, st.s if j == 0 else 1, self.act, self.reparam,
                         st.kind, self.opts, name=f"block_list_{index}")(x, train)
            index += 1
            if j == 0 and self.with_spp:
                x = SPPBottleneck(st.out_ch, opts=self.opts, name=f"block_list_{index}")(x, train)
                index += 1
        return x


class TinyNASRes(nn.Module):
    """Stem + five res stages; returns the outputs of ``out_indices`` (strides 8, 16, 32)."""
    structure: Structure
    out_indices: tuple = (2, 4, 5)
    with_spp: bool = True
    use_focus: bool = True
    act: str = "relu"
    reparam: bool = True
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        stem = self.structure.stem
        if self.use_focus:
            x = Focus(stem.out_ch, stem.k, self.act, opts=self.opts, name="block_list_0")(x, train)
        else:
            x = ConvKXBNAct(stem.out_ch, stem.k, stem.s, self.act, opts=self.opts,
                            name="block_list_0")(x, train)
        outs = [x] if 0 in self.out_indices else []
        last = len(self.structure.stages)
        for i, stage in enumerate(self.structure.stages, start=1):
            x = ResStage(stage, self.act, self.reparam, self.with_spp and i == last, self.opts,
                         name=f"block_list_{i}")(x, train)
            if i in self.out_indices:
                outs.append(x)
        return outs
