"""ONE way to load a model for inference: :func:`load_model`.

    m = load_model(checkpoint="runs/demo")                  # training run dir: EMA weights + config
    m = load_model("s", weights="damoyolo_s.pth")           # official .pth / converted .npz
    m = load_model("s", onnx="s.onnx")                      # exported files (config: names, thresholds)
    m = load_model("s", openvino="s.xml")
    m.backend(images)  # (B,H,W,3) float32 RGB 0-255 NHWC -> (scores (B,A,C), boxes (B,A,4))

Used by ``damo-jax eval|predict|export``, :class:`damo_jax.inference.detector.Detector` and the
export scripts. Every user mistake (missing file, missing ``--config``, weights that do not fit
the config, a class-count mismatch) raises a :mod:`damo_jax.errors` user error naming the flag.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from damo_jax.errors import ConfigError, InputPathError

log = logging.getLogger("damo_jax.inference.loading")
SOURCES = ("checkpoint", "weights", "onnx", "openvino")


@dataclasses.dataclass
class LoadedModel:
    """A model ready for the inference path (:mod:`damo_jax.inference.pipeline`)."""
    cfg: object                  # ConfigDict (test section: thresholds, size)
    class_names: tuple
    backend: Callable            # forward(images NHWC float32) -> (scores, boxes)
    kind: str                    # "jax" | "onnx" | "openvino"
    source: str                  # where the weights came from (logs, export metadata)
    model: object = None         # Flax module (jax kind only)
    variables: dict | None = None

    @property
    def input_hw(self):
        """Fixed (H, W) of an exported file, else None (any multiple of 32)."""
        return getattr(self.backend, "input_hw", None)


def _existing(flag: str, path, *, directory: bool = False) -> Path:
    p = Path(path)
    ok = p.is_dir() if directory else p.is_file()
    if not ok:
        if not directory and p.is_dir():
            raise InputPathError(f"{flag} {path}: is a folder, expected a file"
                                 + ("; a training run directory goes to --checkpoint"
                                    if (p / "checkpoints").is_dir() else ""))
        kind = "directory" if directory else "file"
        hint = " (a training run directory, e.g. runs/demo)" if directory else ""
        raise InputPathError(f"{flag} {path}: {kind} not found{hint}")
    return p


def _flag(name: str) -> str:
    return f"--{name}"


def load_model(config=None, *, checkpoint=None, weights=None, onnx=None, openvino=None,
               overrides: Sequence[str] = (), fuse: bool = True, export: bool = False,
               random_init: bool = False, seed: int = 0, threads: int | None = None) -> LoadedModel:
    """Load one model from exactly one source.

    ``config``: name / path / ConfigDict, or a training-run directory (its stored config; lets an
    exported file be scored with the run's class names and thresholds; alone, a run directory
    loads its checkpoint, as ``checkpoint=``). Needed with ``weights``
    and ``random_init``; ignored (logged) with ``checkpoint``; optional with ``onnx`` /
    ``openvino``: without it the file's export metadata gives the model, class names, size and
    thresholds.
    ``overrides``: ``key.sub=value`` strings applied to the config (``--config.KEY=VALUE``).
    ``fuse``: fold RepConvs and BNs (``models.reparam.fuse`` + ``build_model(cfg, deploy=True)``).
    ``export``: trace-friendly config (``model.depthwise_impl = "conv"``) for the exporters.
    ``random_init``: no weights, official initialisation from ``seed`` (latency / format tests).
    """
    given = {k: v for k, v in dict(checkpoint=checkpoint, weights=weights, onnx=onnx,
                                   openvino=openvino).items() if v is not None}
    if len(given) > 1:
        raise ConfigError(f"give only one model source, got {', '.join(map(_flag, given))}")
    if not given and not random_init and isinstance(config, (str, os.PathLike)) and Path(config).is_dir():
        given, checkpoint, config = {"checkpoint": config}, config, None   # load_model(RUN_DIR)
        flag = "--config"                              # what the user gave: errors name it
    else:
        flag = "--checkpoint"
    if not given and not random_init:
        raise ConfigError("no model given: use --checkpoint RUN_DIR (checkpoint=), or --config NAME "
                          "with --weights FILE.pth|.npz (weights=), --onnx FILE.onnx (onnx=) or "
                          "--openvino FILE.xml (openvino=)")
    kind, path = next(iter(given.items())) if given else ("random", None)
    if kind == "checkpoint":
        cfg, variables, class_names, step = _checkpoint(checkpoint, config, flag)
        source = f"{flag} {checkpoint} (its stored config)"
    else:
        source = (f"--config {config}" if isinstance(config, (str, os.PathLike))
                  else f"config {getattr(getattr(config, 'model', None), 'name', '?')!r}")
        if config is None and kind in ("onnx", "openvino"):
            cfg, class_names = _config_from_export(kind, _existing(_flag(kind), path))
            source = f"{_flag(kind)} {path} (its export metadata)"
        elif config is None:
            what = f"{_flag(kind)} {path}" if path else "without weights"
            raise ConfigError(f"{what}: --config is needed (the model's config name or file, "
                              f"e.g. --config s)")
        else:
            cfg, class_names = _config(config)
    cfg = _prepare(cfg, overrides, export,
                   where=source + (" with the --config.KEY overrides" if overrides else ""))
    from damo_jax.config import override_key
    if any(override_key(o) == "model.class_names" for o in overrides):
        class_names = tuple(cfg.model.class_names)      # an explicit override beats stored names
    if kind in ("onnx", "openvino"):
        return _exported(kind, _existing(_flag(kind), path), cfg, class_names, threads,
                         names_from="its export metadata" if config is None else source)
    if kind == "weights":
        variables = _weights(Path(path), cfg)
    elif kind == "random":
        variables = _random_variables(cfg, seed)
    if len(class_names) != int(cfg.model.head.num_classes):
        raise ConfigError(f"{path}: {len(class_names)} class names but the model has "
                          f"model.head.num_classes = {cfg.model.head.num_classes}")
    from damo_jax.inference.pipeline import JaxBackend
    from damo_jax.models import build_model
    if fuse:
        from damo_jax.models.reparam import fuse as fuse_variables
        variables = fuse_variables(variables, cfg, fuse_bn=True)
    model = build_model(cfg, deploy=True if fuse else _graph_of(variables))
    source = (f"{path} (step {step})" if kind == "checkpoint" else str(path) if path
              else f"random-init(seed={seed})")      # the export metadata's "weights"
    return LoadedModel(cfg=cfg, class_names=tuple(class_names), backend=JaxBackend(model, variables),
                       kind="jax", source=source, model=model, variables=variables)


def _config(config):
    """(cfg, class names) of a config name / path / ConfigDict or of a training-run directory."""
    from damo_jax.config import load_config
    if isinstance(config, (str, os.PathLike)) and Path(config).is_dir():
        from damo_jax.train.checkpoint import config_from_json, load_meta
        meta = _run_dir_call(load_meta, config)
        cfg = config_from_json(meta["config"])
        return cfg, tuple(meta.get("class_names") or cfg.model.class_names)
    cfg = load_config(config)
    return cfg, tuple(cfg.model.class_names)


def _config_from_export(kind: str, path: Path):
    """(cfg, class names) from the metadata ``export/to_onnx.py`` / ``to_openvino.py`` write into
    the file: the bundled config of its ``model`` with its class names, size and thresholds.
    ConfigError asking for ``--config`` when the file has no such metadata."""
    import json

    from damo_jax.config import MODEL_NAMES, load_config
    from damo_jax.inference import backends
    backends.check_file(path, backends.SUFFIXES[kind], _flag(kind))
    if kind == "onnx":
        from damo_jax.export import onnx_utils
        onnx_utils.check_readable(path)
        model = None
    else:                  # an unreadable IR is reported as such (OpenVINO's reason), not as "no metadata"
        _, model = backends.read_openvino_model(path, _flag(kind))
    meta = backends._ov_metadata(model, path)
    name = meta.get("model")
    if not name or "class_names" not in meta:
        backends._check_outputs(path, _output_names(model, path), _flag(kind),   # an official
                                end2end_ok=True)                                    # file: say so
        raise ConfigError(f"{_flag(kind)} {path}: the file holds no damo_jax export metadata "
                          f"(model, class names); give --config (the model's config name or "
                          f"file, or the training run directory)")
    try:
        names = tuple(json.loads(meta["class_names"]))
        # a model variant of the user's own config: an exported file needs no architecture, only
        # what its metadata gives (classes, size, thresholds); a bundled config carries them
        cfg = load_config(name if name in MODEL_NAMES else "t")
        with cfg.unlocked():
            cfg.model.name = str(name)
            cfg.model.class_names = names
            cfg.model.head.num_classes = len(names)
            for key in ("conf_thre", "iou_thre"):
                if key in meta:
                    cfg.test[key] = float(meta[key])
            for key in ("max_dets", "pre_nms_topk"):      # the run's test settings (older files:
                if key in meta:                            # the bundled config's)
                    cfg.test[key] = int(meta[key])
            if "image_size" in meta:
                cfg.test.image_size = tuple(int(v) for v in json.loads(meta["image_size"]))
            if meta.get("end2end"):       # an --end2end file: the thresholds and K of its NMS
                e2e = backends._end2end_from_metadata(meta["end2end"])
                for key, test_key in (("conf_thre", "conf_thre"), ("iou_thre", "iou_thre"),
                                      ("topk", "max_dets")):
                    if key in e2e:
                        cfg.test[test_key] = e2e[key]
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{_flag(kind)} {path}: unreadable export metadata ({e}); give "
                          f"--config") from e
    log.info("%s %s: using its metadata (model %r, %d classes, test size %s, test.conf_thre %s, "
             "test.iou_thre %s, test.max_dets %s, test.pre_nms_topk %s; flags such as predict's "
             "--conf take precedence)", _flag(kind), path, name, len(names),
             tuple(cfg.test.image_size), cfg.test.conf_thre, cfg.test.iou_thre, cfg.test.max_dets,
             cfg.test.pre_nms_topk)
    return cfg, names


def _output_names(model, path: Path) -> list:
    """Output names of an ``ov.Model``, or of the ONNX file ``path`` when ``model`` is None."""
    if model is not None:
        return [o.get_any_name() for o in model.outputs]
    import onnx
    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _run_dir_call(fn, path, flag: str = "--checkpoint"):
    from damo_jax.train.checkpoint import CheckpointCorruptError
    try:
        return fn(path)
    except FileNotFoundError as e:
        raise InputPathError(f"{flag} {path}: {e}") from e
    except CheckpointCorruptError as e:        # a partial / corrupt step: name the flag too
        raise CheckpointCorruptError(f"{flag} {path}: {e}") from e


def _checkpoint(path, config, flag: str = "--checkpoint"):
    from damo_jax.train.checkpoint import load_for_inference, resolve
    if not Path(path).exists():
        raise InputPathError(f"{flag} {path}: no such directory (a training run directory, "
                             f"e.g. runs/demo)")
    _, step = _run_dir_call(resolve, path, flag)          # the step "best" picks, loaded below
    cfg, variables, class_names = _run_dir_call(
        lambda p: load_for_inference(p, step=step), path, flag)
    if config is not None:
        log.warning("using the config stored in checkpoint %s (ignoring --config %r)", path, config)
    return cfg, variables, class_names, step


def _prepare(cfg, overrides, export: bool, where: str):
    """A copy of ``cfg`` with the overrides, validated; errors start with ``where`` (the source the
    user gave: --config NAME, --checkpoint RUN, --onnx FILE)."""
    from damo_jax.config import apply_overrides, validate_config
    import copy
    cfg = copy.deepcopy(cfg)
    if overrides:
        apply_overrides(cfg, overrides)
    if export:
        from damo_jax.export.common import export_config
        cfg = export_config(cfg)
    return validate_config(cfg, where=where)


def read_weights_file(path, flag: str = "--weights") -> dict:
    """The state dict of an official ``.pth`` / ``.pt`` or converted ``.npz`` file; user errors
    naming ``flag`` and the file (missing, a folder, another suffix, not a state dict file)."""
    from damo_jax.interop.convert import read_state_dict_file
    from damo_jax.interop.pth_bounds import PthFormatError
    path = _existing(flag, path)
    if path.suffix.lower() not in (".pth", ".pt", ".npz"):
        raise InputPathError(f"{flag} {path}: expected an official .pth/.pt or a converted .npz")
    if path.stat().st_size == 0:
        raise InputPathError(f"{flag} {path}: the file is empty")
    try:
        return read_state_dict_file(path)
    except PthFormatError as e:
        message = str(e.args[0] if e.args else e)
        if message.startswith(flag):
            raise
        raise PthFormatError(f"{flag} {message}" if message.startswith(str(path)) else
                             f"{flag} {path}: {message}") from e


def _weights(path: Path, cfg) -> dict:
    """Official ``.pth`` / converted ``.npz`` -> variables for ``cfg``: train-graph variables, or
    re-parameterised ones (``build_model(cfg, deploy="reparam")``) for a deploy state dict
    (``rbr_reparam`` keys: the official ``switch_to_deploy``, with or without ``fuse_model``)."""
    from damo_jax.interop.convert import from_torch_state_dict
    state_dict = read_weights_file(path)
    _check_weight_classes(state_dict, cfg, path)
    deploy = "reparam" if any(".rbr_reparam." in k for k in state_dict) else False
    try:
        return from_torch_state_dict(state_dict, cfg, deploy=deploy)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"--weights {path} do not fit --config {cfg.model.name!r}: "
                          f"{e.args[0] if e.args else e}") from e


def _graph_of(variables) -> bool | str:
    """The ``build_model`` deploy mode unfused variables belong to: ``"reparam"`` when a RepConv
    is folded (``rbr_reparam``: an official deploy state dict), else the train graph."""
    import jax
    paths = jax.tree_util.tree_flatten_with_path(variables.get("params", {}))[0]
    return "reparam" if any("rbr_reparam" in jax.tree_util.keystr(p) for p, _ in paths) else False


def _check_weight_classes(state_dict, cfg, weights) -> None:
    """Clear error when the weights' head predicts another number of classes than the config."""
    from damo_jax.interop.convert import classifier_outputs
    found = classifier_outputs(state_dict)
    if found is None:
        return  # the strict conversion reports the missing head keys
    expected = int(cfg.model.head.num_classes)
    legacy = bool(cfg.model.head.get("legacy", False))  # legacy heads have one extra channel
    if found != expected + legacy:
        from damo_jax.interop.convert import identify_model
        try:
            model = identify_model(state_dict)
        except Exception:          # noqa: BLE001 - a hint must never hide the real error
            model = None
        other = model.split()[0] if model and model.split()[0] != cfg.model.name else None
        hint = (f"; the file holds DAMO-YOLO-{other.upper()}{model[len(other):]}: use --config "
                f"{other}" if other else "")
        raise ConfigError(f"weights {weights} predict {found} classes but config "
                          f"{cfg.model.name!r} has model.head.num_classes = {expected}{hint}")


