"""The ``damo-jax`` command: one entry point, one subcommand per job.

    damo-jax train    --config demo --workdir runs/demo
    damo-jax eval     --checkpoint runs/demo --data demo            (also --onnx / --openvino files)
    damo-jax predict  --checkpoint runs/demo --source photo.jpg
    damo-jax export   onnx|openvino|tensorrt ...
    damo-jax show     --data demo --out samples.png                  (augmented training samples)
    damo-jax info     --config s                                     (params, GFLOPs)
    damo-jax info     --weights damoyolo_S.pth                       (which model it holds)

``python -m damo_jax ...`` is the same command. Each subcommand lives in one module with
``build_parser(prog)`` / ``run(args, ...)`` / ``main(argv, prog)``; shared flags, logging and the
error policy are :mod:`damo_jax.cli.common`. To add a subcommand or an export target, add a row to
:data:`COMMANDS` / :data:`damo_jax.cli.export.EXPORT_TARGETS`.
"""
from __future__ import annotations

import sys

# name -> (module with main(argv, prog), one-line description)
COMMANDS = {
    "train": ("damo_jax.cli.train", "train a model (official recipe; resumable; --config.KEY=VALUE)"),
    "eval": ("damo_jax.cli.eval", "COCO mAP of a checkpoint, official weights, or ONNX/OpenVINO file"),
    "predict": ("damo_jax.cli.predict", "detect objects in images or a video, draw them, write detections.json"),
    "export": ("damo_jax.cli.export", "export to onnx | openvino | tensorrt | int8"),
    "show": ("damo_jax.data_pipelines.show", "draw augmented training samples with their boxes"),
    "info": ("damo_jax.models.__main__", "model summary: parameters and GFLOPs; which model a .pth holds"),
}


def usage() -> str:
    rows = "\n".join(f"  {name:9s} {desc}" for name, (_, desc) in COMMANDS.items())
    return (f"usage: damo-jax COMMAND [options]   (damo-jax COMMAND --help for options and examples)"
            f"\n\ncommands:\n{rows}\n\n" + __doc__.split("\n\n")[1] + "\n\n"
            "user errors print one 'error: ...' line and exit with code 2; --debug (or "
            "DAMO_JAX_DEBUG=1) shows the traceback.\n")


def main(argv=None):
    """Dispatch ``damo-jax COMMAND ARGS`` to the command module's ``main``."""
    from damo_jax.cli.common import dispatch
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-V"], ["--version"]):
        import damo_jax
        print(f"damo-jax {damo_jax.__version__}")
        return 0
    return dispatch(COMMANDS, argv, "damo-jax", usage)


def console_main() -> int:
    """``[project.scripts] damo-jax``: exit status of the command (0, 2 user error, 3 non-finite)."""
    return _exit_code(main())


def _exit_code(result) -> int:
    return result if isinstance(result, int) else 0


def train_console() -> int:
    """Old script name ``damo-train`` (= ``damo-jax train``)."""
    return _exit_code(main(["train"] + sys.argv[1:]))


def eval_console() -> int:
    """Old script name ``damo-eval`` (= ``damo-jax eval``)."""
    return _exit_code(main(["eval"] + sys.argv[1:]))


def predict_console() -> int:
    """Old script name ``damo-predict`` (= ``damo-jax predict``)."""
    return _exit_code(main(["predict"] + sys.argv[1:]))
