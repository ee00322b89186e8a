"""What every ``damo-jax`` command shares: parser, error policy, logging, model-source flags,
``--img-size``, ``--config.KEY=VALUE`` overrides and the ``--data`` check.

Error policy (:func:`run_cli`): Ctrl-C prints ``interrupted`` and exits with 130; a user error
(:func:`damo_jax.errors.user_error_types`: bad config name / key / value, missing path or
unwritable output, impossible size, unsafe or corrupt checkpoint, dataset error) prints ONE line
``error: <message>`` on stderr and exits with code 2; ``--debug`` or ``DAMO_JAX_DEBUG=1`` re-raises
it with its traceback. Command-line syntax errors (argparse) get the same one line and code. Anything else is an internal error and keeps its traceback.

Extension points for new flags: every command module (``damo_jax.cli.<command>``) has
``add_arguments(parser)`` and ``run(args, overrides)``; add flags there and read them in ``run``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from damo_jax.errors import (EXIT_USER_ERROR, ConfigError, InputPathError, debug_enabled, one_line,
                             refuse_url, user_error_types)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_INTERRUPTED = 128 + 2        # SIGINT, as a shell reports it
QUIET_LOGGERS = ("absl", "onnx_ir", "jax._src.xla_bridge")


class UserExit(SystemExit):
    """SystemExit with code 2 whose ``str()`` is the one-line message (already printed)."""

    def __init__(self, message: str):
        super().__init__(EXIT_USER_ERROR)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


def report_user_error(message: str) -> UserExit:
    """Print ``error: <message>`` (one line) on stderr; return the exception to raise."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return UserExit(message)


class Parser(argparse.ArgumentParser):
    """argparse with the error policy: a usage mistake is one ``error:`` line + exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show tracebacks of user errors (also DAMO_JAX_DEBUG=1)")

    def error(self, message):  # noqa: D401 - argparse hook
        raise report_user_error(f"{self.prog}: {message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, and a value given as an empty / blank string refused (``--out ""``,
        ``--data $UNSET``): it read as "not given" (``eval --out ""`` wrote no reports, exit 0)
        or as the current folder."""
        ns, rest = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(ns, action.dest, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value != action.default and any(isinstance(v, str) and not v.strip() for v in values):
                name = action.option_strings[0] if action.option_strings else action.dest
                self.error(f"{name}: an empty value (an unset shell variable?)")
        return ns, rest


def setup_logging(level: int = logging.INFO) -> None:
    """The one logging set-up of every command: our INFO lines, third-party chatter only from
    WARNING/ERROR."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, datefmt="%H:%M:%S")
    logging.getLogger("damo_jax").setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def run_cli(fn: Callable, argv: Sequence[str] | None = None):
    """Run ``fn(argv)`` under the error policy (see the module docstring); returns its result.
    A command that fails removes the output folders it created that are still empty."""
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    del _CREATED_FOLDERS[:]
    try:
        return _with_error_policy(fn, argv)
    except BaseException:
        _remove_empty_created_folders()
        raise
    finally:
        del _CREATED_FOLDERS[:]


def _with_error_policy(fn: Callable, argv: list[str]):
    try:
        return fn(argv)
    except user_error_types() as err:
        if debug_enabled(argv):
            raise
        raise report_user_error(one_line(err)) from None
    except KeyboardInterrupt:           # Ctrl-C: no traceback (train handles it itself: resume note)
        if debug_enabled(argv):
            raise
        print("interrupted", file=sys.stderr, flush=True)
        finish_running_computations()
        raise SystemExit(EXIT_INTERRUPTED) from None


#: folders :func:`_make_folder` created during the current command (parents first)
_CREATED_FOLDERS: list[Path] = []


def _remove_empty_created_folders() -> None:
    for folder in reversed(_CREATED_FOLDERS):
        try:
            folder.rmdir()                  # only if empty
        except OSError:
            pass


def finish_running_computations() -> None:
    """Let dispatched JAX computations finish before the interpreter shuts down (tearing the
    runtime down under a running computation can crash the process)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return
    try:
        for array in jax.live_arrays():
            array.block_until_ready()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


def command_parser(prog: str, doc: str, add_arguments: Callable) -> Parser:
    """The parser of a command module: first line of ``doc`` as description, the rest (examples)
    as epilog, options from ``add_arguments(parser)``."""
    first, _, rest = doc.partition("\n")
    p = Parser(prog=prog, description=first, epilog=rest.strip("\n"))
    add_arguments(p)
    return p


OVERRIDES_HELP = ("Config overrides: --config.KEY=VALUE sets any key of the model's config, e.g. "
                  "--config.test.conf_thre=0.05 (a flag and an override of the same setting are "
                  "refused); `damo-jax train --help` lists every key with its default.")


def run_command(build_parser: Callable, run: Callable, argv, prog: str):
    """``run(build_parser(prog).parse_args(rest), overrides)`` under the error policy, with the
    ``--config.KEY=VALUE`` overrides split off ``argv``."""
    def go(argv):
        rest, overrides = split_overrides(argv)
        parser = build_parser(prog)
        parser.epilog = "\n\n".join(filter(None, ((parser.epilog or "").rstrip("\n"), OVERRIDES_HELP)))
        return run(parser.parse_args(rest), overrides)
    return run_cli(go, argv)


def dispatch(table: dict, argv, prog: str, usage: Callable, what: str = "command"):
    """``argv[0]`` names a row of ``table`` (name -> (module, description)); its module's
    ``main(argv[1:], prog=f"{prog} {name}")`` runs. No name / --help: print ``usage()``."""
    import importlib
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in table:
        raise report_user_error(f"{prog}: unknown {what} {name!r} ({what}s: {', '.join(table)}; "
                                f"see {prog} --help)")
    module = importlib.import_module(table[name][0])
    return module.main(rest, prog=f"{prog} {name}")


# ------------------------------------------------------------------------- config overrides
def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(other arguments, ``--config.KEY=VALUE`` overrides) of a command line."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config.") and not arg.startswith("--config.py"):
            if "=" not in arg:
                raise ConfigError(f"{arg}: overrides look like --config.KEY=VALUE "
                                  f"(e.g. --config.train.epochs=3)")
            overrides.append(arg)
        else:
            rest.append(arg)
    return rest, overrides


