"""``damo-jax train``: train a DAMO-YOLO model (official recipe of SPEC §9.1) on 1..N devices.

examples:
  damo-jax train --config demo --workdir runs/demo
  damo-jax train --config s --data coco:/data/coco --workdir runs/s_coco
  damo-jax train --config ns --data yolo:/data/data.yaml --config.train.epochs=50 \\
      --config.train.finetune=damoyolo_ns.pth
  damo-jax train --config t --data yolo:/data/data.yaml --epochs 100 --batch-size 64
  damo-jax train --config s --runlocal --img-size 320      # a quick CPU check
  damo-jax train --config s --teacher m --teacher-weights damoyolo_m.pth   # distillation
  damo-jax train --config s --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0  # on each host

Every config key can be overridden with --config.KEY=VALUE (listed below with its default for
the chosen --config). An interrupted run resumes from its --workdir (Ctrl-C or SIGTERM: the last
finished step is saved first — interrupt again to stop without it — pending checkpoint writes
finish, one line names the checkpoint the same command resumes from); one run at a time per
--workdir (a second is refused, naming the first). Exit
codes: 0 done, 2 user error, 3 non-finite loss/gradients, 130 / 143 interrupted (SIGINT / SIGTERM).
Alias: python -m damo_jax.train.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from damo_jax.cli import common

PROG = "damo-jax train"


def add_arguments(p) -> None:
    p.add_argument("--config", default="s", help=f"config name ({common.config_names()}) or .py path")
    common.add_data(p, help_extra=" (sets config.data.train)")
    p.add_argument("--workdir", default=None, help="run folder (checkpoints, logs); default runs/<config>")
    common.add_img_size(p, "training and test size (sets data.image_size, test.image_size)")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="training epochs (sets config.train.epochs; the warm-up and the "
                        "no-augmentation tail must still fit)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="global batch over all devices (sets config.train.batch_size; the lr "
                        "scales with it: base_lr_per_img x batch)")
    p.add_argument("--teacher", default=None,
                   help="distillation teacher config name or .py path (sets config.distill.teacher)")
    p.add_argument("--teacher-weights", default=None,
                   help="teacher weights: official .pth, .npz, or a damo_jax run dir / checkpoint "
                        "(sets config.distill.teacher_weights)")
    p.add_argument("--runlocal", action="store_true", help="a quick CPU check: batch 8, 30 steps, "
                   "then one evaluation and one checkpoint (train.max_steps)")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() (also automatic when JAX_COORDINATOR_ADDRESS is set)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process: address of process 0's coordinator (sets JAX_COORDINATOR_ADDRESS; "
                        "implies --multihost; not needed on Cloud TPU / SLURM / Open MPI)")
    p.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="multi-process: number of processes (sets JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="multi-process: this process's index 0..N-1 (sets JAX_PROCESS_ID)")
    p.add_argument("--no-progress", action="store_true",
                   help="no tqdm bar: a log line per logged step with the losses, img/s, elapsed "
                        "time and ETA (the default when stderr is not a terminal, e.g. a log file)")


def build_parser(prog: str = PROG, add_help: bool = True):
    p = common.Parser(prog=prog, add_help=add_help, description=__doc__.split("\n")[0],
                      epilog=__doc__.split("\n", 2)[2])
    add_arguments(p)
    return p


def parse_args(argv=None, prog: str = PROG):
    """(config, args): ``--config`` loaded, ``--runlocal`` then the overrides applied, validated."""
    from damo_jax.config import (apply_overrides, load_config, runlocal,
                                 validate_config, validate_recipe)
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = common.split_overrides(argv)
    pre, _ = build_parser(prog, add_help=False).parse_known_args(rest)
    cfg = load_config(pre.config)
    parser = build_parser(prog)
    parser.epilog += (f"\noverridable config keys of --config {pre.config} (with their defaults):\n"
                      + config_key_listing(cfg))
    args = parser.parse_args(rest)
    if args.runlocal:
        runlocal(cfg)
    apply_overrides(cfg, overrides)
    from damo_jax.config import override_key
    from damo_jax.errors import ConfigError
    from_data = [f"--config.{override_key(o)}" for o in overrides
                 if override_key(o) in ("model.class_names", "model.head.num_classes")]
    if from_data:                       # they were replaced by the data's without a word
        raise ConfigError(f"{', '.join(from_data)}: a training run takes the class count and names "
                          f"from its training data (the category list of the annotations / "
                          f"data.yaml names); change them there")
    common.refuse_flag_and_override(
        overrides, ("--img-size", args.img_size, ("data.image_size", "test.image_size")),
        ("--data", args.data, ("data.train",)), ("--teacher", args.teacher, ("distill.teacher",)),
        ("--teacher-weights", args.teacher_weights, ("distill.teacher_weights",)),
        ("--epochs", args.epochs, ("train.epochs",)),
        ("--batch-size", args.batch_size, ("train.batch_size",)))
    for flag, key, value in (("--epochs", "epochs", args.epochs),
                             ("--batch-size", "batch_size", args.batch_size)):
        if value is not None:
            cfg.train[key] = value          # validate_config below: an integer >= 1
    size = common.img_size(args.img_size)
    if size:
        apply_overrides(cfg, common.override("data.image_size", size)
                        + common.override("test.image_size", size))
    if args.data:
        cfg.data.train = args.data
    if args.teacher is not None:
        cfg.distill.teacher = args.teacher
    if args.teacher_weights is not None:
        cfg.distill.teacher_weights = args.teacher_weights
    where = f"--config {args.config}"
    validate_recipe(validate_config(cfg, where=where), where=where)
    check_process_flags(args)
    if args.workdir is None:
        args.workdir = str(Path("runs") / Path(str(args.config)).stem)
    return cfg, args


def config_key_listing(cfg) -> str:
    """``--help``'s list of config keys: each with its default and its explanation
    (:data:`damo_jax.config.KEY_HELP`; a group's explanation once, under its first key), grouped
    by section."""
    from damo_jax.config import flat_items, key_help
    lines, section, said = [], None, None
    for key, value in flat_items(cfg):
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            lines.append(f" {section}:")
        lines.append(f"  --config.{key}={value!r}")
        explanation = key_help(key)
        if explanation and explanation != said:
            lines.append(f"      {explanation}")
        said = explanation
    return "\n".join(lines)


def check_process_flags(args) -> None:
    """--coordinator / --num-processes / --process-id: all three or none, consistent."""
    from damo_jax.errors import UserError
    given = [f for f, v in (("--coordinator", args.coordinator), ("--num-processes", args.num_processes),
                            ("--process-id", args.process_id)) if v is not None]
    if not given:
        return
    if len(given) != 3:
        missing = sorted({"--coordinator", "--num-processes", "--process-id"} - set(given))
        raise UserError(f"{', '.join(given)} given without {', '.join(missing)}: a multi-process run "
                        f"needs all three (or JAX's cluster auto-detection and none)")
    host, _, port = str(args.coordinator).rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator {args.coordinator!r}: expected HOST:PORT (e.g. 10.0.0.1:1234)")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise UserError(f"--num-processes {args.num_processes} --process-id {args.process_id}: need "
                        f"N >= 1 and 0 <= I < N")
    args.multihost = True


def process_env(args, env) -> None:
    """The flags as JAX's environment variables (read by damo_jax.distributed.initialize)."""
    if args.coordinator is not None:
        env.update(JAX_COORDINATOR_ADDRESS=str(args.coordinator), JAX_NUM_PROCESSES=str(args.num_processes),
                   JAX_PROCESS_ID=str(args.process_id))


def check_inputs(cfg, args) -> None:
    """The paths a run reads and the folder it writes, checked before JAX starts (InputPathError
    naming the flag / key)."""
    common.check_data_spec(cfg.data.train, flag="--data" if args.data else "config data.train")
    if cfg.data.get("val"):
        common.check_data_spec(cfg.data.val, flag="config data.val")
    if cfg.train.get("finetune") and not Path(cfg.train.finetune).is_file():
        from damo_jax.errors import InputPathError
        folder = Path(cfg.train.finetune).is_dir()
        raise InputPathError(
            f"--config.train.finetune={cfg.train.finetune}: "
            + ("is a folder; finetune takes a weights file (.pth / .npz); to continue a damo_jax run, "
               "pass its folder as --workdir" if folder else "file not found"))
    common.output_dir(args.workdir, "--workdir")
    from damo_jax.train.checkpoint import CKPT_SUBDIR
    ckdir = Path(args.workdir) / CKPT_SUBDIR
    if ckdir.is_dir() and not os.access(ckdir, os.W_OK | os.X_OK):   # found at the first save
        from damo_jax.errors import InputPathError                    # otherwise: an epoch later
        raise InputPathError(f"--workdir {args.workdir}: its checkpoint folder {ckdir} is not "
                             f"writable (fix its permissions or choose another --workdir)")


def run(cfg, args) -> int:
    from damo_jax import runtime
    from damo_jax.train import loop
    from damo_jax.train.checkpoint import CheckpointWriteError
    check_inputs(cfg, args)
    runtime.tune_cpu_runtime()        # CPU only: allocator + XLA:CPU vector width (before JAX starts)
    process_env(args, os.environ)
    loop.maybe_init_distributed(args.multihost)
    loop.enable_compile_cache()
    previous = {}
    loop.INTERRUPT["signum"] = None
    previous_hook, sys.unraisablehook = sys.unraisablehook, _quiet_lost_interrupts(sys.unraisablehook)
    for signum in (signal.SIGINT, signal.SIGTERM):     # SIGTERM (a scheduler's stop) as Ctrl-C
        try:
            previous[signum] = signal.signal(signum, _raise_interrupted)
        except ValueError:              # not the main thread (an embedding application): untouched
            break
    try:
        loop.train(cfg, args.workdir, progress=not args.no_progress and _is_terminal(sys.stderr))
    except loop.NonFiniteError as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        return loop.EXIT_NONFINITE
    except CheckpointWriteError as err:
        # Orbax's writer threads can be left waiting forever after a failed write: the
        # interpreter's exit would join them (a run that never ends on a paid machine)
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(2)
    except KeyboardInterrupt as err:    # the loop's clean-up ran: pending checkpoint writes finished
        signum = getattr(err, "signum", signal.SIGINT)
        common.finish_running_computations()
        print(f"interrupted ({signal.Signals(signum).name}): {resume_note(args.workdir)}",
              file=sys.stderr, flush=True)
        return 128 + signum
    finally:
        sys.unraisablehook = previous_hook
        for signum, handler in previous.items():
            if handler is not None:     # None: a non-Python handler was there; keep ours
                signal.signal(signum, handler)
    return 0


def _is_terminal(stream) -> bool:
    """A progress bar redrawn into a log file grew it by ~10 MB a day (and escape codes)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _quiet_lost_interrupts(default):
    """An ``sys.unraisablehook`` that leaves out the "Exception ignored ... KeyboardInterrupt"
    traceback of an interrupt raised inside a callback (the loop raises it again after the step)."""
    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        default(unraisable)
    return hook


def _raise_interrupted(signum, _frame):
    """Raise the interrupt, and note it: raised inside a garbage-collection callback it is lost
    (the run went on to the end); the loop raises a noted one again after the step."""
    from damo_jax.train import loop
    loop.INTERRUPT["signum"] = signum
    raise loop.Interrupted(signum)


def resume_note(workdir) -> str:
    """What the same command will do next in ``workdir``: resume from its latest complete
    checkpoint, or start again."""
    from damo_jax.train.checkpoint import CKPT_SUBDIR, complete_steps
    steps = complete_steps(Path(workdir) / CKPT_SUBDIR)
    if steps:
        return (f"the same command resumes from checkpoint {steps[-1]} in "
                f"{Path(workdir) / CKPT_SUBDIR}")
    return "no checkpoint was written yet; the same command starts the run again"


def main(argv=None, prog: str = PROG) -> int:
    return common.run_cli(lambda a: run(*parse_args(a, prog)), argv)
