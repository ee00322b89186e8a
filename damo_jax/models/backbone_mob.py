"""TinyNAS_mob backbone (DAMO-YOLO nano models, SPEC §2.10).

``block_list_0`` = stem (3 -> C, 3x3 stride 2 — the file's ``in``/``s`` are ignored — or Focus),
``block_list_{1..5}`` = stages of Mob blocks (5x5 depthwise, expansion 3.5 + 0.5 (i-1) for stage i,
``make_divisible(ceil(out * ratio), 8)``; ``btn``/``k`` of the file are ignored); the SPP sits after
block 0 of the last stage. Every conv uses the backbone's N(0, 1/fan_in_channels) init, every BN
bias starts at 1e-4 (SPEC §4).
"""
from __future__ import annotations

import math

import flax.linen as nn

from damo_jax.models.blocks import (ConvKXBNAct, Focus, MobBlock, Opts, SPPBottleneck,
                                    make_divisible)
from damo_jax.models.structures import Stage, Structure

INIT = "mob"


def mob_hidden_width(out_ch: int, stage_index: int) -> int:
    """Backbone Mob block width E for stage ``stage_index`` (1..5)."""
    ratio = 3.5 + 0.5 * (stage_index - 1)
    return make_divisible(math.ceil(out_ch * ratio), 8)


class MobStage(nn.Module):
    stage: Stage
    stage_index: int
    act: str = "silu"
    with_spp: bool = False
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        st = self.stage
        hidden = mob_hidden_width(st.out_ch, self.stage_index)
        index = 0
        for j in range(st.num_blocks):
            x = MobBlock(st.out_ch, hidden, st.s if j == 0 else 1, self.act, se_slot=True, init=INIT,
                         opts=self.opts, name=f"block_list_{index}")(x, train)
            index += 1
            if j == 0 and self.with_spp:
                x = SPPBottleneck(st.out_ch, init=INIT, opts=self.opts,
                                  name=f"block_list_{index}")(x, train)
                index += 1
        return x


class TinyNASMob(nn.Module):
    structure: Structure
    out_indices: tuple = (2, 4, 5)
    with_spp: bool = True
    use_focus: bool = False
    act: str = "silu"
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        stem = self.structure.stem
        if self.use_focus:
            x = Focus(stem.out_ch, stem.k, self.act, INIT, self.opts, name="block_list_0")(x, train)
        else:
            x = ConvKXBNAct(stem.out_ch, stem.k, 2, self.act, INIT, self.opts,
                            name="block_list_0")(x, train)
        outs = [x] if 0 in self.out_indices else []
        last = len(self.structure.stages)
        for i, stage in enumerate(self.structure.stages, start=1):
            x = MobStage(stage, i, self.act, self.with_spp and i == last, self.opts,
                         name=f"block_list_{i}")(x, train)
            if i in self.out_indices:
                outs.append(x)
        return outs