def load_cli_config(name_or_path, overrides: Sequence[str] = ()):
    """Config of ``--config`` with the overrides applied and validated (ConfigError names the key)."""
    from damo_jax.config import apply_overrides, load_config, validate_config
    cfg = load_config(name_or_path)
    apply_overrides(cfg, overrides)
    return validate_config(cfg, where=f"--config {name_or_path}")


def override(key: str, value) -> list[str]:
    """A flag's value as an override string (``[]`` when the flag was not given)."""
    if value is None:
        return []
    text = repr(tuple(value)) if isinstance(value, (list, tuple)) else str(value)
    return [f"{key}={text}"]


def refuse_flag_and_override(overrides: Sequence[str], *pairs) -> None:
    """ConfigError when a flag and a ``--config.KEY=V`` override both set one setting.

    ``pairs``: ``(flag, value, keys)`` with ``value`` None when the flag was not given and ``keys``
    the config keys the flag sets. Without this one of the two would win without a word.
    """
    from damo_jax.config import override_key
    given = {override_key(o) for o in overrides}
    for flag, value, keys in pairs:
        both = [k for k in keys if k in given] if value is not None else []
        if both:
            raise ConfigError(f"{flag} and --config.{both[0]} both set {both[0]}: give one of them")


# ------------------------------------------------------------------------- shared flags
MODEL_SOURCES = {
    "checkpoint": "training run directory (its EMA weights, config and class names)",
    "weights": "official .pth or converted .npz (needs --config)",
    "onnx": "exported raw-output ONNX file (config from its export metadata, or --config)",
    "openvino": "exported OpenVINO IR .xml (config from its export metadata, or --config)",
}
EXPORTED_SOURCES = ("onnx", "openvino")


def config_names() -> str:
    """The bundled config names for a --help text: "demo demo_ns ... t"."""
    from damo_jax.config import known_config_names
    return " ".join(known_config_names())


def add_model_source(p: argparse.ArgumentParser, sources=tuple(MODEL_SOURCES), *,
                     config_help: str | None = None, run_config_for_exports: bool = False) -> None:
    """``--config`` plus the mutually exclusive model-source flags ``sources``.

    ``run_config_for_exports`` (eval, predict): ``--checkpoint RUN`` may also come beside
    ``--onnx`` / ``--openvino``; it then gives only the run's config and class names
    (:func:`load_model_from_args`)."""
    p.add_argument("--config", help=config_help or f"model config name ({config_names()}) or "
                   ".py path; --config.KEY=VALUE overrides any key")
    group = p.add_mutually_exclusive_group()
    for name in sources:
        if name == "checkpoint" and run_config_for_exports:
            p.add_argument("--checkpoint", help=MODEL_SOURCES["checkpoint"] + "; with --onnx / "
                           "--openvino: only the config and class names come from it")
        else:
            group.add_argument(f"--{name}", help=MODEL_SOURCES[name])


