"""Building blocks shared by backbones, neck and head (SPEC §2.1–§2.6, §2.10, §3, §4).

Layout: NHWC activations, conv kernels ``[kh, kw, in/groups, out]``. Every submodule carries the
name of the official PyTorch attribute, with list indices written ``<list>_<i>`` (``block_list_3``,
``conv_7``), so ``damo_jax.interop.convert`` maps ``a/b_3/c/kernel`` to ``a.b.3.c.weight`` mechanically.

Deploy modes (``Opts.deploy``):
* ``False``     — train graph: RepConv has ``rbr_dense`` + ``rbr_1x1`` branches, every conv has a BN.
* ``"reparam"`` — RepConvs folded into ``rbr_reparam`` (conv with bias); all other BNs kept.
* ``True``      — fully folded: every conv+BN pair is one conv with bias, no BatchNorm left.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from damo_jax.models.batchnorm import BN_IMPLS, BatchNorm
from damo_jax.models.conv_grad import (CONV3X3_IMPLS, DENSE_IMPLS, GRAD_IMPLS,
                                      make_conv_general_dilated, resolve_dense_impl,
                                      resolve_grad_impl, winograd_route)
from damo_jax.models.cpu_ops import (DEPTHWISE_IMPLS, POINTWISE_IMPLS, check_impl,
                                     depthwise_conv_taps, pointwise_conv_dot, resolve_depthwise_impl,
                                     resolve_pointwise_impl, spp_max_pools)


@dataclasses.dataclass(frozen=True)
class Opts:
    """Options every block needs: deploy mode, compute dtype, BatchNorm constants, the
    formulation of depthwise convs and SPP pools (``"auto"``/``"conv"``/``"taps"``) and of 1x1
    convs (``"auto"``/``"conv"``/``"dot"``, both ``models/cpu_ops.py``) and of the conv gradients
    (``"auto"``/``"native"``/``"matmul"``/``"onednn"``, ``models/conv_grad.py``; train graphs
    only) and of the dense k x k convs of folded inference graphs (``"auto"``/``"conv"``/
    ``"onednn"``, ``conv_grad.resolve_dense_impl``) and of training-mode BatchNorm (``"auto"``/
    ``"xla"``/``"native"``, ``models/batchnorm.py``) and of the 3x3 stride-1 convs that run in
    oneDNN (``"auto"``/``"direct"``/``"winograd"``, ``conv_grad.resolve_conv3x3_impl``). Unknown
    values are ``ConfigError``s (``cpu_ops.check_impl``)."""
    deploy: Any = False
    dtype: str = "float32"
    bn_epsilon: float = 1e-3
    bn_momentum: float = 0.97
    depthwise_impl: str = "auto"
    grad_impl: str = "auto"
    pointwise_impl: str = "auto"
    dense_impl: str = "auto"
    bn_impl: str = "auto"
    conv3x3_impl: str = "auto"

    def __post_init__(self):
        mode = self.deploy
        if isinstance(mode, str) and mode != "reparam":
            raise ValueError(f"deploy must be one of False, 'reparam', True; got {mode!r}")
        if not isinstance(mode, str):
            if mode not in (0, 1):
                raise ValueError(f"deploy must be one of False, 'reparam', True; got {mode!r}")
            object.__setattr__(self, "deploy", bool(mode))
        check_impl("depthwise_impl", self.depthwise_impl, DEPTHWISE_IMPLS)
        check_impl("pointwise_impl", self.pointwise_impl, POINTWISE_IMPLS)
        check_impl("grad_impl", self.grad_impl, GRAD_IMPLS)
        check_impl("dense_impl", self.dense_impl, DENSE_IMPLS)
        check_impl("bn_impl", self.bn_impl, BN_IMPLS)
        check_impl("conv3x3_impl", self.conv3x3_impl, CONV3X3_IMPLS)

    @property
    def fuse_bn(self) -> bool:
        return self.deploy is True

    @property
    def fuse_rep(self) -> bool:
        return self.deploy is True or self.deploy == "reparam"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


def activation(name: str):
    """relu / silu / identity (the only activations of the released models, SPEC §0)."""
    table = {"relu": nn.relu, "silu": nn.silu, "swish": nn.silu, "identity": lambda x: x,
             None: lambda x: x}
    if name not in table:
        raise ValueError(f"unknown activation {name!r} (known: relu, silu, identity)")
    return table[name]


# ----------------------------------------------------------------------------- initialisers (§4)
def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _mob_kernel_init(key, shape, dtype=jnp.float32):
    """Mob backbone: N(0, 1 / (in/groups)) (torch ``weight.shape[1]``)."""
    return jax.random.normal(key, shape, dtype) / shape[-2]


def kernel_init_for(style: str):
    """Conv weight initialiser for an init style of SPEC §4."""
    if style == "torch":        # kaiming-uniform a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    if style == "mob":
        return _mob_kernel_init
    if style == "fan_out":      # kaiming-normal(fan_out, relu), groups not considered
        return nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    if style == "head":
        return nn.initializers.normal(0.01)
    raise ValueError(f"unknown init style {style!r}")


def bn_bias_init_for(style: str):
    return nn.initializers.constant(1e-4) if style == "mob" else nn.initializers.zeros


# ----------------------------------------------------------------------------- primitives (§2.1)
def conv(x, features: int, kernel: int, *, name: str, opts: Opts, stride: int = 1, groups: int = 1,
         use_bias: bool = False, init: str = "torch", bias_init=None):
    """Conv with symmetric ``(k-1)//2`` padding (never 'SAME'), created in the caller's scope.
    Depthwise convs (groups == in == out channels) run as ``opts.depthwise_impl`` resolves at
    trace time, 1x1 convs as ``opts.pointwise_impl`` resolves (same parameters either way). In train graphs (``deploy=False``) the gradients
    come from ``models/conv_grad.py`` when ``opts.grad_impl`` resolves to ``"matmul"`` (same
    forward op and outputs), or dense and depthwise convs run in oneDNN when it resolves to ``"onednn"``
    (``models/onednn.py``). Folded inference graphs (``deploy`` ``True`` / ``"reparam"``) never
    differentiate: their float32 dense k x k convs (k > 1) run in oneDNN when ``opts.dense_impl``
    resolves to ``"onednn"`` (the CPU default), every other conv as the native op / ``*_impl``
    form."""
    pad = (kernel - 1) // 2
    fan_in = (x.shape[-1] // groups) * kernel * kernel
    depthwise = groups > 1 and groups == x.shape[-1] == features
    taps = depthwise and resolve_depthwise_impl(opts.depthwise_impl) == "taps"
    pointwise = (kernel == 1 and groups == 1
                 and resolve_pointwise_impl(opts.pointwise_impl) == "dot")
    grad_impl = resolve_grad_impl(opts.grad_impl) if opts.deploy is False else "native"
    if grad_impl in ("matmul", "onednn"):
        conv_fn = make_conv_general_dilated(
            taps=taps, pointwise=pointwise, onednn_convs=grad_impl == "onednn",
            winograd=winograd_route(opts.conv3x3_impl) if grad_impl == "onednn" else None)
    elif (opts.deploy is not False and groups == 1 and kernel > 1
          and opts.compute_dtype == jnp.float32 and resolve_dense_impl(opts.dense_impl) == "onednn"):
        conv_fn = make_conv_general_dilated(taps=False, onednn_convs=True,
                                            winograd=winograd_route(opts.conv3x3_impl))
    else:
        conv_fn = (depthwise_conv_taps if taps else pointwise_conv_dot if pointwise else None)
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        feature_group_count=groups, use_bias=use_bias, dtype=opts.compute_dtype,
        param_dtype=jnp.float32, kernel_init=kernel_init_for(init),
        bias_init=bias_init or _torch_bias_init(fan_in),
        conv_general_dilated=conv_fn, name=name)(x)


def batch_norm(x, *, name: str, opts: Opts, train: bool, init: str = "torch", act: str | None = None,
               residual=None):
    """``act(BN(x) [+ residual])``: training-mode statistics over (batch, H, W) with
    ``models/batchnorm.py``'s closed-form gradient (``opts.bn_impl``: XLA's ops or one native
    call); variables and inference formula as ``nn.BatchNorm(use_fast_variance=False)``."""
    return BatchNorm(
        use_running_average=not train, momentum=opts.bn_momentum, epsilon=opts.bn_epsilon,
        dtype=opts.compute_dtype, param_dtype=jnp.float32, act=act, impl=opts.bn_impl,
        bias_init=bn_bias_init_for(init), name=name)(x, residual)


def conv_bn(x, features: int, kernel: int, *, conv_name: str, bn_name: str, opts: Opts, train: bool,
            stride: int = 1, groups: int = 1, init: str = "torch", act: str | None = None,
            residual=None):
    """``act(BN(conv(x)) [+ residual])`` (conv without bias), or ``act(conv(x) [+ residual])`` with
    one conv with bias named ``conv_name`` when BNs are folded."""
    if opts.fuse_bn:
        y = conv(x, features, kernel, name=conv_name, opts=opts, stride=stride, groups=groups,
                 use_bias=True, init=init, bias_init=nn.initializers.zeros)
        return activation(act)(y if residual is None else y + residual)
    y = conv(x, features, kernel, name=conv_name, opts=opts, stride=stride, groups=groups, init=init)
    return batch_norm(y, name=bn_name, opts=opts, train=train, init=init, act=act,
                      residual=residual)


def upsample2x(x):
    """Nearest-neighbour 2x upsample of NHWC maps as a repeat (bit exact)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def focus_space_to_depth(x):
    """(B,H,W,C) -> (B,H/2,W/2,4C) with channel blocks TL, BL, TR, BR (SPEC §2.4)."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Focus needs even H and W, got {h}x{w}")

    def sub(r, col):
        return jax.lax.slice(x, (0, r, col, 0), (b, h, w, c), (1, 2, 2, 1))
    return jnp.concatenate([sub(0, 0), sub(1, 0), sub(0, 1), sub(1, 1)], axis=-1)


# ----------------------------------------------------------------------------- modules
class ConvBN(nn.Module):
    """``conv`` + ``bn`` (the RepConv branches): ``act(BN(conv(x)) [+ residual])``, no
    activation by default."""
    features: int
    kernel: int
    stride: int = 1
    opts: Opts = Opts()
    act: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, residual=None):
        return conv_bn(x, self.features, self.kernel, conv_name="conv", bn_name="bn",
                       opts=self.opts, train=train, stride=self.stride, act=self.act,
                       residual=residual)


class ConvBNAct(nn.Module):
    """``ops.ConvBNAct``: conv (no bias) -> ``bn`` -> act (SPEC §2.2)."""
    features: int
    kernel: int
    stride: int = 1
    groups: int = 1
    act: str = "relu"
    init: str = "torch"
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        return conv_bn(x, self.features, self.kernel, conv_name="conv", bn_name="bn", opts=self.opts,
                       train=train, stride=self.stride, groups=self.groups, init=self.init,
                       act=self.act)


class ConvKXBN(nn.Module):
    """Backbone ``ConvKXBN``: ``conv1`` (no bias) -> ``bn1`` (SPEC §2.3), then ``act`` (none by
    default; the callers that follow it with an activation pass it here, so that a native
    BatchNorm runs both in one call)."""
    features: int
    kernel: int
    stride: int = 1
    init: str = "torch"
    opts: Opts = Opts()
    act: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False, residual=None):
        return conv_bn(x, self.features, self.kernel, conv_name="conv1", bn_name="bn1",
                       opts=self.opts, train=train, stride=self.stride, init=self.init, act=self.act,
                       residual=residual)


class ConvKXBNAct(nn.Module):
    """Backbone ``ConvKXBNRELU``: a ``ConvKXBN`` stored as ``conv``, then the activation."""
    features: int
    kernel: int
    stride: int = 1
    act: str = "relu"
    init: str = "torch"
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        return ConvKXBN(self.features, self.kernel, self.stride, self.init, self.opts, self.act,
                        name="conv")(x, train)


class Focus(nn.Module):
    """Space-to-depth (TL, BL, TR, BR) then ``conv`` = ConvBNAct(4C -> features, k, s1)."""
    features: int
    kernel: int = 3
    act: str = "relu"
    init: str = "torch"
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        return ConvBNAct(self.features, self.kernel, 1, 1, self.act, self.init, self.opts,
                         name="conv")(focus_space_to_depth(x), train)


class SPPBottleneck(nn.Module):
    """1x1 conv to C/2, concat [y, pool5, pool9, pool13], 1x1 conv; always SiLU (SPEC §2.5).
    The pools are separable cascades when ``opts.depthwise_impl`` resolves to ``"taps"``."""
    features: int
    pool_sizes: tuple = (5, 9, 13)
    init: str = "torch"
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = x.shape[-1] // 2
        y = ConvBNAct(hidden, 1, act="silu", init=self.init, opts=self.opts, name="conv1")(x, train)
        separable = resolve_depthwise_impl(self.opts.depthwise_impl) == "taps"
        y = jnp.concatenate([y] + spp_max_pools(y, self.pool_sizes, separable=separable), axis=-1)
        return ConvBNAct(self.features, 1, act="silu", init=self.init, opts=self.opts,
                         name="conv2")(y, train)


class RepConv(nn.Module):
    """RepVGG-style 3x3: ``rbr_dense`` (3x3+BN) + ``rbr_1x1`` (1x1+BN), no identity branch;
    deploy form ``rbr_reparam`` (3x3 conv with bias). out = act(sum [+ residual]) (SPEC §2.6,
    §3.2); in training, ``rbr_dense``'s BN adds the rest and applies ``act`` (one native call on
    CPU: ``models/batchnorm.py``)."""
    features: int
    stride: int = 1
    act: str = "relu"
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False, residual=None):
        if self.opts.fuse_rep:
            y = conv(x, self.features, 3, name="rbr_reparam", opts=self.opts, stride=self.stride,
                     use_bias=True, bias_init=nn.initializers.zeros)
            return activation(self.act)(y if residual is None else y + residual)
        rest = ConvBN(self.features, 1, self.stride, self.opts, name="rbr_1x1")(x, train)
        rest = rest if residual is None else rest + residual
        return ConvBN(self.features, 3, self.stride, self.opts, act=self.act,
                      name="rbr_dense")(x, train, residual=rest)


class MobBlock(nn.Module):
    """Inverted residual (``MobileV3Block``): 1x1 expand, 5x5 depthwise, 1x1 project (SPEC §2.10,
    §2.11). ``se_slot=True`` (backbone variant) puts the projection at ``conv_7``/``conv_8``,
    the neck variant at ``conv_6``/``conv_7``. Residual iff stride 1 and in == out."""
    features: int
    hidden: int
    stride: int = 1
    act: str = "silu"
    se_slot: bool = True
    init: str = "torch"
    opts: Opts = Opts()

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(opts=self.opts, train=train, init=self.init)
        y = conv_bn(x, self.hidden, 1, conv_name="conv_0", bn_name="conv_1", act=self.act, **kw)
        y = conv_bn(y, self.hidden, 5, conv_name="conv_3", bn_name="conv_4", stride=self.stride,
                    groups=self.hidden, act=self.act, **kw)
        last = 7 if self.se_slot else 6
        y = conv_bn(y, self.features, 1, conv_name=f"conv_{last}", bn_name=f"conv_{last + 1}", **kw)
        if self.stride == 1 and x.shape[-1] == self.features:
            y = x + y
        return y


def make_divisible(v: float, divisor: int = 8) -> int:
    """``max(divisor, floor((v + divisor/2) / divisor) * divisor)``, +divisor if < 0.9 v."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new
