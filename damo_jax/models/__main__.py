"""``damo-jax info``: model summary, per-part parameter counts and conv GFLOPs.

examples:
  damo-jax info --config s
  damo-jax info --config ns --img-size 416 --deploy
  damo-jax info --config t --img-size 320 480 --deploy full --batch 4
  damo-jax info --weights damoyolo_tinynasL25_S.pth     # which model a .pth / .npz holds

Alias: python -m damo_jax.models.

GFLOPs = 2 x multiply-accumulates of every convolution (``B * H_out * W_out * C_out * kh * kw *
C_in / groups``), read from the traced shapes; BN, activations, pooling, bias adds and the head's
softmax/decode are not counted (the official README numbers come from ``thop`` and include some of
them, hence a ~0.5 % excess there). Parameters = trainable ``params`` only (BN running statistics
are buffers, as in PyTorch's count). ``--deploy`` counts the RepConv-folded graph (the official
deploy/README form); ``--deploy full`` the fully folded export graph.
"""
from __future__ import annotations

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from damo_jax.config import load_config
from damo_jax.models.build import build_model

PARTS = ("backbone", "neck", "head")


def conv_macs(model: nn.Module, input_shape) -> dict[str, int]:
    """Multiply-accumulates of all convs per top-level part, from shapes only (no compute)."""
    macs: dict[str, int] = collections.Counter()

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if isinstance(mod, nn.Conv) and context.method_name == "__call__":
            kh, kw = mod.kernel_size
            cin = args[0].shape[-1]
            macs[mod.path[0] if mod.path else "?"] += (
                int(np.prod(out.shape)) * kh * kw * cin // mod.feature_group_count)
        return out

    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)

    def run(variables, images):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, images)

    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    jax.eval_shape(run, variables, x)
    return dict(macs)


def param_counts(model: nn.Module, input_shape=(1, 64, 64, 3)) -> dict[str, int]:
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    return {part: sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params[part]))
            for part in params}


def summary(config, img_size=None, deploy=False, batch=1) -> dict:
    cfg = load_config(config)
    h, w = img_size or tuple(cfg.model.image_size)
    model = build_model(cfg, deploy=deploy)
    params = param_counts(model)
    macs = conv_macs(model, (batch, h, w, 3))
    return {"model": cfg.model.name, "size": (h, w), "deploy": deploy, "params": params,
            "num_classes": int(cfg.model.head.num_classes),
            "gflops": {k: 2 * v / 1e9 for k, v in macs.items()}}


PROG = "damo-jax info"


def build_parser(prog: str = PROG):
    from damo_jax.cli import common
    ap = common.Parser(prog=prog, description=__doc__.split("\n")[0],
                       epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--config", help=f"config name ({common.config_names()}) or path (default: "
                    "the model --weights holds, else s); --config.KEY=VALUE overrides any key")
    ap.add_argument("--weights", help="an official .pth or converted .npz state dict: names the "
                    "bundled model and class count it holds, then summarises that model")
    common.add_img_size(ap, "input size (default: the config's model.image_size)")
    ap.add_argument("--deploy", nargs="?", const="reparam", default=None, choices=("reparam", "full"))
    ap.add_argument("--batch", type=int, default=1)
    return ap


def run(args, overrides=()) -> dict:
    from damo_jax.cli import common
    from damo_jax.errors import ConfigError
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    size = common.img_size(args.img_size)
    common.refuse_flag_and_override(overrides, ("--weights", args.weights,
                                                ("model.head.num_classes",)))
    deploy_flag = args.deploy
    if args.weights:
        config, num_classes, folded = identify_weights(args.weights, args.config)
        overrides = (*overrides, f"--config.model.head.num_classes={num_classes}")
        deploy_flag = deploy_flag or ("reparam" if folded else None)
    else:
        config = args.config or "s"
    cfg = common.load_cli_config(config, overrides)
    deploy = {None: False, "reparam": "reparam", "full": True}[deploy_flag]
    s = summary(cfg, size, deploy, args.batch)
    graph = {False: "train graph", "reparam": "RepConv-folded deploy graph",
             True: "fully folded graph"}[deploy]
    print(f"DAMO-YOLO-{s['model'].upper()}  {graph}, input {args.batch}x{s['size'][0]}x{s['size'][1]}"
          f", {s['num_classes']} classes (training sets the count from its data)")
    print(f"{'part':10s} {'params':>14s} {'GFLOPs':>10s}")
    for part in PARTS:
        print(f"{part:10s} {s['params'].get(part, 0):>14,d} {s['gflops'].get(part, 0.0):>10.3f}")
    print(f"{'total':10s} {sum(s['params'].values()):>14,d} {sum(s['gflops'].values()):>10.3f}")
    print("GFLOPs = 2 x conv multiply-accumulates (from shapes); params = trainable parameters")
    return s


def identify_weights(path, config=None) -> tuple[str, int, bool]:
    """``(config name, class count, re-parameterised)`` of the state dict file ``path``, printed as
    one line; :class:`ConfigError` when no bundled model fits it, or when ``config`` (a bundled
    name or a config file's ``model.name``) names another model."""
    from damo_jax.config import load_config
    from damo_jax.errors import ConfigError
    from damo_jax.inference.loading import read_weights_file
    from damo_jax.interop.convert import classifier_outputs, identify_model
    state_dict = read_weights_file(path)
    found = identify_model(state_dict)
    if not found:
        from damo_jax.cli import common
        raise ConfigError(f"--weights {path}: its keys and shapes match none of the bundled models "
                          f"({common.config_names()}); not a DAMO-YOLO state dict, a fully "
                          f"folded one (BN folded too: the official deploy files fold only the "
                          f"RepConvs), or an architecture without a config here")
    name, folded = found.split()[0], "re-parameterised" in found
    if config is not None and load_config(config).model.name != name:
        raise ConfigError(f"--weights {path}: holds DAMO-YOLO-{name.upper()}, not --config {config} "
                          f"(leave --config out, or use --config {name})")
    legacy = bool(load_config(name).model.head.get("legacy", False))   # one extra channel
    num_classes = classifier_outputs(state_dict) - legacy
    form = "RepConv branches folded (a deploy state dict)" if folded else "train graph"
    if "fused" in found:
        form += ", conv+BN pairs folded by the official fuse_model"
    print(f"{path}: DAMO-YOLO-{name.upper()} (--config {name}), {num_classes} classes, {form}")
    return name, num_classes, folded


def main(argv=None, prog: str = "python -m damo_jax.models"):
    from damo_jax.cli.common import run_command
    return run_command(build_parser, run, argv, prog)


if __name__ == "__main__":
    main()
