"""Build a TensorRT engine from an exported ONNX file (TensorRT Python API; needs an NVIDIA GPU).

    damo-jax export tensorrt --onnx s.onnx --output s.engine
    damo-jax export tensorrt --onnx s_dyn.onnx --output s_dyn.engine --min-batch 1 --opt-batch 8 --max-batch 32
    damo-jax export tensorrt --onnx s.onnx --output s_fp16.engine --fp16

The engine is built with the explicit-batch ONNX parser, a workspace memory-pool limit and, for a
dynamic-batch ONNX (``--batch dynamic`` in to_onnx.py), one optimisation profile
``images: (min|opt|max, 3, H, W)``. ``--fp16``:

* TensorRT <= 10 (weakly typed): sets ``BuilderFlag.FP16`` on the FP32 ONNX.
* TensorRT >= 11 removed ``BuilderFlag.FP16`` (networks are always strongly typed: each tensor
  keeps the type the ONNX file gives it). FP16 then needs an FP16 ONNX: this script writes one
  next to the engine with ``damo_jax.export.fp16`` (weights and activations FP16, input/outputs and
  the NMS part FP32) and builds from it. NVIDIA's own tool for this is ModelOpt AutoCast
  (``python -m modelopt.onnx.autocast --onnx_path s.onnx --output_path s_fp16.onnx``); pass such a
  file with ``--onnx`` and ``--fp16`` is not needed.

Equivalent ``trtexec`` line: printed with ``--print-trtexec``.
TensorRT cannot be installed on the CI machines (PyPI only has NVIDIA's downloader stubs), so this
script is untested there beyond argument parsing and the profile logic.
"""
from __future__ import annotations

import logging
from pathlib import Path


from damo_jax.errors import ConfigError, InputPathError, UserError, write_failed
from damo_jax.export import onnx_utils

log = logging.getLogger("damo_jax.export")

INPUT_NAME = "images"


def onnx_input_shape(onnx_path) -> tuple:
    """Input ``images`` shape of an ONNX file: ints, or the dim_param string for dynamic dims."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    if INPUT_NAME not in inputs:
        raise ConfigError(f"{onnx_path}: no input named {INPUT_NAME!r} (inputs {list(inputs)})")
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


def profile_shapes(input_shape, min_batch=None, opt_batch=None, max_batch=None):
    """Optimisation-profile shapes ``(min, opt, max)`` for the input, or ``None`` when static.

    A static-batch ONNX needs no profile; asking for other batch sizes is an error. A dynamic one
    takes the defaults 1 / 8 / 32 for missing values and needs ``min <= opt <= max``.
    """
    if len(input_shape) != 4:
        raise ConfigError(f"input {INPUT_NAME!r} must be 4-D (N, 3, H, W), got {input_shape}")
    batch, c, h, w = input_shape
    if not all(isinstance(d, int) and d > 0 for d in (c, h, w)):
        raise ConfigError(f"input {INPUT_NAME!r}: only the batch may be dynamic, got {input_shape}")
    requested = [b for b in (min_batch, opt_batch, max_batch) if b is not None]
    if isinstance(batch, int) and batch > 0:
        if any(b != batch for b in requested):
            raise ConfigError(f"the ONNX file has a static batch of {batch}; re-export with "
                             f"`to_onnx.py --batch dynamic` to build for batches {requested}")
        return None
    lo = 1 if min_batch is None else int(min_batch)
    opt = 8 if opt_batch is None else int(opt_batch)
    hi = 32 if max_batch is None else int(max_batch)
    if min_batch is None and opt < lo:
        lo = opt
    if max_batch is None and hi < opt:
        hi = opt
    if not 1 <= lo <= opt <= hi:
        raise ConfigError(f"batch profile must satisfy 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
    return tuple((b, c, h, w) for b in (lo, opt, hi))


def has_fp16_flag(trt) -> bool:
    """TensorRT <= 10 exposes ``BuilderFlag.FP16``; 11+ removed it (strong typing only)."""
    return hasattr(trt.BuilderFlag, "FP16")


def trtexec_command(onnx_path, engine_path, shapes=None, *, fp16=False, workspace_gib=2.0) -> str:
    """The equivalent ``trtexec`` command line."""
    def fmt(shape):
        return "x".join(str(d) for d in shape)
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}",
             f"--memPoolSize=workspace:{int(workspace_gib * 1024)}M"]
    if shapes is not None:
        parts += [f"--minShapes={INPUT_NAME}:{fmt(shapes[0])}",
                  f"--optShapes={INPUT_NAME}:{fmt(shapes[1])}",
                  f"--maxShapes={INPUT_NAME}:{fmt(shapes[2])}"]
    if fp16:
        parts.append("--fp16  # TensorRT <= 10 only; TensorRT 11: give an FP16 ONNX instead")
    return " ".join(parts)


class TensorRTMissing(UserError, ImportError):
    """TensorRT's Python package cannot be imported (a user error: one line on the CLI)."""


