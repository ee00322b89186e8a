"""TinyNAS_csp backbone (DAMO-YOLO M/L, SPEC §2.9).

NAS stages are grouped into ``csp_stage_{0..4}``: 0 = Focus stem, 1 <- stage 1, 2 <- stage 2,
3 <- stages 3 and 4, 4 <- stage 5 (+ SPP). Each group is a CSP wrapper: ``downsampler`` 3x3 s2,
optional ``spp``, ``conv_shortcut`` / ``conv_start`` 1x1, ``convstem_{j}`` res blocks of half width,
``conv_fuse`` 1x1 on concat[main, shortcut]. Wrapper convs always use ReLU.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from damo_jax.models.backbone_res import ResBlock
from damo_jax.models.blocks import ConvKXBNAct, Focus, Opts, SPPBottleneck
from damo_jax.models.structures import Stage, Structure

STAGE_GROUPS = ((1,), (2,), (3, 4), (5,))
WRAPPER_ACT = "relu"


@dataclasses.dataclass(frozen=True)
class HalfResBlock:
    """One res block inside a CSP stem: ``in_ch -> out_ch`` (half widths), stride 1."""
    in_ch: int
    out_ch: int
    btn: int
    k: int
    kind: str


def csp_stem_blocks(stage: Stage) -> tuple[HalfResBlock, ...]:
    """Res blocks a NAS stage contributes: L-1 when stride 2 else L, widths halved."""
    count = stage.num_blocks - 1 if stage.s == 2 else stage.num_blocks
    out_ch = stage.out_ch // 2
    blocks = []
    for j in range(count):
        in_ch = stage.in_ch // 2 if (stage.s == 1 and j == 0) else out_ch
        blocks.append(HalfResBlock(in_ch, out_ch, stage.btn, stage.k, stage.kind))
    return tuple(blocks)


class CSPWrapper(nn.Module):
    """One CSP stage built from one or more NAS stages (SPEC §2.9)."""
    stages: tuple
    act: str = "silu"
    reparam: bool = True
    with_spp: bool = False
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        first, last = self.stages[0], self.stages[-1]
        hidden = first.out_ch // 2
        blocks = sum((csp_stem_blocks(st) for st in self.stages), ())
        x = ConvKXBNAct(2 * hidden, 3, 2, WRAPPER_ACT, opts=self.opts, name="downsampler")(x, train)
        if self.with_spp:
            x = SPPBottleneck(2 * hidden, opts=self.opts, name="spp")(x, train)
        if not blocks:
            return x
        shortcut = ConvKXBNAct(last.out_ch // 2, 1, 1, WRAPPER_ACT, opts=self.opts,
                               name="conv_shortcut")(x, train)
        main = ConvKXBNAct(hidden, 1, 1, WRAPPER_ACT, opts=self.opts, name="conv_start")(x, train)
        for j, blk in enumerate(blocks):
            if main.shape[-1] != blk.in_ch:
                raise ValueError(f"CSP res block {j}: expects {blk.in_ch} input channels, "
                                 f"got {main.shape[-1]}")
            main = ResBlock(blk.out_ch, blk.btn, blk.k, 1, self.act, self.reparam, blk.kind,
                            self.opts, name=f"convstem_{j}")(main, train)
        y = jnp.concatenate([main, shortcut], axis=-1)
        return ConvKXBNAct(last.out_ch, 1, 1, WRAPPER_ACT, opts=self.opts,
                           name="conv_fuse")(y, train)


class TinyNASCSP(nn.Module):
    """Focus stem + four CSP stages; returns ``csp_stage`` outputs at ``out_indices``."""
    structure: Structure
    out_indices: tuple = (2, 3, 4)
    with_spp: bool = True
    use_focus: bool = True
    act: str = "silu"
    reparam: bool = True
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        stem = self.structure.stem
        if len(self.structure.stages) != 5:
            raise ValueError(f"TinyNAS_csp needs 5 NAS stages, structure {self.structure.name} "
                             f"has {len(self.structure.stages)}")
        if self.use_focus:
            x = Focus(stem.out_ch, stem.k, self.act, opts=self.opts, name="csp_stage_0")(x, train)
        else:
            x = ConvKXBNAct(stem.out_ch, stem.k, stem.s, self.act, opts=self.opts,
                            name="csp_stage_0")(x, train)
        outs = [x] if 0 in self.out_indices else []
        for g, group in enumerate(STAGE_GROUPS, start=1):
            stages = tuple(self.structure.stages[i - 1] for i in group)
            x = CSPWrapper(stages, self.act, self.reparam, self.with_spp and g == len(STAGE_GROUPS),
                           self.opts, name=f"csp_stage_{g}")(x, train)
            if g in self.out_indices:
                outs.append(x)
        return outs