def model_source(args) -> dict:
    """The model-source flags that were given, as ``load_model`` keyword arguments."""
    return {k: getattr(args, k) for k in MODEL_SOURCES if getattr(args, k, None) is not None}


def load_model_from_args(args, overrides=(), **kwargs):
    """The ``LoadedModel`` of the model flags of eval / predict: ``--checkpoint RUN`` beside an
    exported file (``--onnx`` / ``--openvino``) gives only that file's config and class names."""
    from damo_jax.inference.loading import load_model
    source, config = model_source(args), args.config
    if "checkpoint" in source and any(k in source for k in EXPORTED_SOURCES):
        if config is not None:
            raise ConfigError("--checkpoint with --onnx/--openvino gives the config: drop --config "
                              "(or drop --checkpoint and keep --config)")
        config = source.pop("checkpoint")
    return load_model(config, overrides=overrides, **source, **kwargs)


def add_img_size(p: argparse.ArgumentParser, what: str = "network input size") -> None:
    """``--img-size N`` (square) or ``--img-size H W``: the one size convention of every command."""
    p.add_argument("--img-size", "--imgsz", nargs="+", type=int, metavar="N", dest="img_size",
                   help=f"{what}: one value (square) or H W, multiples of 32")


def img_size(values) -> tuple[int, int] | None:
    """(H, W) of ``--img-size`` values (None when absent); ConfigError unless 1-2 multiples of 32."""
    from damo_jax.ops.boxes import check_image_size
    if not values:
        return None
    if len(values) > 2:
        raise ConfigError(f"--img-size takes one or two integers (H W), got {len(values)}")
    return check_image_size(values[0] if len(values) == 1 else tuple(values), "--img-size")


def add_data(p: argparse.ArgumentParser, default=None, help_extra: str = "") -> None:
    p.add_argument("--data", default=default,
                   help="dataset spec: demo | coco:/dir | yolo:/data.yaml | voc:/dir | tfds:coco/2017"
                   + help_extra)