def build_engine(onnx_path, engine_path, *, fp16=False, min_batch=None, opt_batch=None,
                 max_batch=None, workspace_gib: float = 2.0, trt=None) -> Path:
    """Parse ``onnx_path`` and write a serialized engine to ``engine_path``."""
    if trt is None:
        try:
            import tensorrt as trt
        except (ImportError, OSError) as e:
            raise TensorRTMissing("TensorRT's Python package is not installed (pip install tensorrt, "
                                  "from NVIDIA's index, on a machine with an NVIDIA GPU); "
                                  "--print-trtexec prints the equivalent trtexec command without "
                                  f"it [{e}]") from e
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    shapes = profile_shapes(onnx_input_shape(onnx_path), min_batch, opt_batch, max_batch)
    if fp16 and not has_fp16_flag(trt):
        from damo_jax.export import fp16 as fp16_pass
        fp16_onnx = engine_path.with_name(engine_path.stem + "_fp16.onnx")
        fp16_pass.convert_file(onnx_path, fp16_onnx)
        log.info("TensorRT %s has no BuilderFlag.FP16 (strong typing): building from the FP16 "
                 "ONNX %s", getattr(trt, "__version__", "?"), fp16_onnx)
        onnx_path = fp16_onnx
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)   # explicit batch is the only mode since TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16 and has_fp16_flag(trt):
        config.set_flag(trt.BuilderFlag.FP16)
    if shapes is not None:
        profile = builder.create_optimization_profile()
        profile.set_shape(INPUT_NAME, *shapes)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log)")
    try:
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        engine_path.write_bytes(bytes(serialized))
    except OSError as e:
        raise write_failed(engine_path, e) from e
    log.info("wrote %s (profile %s, fp16=%s)", engine_path, shapes, fp16)
    return engine_path


def build_parser(prog: str = "damo-jax export tensorrt"):
    from damo_jax.cli.common import Parser
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0],
               epilog="examples:\n" + __doc__.split("\n\n", 1)[1])
    p.add_argument("--onnx", required=True, help="ONNX file from export/to_onnx.py")
    p.add_argument("--output", required=True, help="engine file to write (.engine / .plan)")
    p.add_argument("--fp16", action="store_true", help="FP16 engine (see above for TensorRT 11)")
    p.add_argument("--min-batch", type=int, help="profile min batch (dynamic ONNX; default 1)")
    p.add_argument("--opt-batch", type=int, help="profile opt batch (dynamic ONNX; default 8)")
    p.add_argument("--max-batch", type=int, help="profile max batch (dynamic ONNX; default 32)")
    p.add_argument("--workspace", type=float, default=2.0, help="workspace pool limit in GiB")
    p.add_argument("--print-trtexec", action="store_true",
                   help="only print the equivalent trtexec command and exit")
    return p


def run(args):
    for name in ("min_batch", "opt_batch", "max_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.workspace <= 0:
        raise ConfigError(f"--workspace must be > 0 GiB, got {args.workspace}")
    if not Path(args.onnx).is_file():
        raise InputPathError(f"--onnx {args.onnx}: ONNX file not found")
    from damo_jax.cli.common import check_not_input, output_file
    check_not_input(args.output, "--output", {"--onnx": args.onnx})
    onnx_utils.check_readable(args.onnx)
    shapes = profile_shapes(onnx_input_shape(args.onnx), args.min_batch, args.opt_batch,
                            args.max_batch)
    command = trtexec_command(args.onnx, args.output, shapes, fp16=args.fp16,
                              workspace_gib=args.workspace)
    if args.print_trtexec:
        print(command)
        return command
    output_file(args.output, "--output")
    return build_engine(args.onnx, args.output, fp16=args.fp16, min_batch=args.min_batch,
                        opt_batch=args.opt_batch, max_batch=args.max_batch,
                        workspace_gib=args.workspace)


def main(argv=None, prog: str = "damo-jax export tensorrt"):
    """``damo-jax export tensorrt`` (also ``python -m damo_jax.export.to_tensorrt``)."""
    from damo_jax.cli.common import run_cli
    return run_cli(lambda a: run(build_parser(prog).parse_args(a)), argv)


if __name__ == "__main__":
    main()