def _random_variables(cfg, seed: int) -> dict:
    """Official-init train-graph variables; their shapes do not depend on the image size, so the
    init runs on a small 64x64 input."""
    import jax
    from damo_jax.models import build_model, init_variables
    return init_variables(build_model(cfg), jax.random.PRNGKey(seed), (1, 64, 64, 3))


def _exported(kind: str, path: Path, cfg, class_names, threads,
              names_from: str = "the config") -> LoadedModel:
    """The backend of an exported file; ConfigError when the file predicts another number of
    classes than ``names_from`` (the ``--config`` given, or the file's own metadata) names: the
    scores output's static class dimension, or the metadata's class names."""
    from damo_jax.inference import backends
    flag = _flag(kind)
    runner = (backends.OnnxBackend(path, threads=threads, flag=flag) if kind == "onnx"
              else backends.OpenVinoBackend(path, threads=threads, flag=flag))
    exported = getattr(runner, "class_names", None)
    if exported and len(exported) != len(class_names):
        raise ConfigError(f"{flag} {path} predicts {len(exported)} classes (its export metadata), "
                          f"{names_from} has {len(class_names)} class names")
    names = tuple(exported or class_names)
    found = getattr(runner, "num_classes", None)
    if found is not None and found != len(names):
        whose = "its export metadata names" if exported else f"{names_from} has"
        raise ConfigError(f"{flag} {path} predicts {found} classes (its scores output), {whose} "
                          f"{len(names)}" + ("" if exported else
                                             "; give the --config the file was exported with"))
    weights = str((getattr(runner, "metadata", None) or {}).get("weights", ""))
    if weights.startswith("random-init"):
        log.warning("%s %s was exported with random weights (its metadata: weights=%s): its "
                    "detections mean nothing; export trained weights (--checkpoint RUN_DIR or "
                    "--config NAME --weights FILE.pth)", flag, path, weights)
    return LoadedModel(cfg=cfg, class_names=names, backend=runner, kind=kind, source=str(path))