def _make_folder(folder: Path, where: str, name: str) -> None:
    """Create ``folder`` (parents too) and check it is writable, else an InputPathError
    ``"<where>: cannot create <name> (<why>)"``."""
    import os
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _CREATED_FOLDERS.extend(p for p in missing if p.is_dir())
    except FileExistsError:
        raise InputPathError(f"{where}: cannot create {name} (a file of that name exists)") from None
    except OSError as e:
        raise InputPathError(f"{where}: cannot create {name} ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputPathError(f"{where}: cannot write into {name} (permission denied)")


def output_dir(path, flag: str) -> Path:
    """Create the output folder ``path`` (parents too) and check that it is writable, before any
    work is done; an :class:`InputPathError` naming ``flag`` when it cannot be, a ConfigError for
    a URL (an empty value never gets here: :class:`Parser` refuses it)."""
    refuse_url(path, flag)
    out = Path(path)
    _make_folder(out, f"{flag} {path}", "this folder")
    return out


def output_file(path, flag: str, *, suffix: str | None = None, inputs=None) -> Path:
    """:func:`output_dir` for the folder of the output file ``path``; also rejects a folder, a name
    without ``suffix`` (e.g. ``".onnx"``) and a path that is one of the command's ``inputs``
    (``{flag: path or None}``): an export never overwrites what it reads."""
    refuse_url(path, flag)
    out = Path(path)
    if out.is_dir():
        raise InputPathError(f"{flag} {path}: is a folder, expected a file name")
    if suffix and out.suffix.lower() != suffix:
        raise ConfigError(f"{flag} {path}: expected a {suffix} file name")
    check_not_input(out, flag, inputs)
    _make_folder(out.parent, f"{flag} {path}", f"its folder {out.parent}")
    return out


def check_not_input(path, flag: str, inputs=None) -> None:
    """ConfigError when the output ``path`` names one of the command's ``inputs`` (``{flag: path
    or None}``): a command never overwrites what it reads."""
    for in_flag, in_path in (inputs or {}).items():
        if in_path and same_path(Path(path), Path(in_path)):
            raise ConfigError(f"{flag} {path}: is the {in_flag} file; the output would overwrite "
                              f"it, choose another name")


def same_path(a, b) -> bool:
    """``a`` and ``b`` name the same file (symlinks, hard links and ``..`` resolved)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _is_drive_letter(kind: str) -> bool:
    """``C`` of ``C:\\data\\x.json``: a one-letter prefix is a Windows drive, not a format."""
    return len(kind) == 1 and kind.isalpha()


def check_data_spec(spec: str, flag: str = "--data") -> str:
    """A ``kind:/path[?options]`` (or bare .json/.yaml) spec whose path exists: InputPathError when
    it does not (the ``?key=value`` reader options are checked by the library, which lists the
    known ones), ConfigError for an unknown format prefix."""
    data_spec_path(spec, flag)
    return spec


def data_spec_path(spec: str, flag: str = "--data") -> Path | None:
    """The file or folder a dataset spec reads (None for ``demo`` / ``tfds:``), checked as
    :func:`check_data_spec` says."""
    from damo_jax.data_pipelines import SPEC_KINDS, split_spec_options
    if not spec or spec.startswith(("demo", "tfds:")):
        return None
    kind, sep, rest = spec.partition(":")
    if sep and kind not in SPEC_KINDS and not _is_drive_letter(kind) and not Path(spec).exists():
        raise ConfigError(f"{flag} {spec}: unknown dataset format {kind!r} (known: {', '.join(SPEC_KINDS)})")
    if not (sep and kind in SPEC_KINDS):
        kind, rest = "", spec
    head = rest.split("?", 1)[0]
    if not kind and not Path(spec).exists():
        kind = "coco" if head.endswith(".json") else "yolo" if head.endswith((".yaml", ".yml")) else ""
    if not kind and not spec.endswith((".json", ".yaml", ".yml")):
        if Path(spec).exists():
            raise ConfigError(f"{flag} {spec}: say which format the folder is in, e.g. "
                              f"{flag} coco:{spec} | yolo:{spec}/data.yaml | voc:{spec}")
        raise InputPathError(f"{flag} {spec}: no such file or folder (dataset specs: demo, "
                             f"coco:/dir, yolo:/data.yaml, voc:/dir, tfds:NAME)")
    path = split_spec_options(kind, rest, spec)[0] if kind else rest
    if not Path(path).exists():
        raise InputPathError(f"{flag} {spec}: {path} does not exist")
    return Path(path)


def check_not_in_data(path, flag: str, spec: str | None) -> None:
    """ConfigError when the output file ``path`` exists inside the dataset's folder (or is its
    file): a report never replaces annotations, labels or images it was scored against. New files
    there are fine."""
    try:
        data = data_spec_path(spec) if spec else None
    except (ConfigError, InputPathError):
        return                                   # the dataset's own error comes when it is opened
    out = Path(path)
    if data is None or not out.exists():
        return
    root = data if data.is_dir() else data.parent
    if same_path(out, data) or root.resolve() in out.resolve().parents:
        raise ConfigError(f"{flag} {path}: an existing file of the dataset {spec}; the output "
                          f"would overwrite it, choose another name")


#: the NMS options whose effect an --end2end file restricts: (name, flag, ``test`` key)
NMS_OPTIONS = (("conf", "--conf", "conf_thre"), ("iou", "--iou", "iou_thre"),
               ("max_dets", "--max-dets", "max_dets"), ("pre_nms_topk", "--pre-nms-topk", "pre_nms_topk"))


def check_end2end_flags(backend, args, overrides, test_cfg) -> None:
    """ConfigError (one error line, exit 2) when an NMS flag, or its ``--config.test.KEY``
    override, was given that cannot act on ``backend``'s ``--end2end`` file (its NMS ran inside
    the graph): :func:`damo_jax.inference.pipeline.check_end2end_options`. Nothing for a raw file;
    the config's own thresholds are never an error (the file's apply)."""
    from damo_jax.config import override_key
    from damo_jax.inference.pipeline import check_end2end_options
    overridden = {override_key(o) for o in overrides}
    options, flags = {}, {}
    for name, flag, key in NMS_OPTIONS:
        value = getattr(args, name, None)
        if value is None and f"test.{key}" in overridden:
            value, flag = test_cfg[key], f"--config.test.{key}"
        options[name], flags[name] = value, flag
    check_end2end_options(backend, flags=flags, **options)
