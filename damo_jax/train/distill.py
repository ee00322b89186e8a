"""Feature distillation in training (SPEC §8): teacher loading, align convs, weight schedule.

Config (``config.distill``; off while ``teacher`` and ``teacher_weights`` are both empty):

* ``teacher``: teacher config name or ``.py`` path (``m``, ``l``, ``nm`` ...); may be empty when
  ``teacher_weights`` is a damo_jax run (its stored config is used);
* ``teacher_weights``: official ``.pth`` / converted ``.npz`` (every key except ``head.*`` is loaded,
  as the official trainer does) or a damo_jax run directory / checkpoint (its EMA weights);
* ``method``: ``cwd`` (official, channel-wise distillation) or ``mimic`` (MSE); ``tau``;
* ``weight`` → ``weight_end``: cosine schedule over the run, w(it) = end + (w0 − end)·(1 + cos(π·it/T))/2
  (official 1 → 0.1);
* ``allow_weak_teacher`` / ``min_teacher_ap``: the teacher is evaluated on the val split before
  training; AP below ``min_teacher_ap`` stops the run unless allowed.
* ``train.grad_clip`` = −1 (default) means "official": 30 when distilling, off otherwise.

Multi-device: the feature normalisation of CWD/mimic uses the statistics of the GLOBAL batch (the
batch is sharded over the mesh and the jitted step reduces over all of it, as for BatchNorm); the
official code normalises each GPU's local batch. Both agree on one device.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from damo_jax import losses
from damo_jax.config import load_config, resolve_config_path
from damo_jax.errors import ConfigError
from damo_jax.train import optim

log = logging.getLogger("damo_jax.train.distill")
OFFICIAL_GRAD_CLIP = 30.0
TEACHER_PARTS = ("backbone", "neck")    # the teacher variables kept in the train state


def enabled(cfg) -> bool:
    d = cfg.get("distill")
    return bool(d is not None and (d.teacher or d.teacher_weights))


def resolve_grad_clip(cfg) -> float:
    """``train.grad_clip`` < 0 ("official") -> 30 when distilling, else 0 (off); written back."""
    clip = float(cfg.train.grad_clip)
    if clip < 0:
        clip = OFFICIAL_GRAD_CLIP if enabled(cfg) else 0.0
        cfg.train.grad_clip = clip
    return clip


def weight_at(step, total_steps: int, start: float = 1.0, end: float = 0.1):
    """Distillation weight of iteration ``step`` (0-based): cosine from ``start`` to ``end``."""
    it = jnp.asarray(step, jnp.float32)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(math.pi * it / max(int(total_steps), 1)))


# --------------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Teacher:
    """The loaded teacher. ``variables``: backbone + neck (+ ``head`` when it fits the data);
    ``cfg``: the student's config with the teacher's ``model`` section (for building/evaluating)."""
    cfg: object
    model: object
    variables: dict
    has_head: bool
    source: str
    note: str = ""

    def frozen(self) -> dict:
        """``{"teacher_params", "teacher_batch_stats"}``: backbone + neck only (numpy)."""
        return {f"teacher_{c}": {k: v for k, v in self.variables[c].items() if k in TEACHER_PARTS}
                for c in ("params", "batch_stats")}


def neck_channels(model_cfg) -> tuple[int, ...]:
    return tuple(int(c) for c in model_cfg.neck["out_channels"])


def _describe(cfg, what: str) -> str:
    return f"{what} config {cfg.model.name!r}"


def _teacher_cfg(cfg, model_section) -> object:
    tcfg = copy.deepcopy(cfg)
    with tcfg.unlocked():
        tcfg.model = copy.deepcopy(model_section)
        tcfg.model.head["num_classes"] = int(cfg.model.head.num_classes)
        tcfg.model.class_names = tuple(cfg.model.class_names)
        tcfg.model.dtype = cfg.model.get("dtype", "float32")
    return tcfg


def check_pair(cfg, tcfg, where: str = "") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(student, teacher) neck channels; ConfigError naming both configs when they cannot pair."""
    cs, ct = neck_channels(cfg.model), neck_channels(tcfg.model)
    ss, st = tuple(cfg.model.head["strides"]), tuple(tcfg.model.head["strides"])
    if len(cs) != len(ct) or ss != st:
        raise ConfigError(
            f"distillation: student {_describe(cfg, 'model')} (neck channels {cs}, strides {ss}) and "
            f"teacher {_describe(tcfg, 'model')} (neck channels {ct}, strides {st}) need the same "
            f"number of neck levels and strides{where}")
    return cs, ct


def _which_model_hint(state_dict) -> str:
    from damo_jax.interop import convert
    return (convert.model_hint(state_dict, "--teacher")
            or "set distill.teacher (--teacher) to the weights' model")


def _load_state_dict_teacher(path: Path, tcfg, cfg) -> tuple[dict, bool]:
    """Official .pth/.npz -> variables; backbone+neck strict, head only if it fits (else dropped)."""
    from damo_jax.interop import convert
    entries = convert.expected_torch_entries(tcfg)
    sd = {k.removeprefix("module."): v for k, v in convert.read_state_dict_file(path).items()}
    who = (f"distill.teacher_weights={path} vs teacher {_describe(tcfg, 'model')} "
           f"(student {_describe(cfg, 'model')})")
    body = {k: e for k, e in entries.items() if "head" not in k}
    unexpected = sorted(k for k in sd if "head" not in k and k not in body
                        and not k.endswith("num_batches_tracked"))
    missing = sorted(set(body) - set(sd))
    if unexpected or missing:
        raise ConfigError(f"{who}: the weights do not fit the teacher config (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}, {len(missing)}/"
                          f"{len(unexpected)} in all); " + _which_model_hint(sd))
    head = {k: e for k, e in entries.items() if "head" in k}
    has_head = all(k in sd and tuple(np.shape(sd[k])) == e[2] for k, e in head.items())
    flat = {}
    for key, (collection, path_, shape) in (entries if has_head else body).items():
        value = np.asarray(sd[key], np.float32)
        if tuple(value.shape) != shape:
            raise ConfigError(f"{who}: key {key!r} has shape {tuple(value.shape)}, the teacher "
                              f"config expects {shape} (neck/backbone channels differ); "
                              + _which_model_hint(sd))
        flat[(collection, *path_)] = convert.from_torch_layout(path_[-1], value)
    return traverse_util.unflatten_dict(flat), has_head


def _shapes(tree) -> dict:
    """``"params/neck/.../kernel" -> shape`` of a variables tree (arrays or ShapeDtypeStructs)."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def load_teacher(cfg) -> Teacher:
    """Resolve ``distill.teacher`` / ``teacher_weights`` into a :class:`Teacher` (host arrays)."""
    from damo_jax.models import build_model, init_variables
    d = cfg.distill
    if not d.teacher_weights:
        raise ConfigError(f"config distill.teacher={d.teacher!r} needs distill.teacher_weights "
                          f"(an official .pth/.npz or a damo_jax run directory)")
    if d.teacher:                 # the name first: before any weights are read
        resolve_config_path(str(d.teacher), flag="--teacher (config distill.teacher)")
    path = Path(str(d.teacher_weights)).expanduser()
    if not path.exists():
        raise ConfigError(f"config distill.teacher_weights={path}: no such file or directory")
    if not path.is_dir() and path.suffix not in (".pth", ".pt", ".ckpt", ".npz"):
        raise ConfigError(f"config distill.teacher_weights={path} (--teacher-weights): a training run "
                          f"folder or an official .pth / .pt / .npz state dict was expected, not a "
                          f"{path.suffix or 'suffix-less'} file")
    if path.is_dir():
        from damo_jax.train import checkpoint
        stored_cfg, variables, names = checkpoint.load_for_inference(path, which="ema")
        base = load_config(d.teacher).model if d.teacher else stored_cfg.model
        tcfg = _teacher_cfg(cfg, base)
        has_head = tuple(names) == tuple(cfg.model.class_names)
        more = " ..." if len(names) > 5 else ""
        note = "" if has_head else f"the teacher's classes {list(names)[:5]}{more} differ from the data's"
        variables = {c: {k: v for k, v in variables[c].items() if has_head or k in TEACHER_PARTS}
                     for c in ("params", "batch_stats")}
        source = f"damo_jax checkpoint {path} (EMA)"
    else:
        if not d.teacher:
            raise ConfigError(f"config distill.teacher_weights={path} is an official state dict: "
                              f"set distill.teacher to its model config (e.g. m, l, nm)")
        tcfg = _teacher_cfg(cfg, load_config(d.teacher).model)
        variables, has_head = _load_state_dict_teacher(path, tcfg, cfg)
        note = "" if has_head else "the teacher's head does not predict the data's classes"
        source = f"state dict {path} (all keys but head.*)"
    check_pair(cfg, tcfg)
    model = build_model(tcfg)
    want = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    want = {c: {k: v for k, v in want[c].items() if has_head or k in TEACHER_PARTS}
            for c in ("params", "batch_stats")}
    got_s, want_s = _shapes(variables), _shapes(want)
    bad = sorted(k for k in set(got_s) | set(want_s) if got_s.get(k) != want_s.get(k))
    if bad and path.is_dir() and d.teacher:
        raise ConfigError(f"--teacher-weights {path} (config distill.teacher_weights): that run trained "
                          f"model {stored_cfg.model.name!r}, not the --teacher {d.teacher!r} "
                          f"(model {tcfg.model.name!r}; {len(bad)} weight shapes differ); leave "
                          f"out --teacher to distill from the run's own model")
    if bad:
        raise ConfigError(f"distill.teacher_weights={path} do not fit teacher "
                          f"{_describe(tcfg, 'model')} (student {_describe(cfg, 'model')}): "
                          f"{len(bad)} tensors differ, e.g. {bad[0]}: weights {got_s.get(bad[0])} vs "
                          f"config {want_s.get(bad[0])}")
    variables = jax.tree.map(lambda x: np.asarray(x, np.float32), variables)
    return Teacher(cfg=tcfg, model=model, variables=variables, has_head=has_head, source=source,
                   note=note)


def check_teacher_ap(cfg, ap: float | None) -> None:
    """ConfigError when the teacher's val AP is below ``distill.min_teacher_ap`` (not allowed weak)."""
    d = cfg.distill
    if ap is None or bool(d.allow_weak_teacher) or ap >= float(d.min_teacher_ap):
        return
    raise ConfigError(f"distillation teacher ({d.teacher or d.teacher_weights}, weights "
                      f"{d.teacher_weights}) scores val AP {ap:.4f} < distill.min_teacher_ap="
                      f"{d.min_teacher_ap}: wrong weights or config? Set "
                      f"--config.distill.allow_weak_teacher=true to distill anyway")


# --------------------------------------------------------------------------------------------------
# In the step
# --------------------------------------------------------------------------------------------------
def neck_features(model, variables, images):
    """Teacher neck outputs (list of NHWC maps, strides 8/16/32), eval-mode BN, no head."""
    def fn(module, x):
        x = x.astype(jnp.dtype(module.dtype))
        return list(module.neck(module.backbone(x, False), False))
    return model.apply(variables, images, method=fn)


def init_align(key, student_channels, teacher_channels) -> dict:
    """``{"level<i>": {"kernel": (C_s, C_t), "bias": (C_t,)}}`` with PyTorch Conv2d default init."""
    levels = losses.init_align_params(key, student_channels, teacher_channels)
    return {f"level{i}": p for i, p in enumerate(levels)}


def align_list(align: dict) -> list:
    return [align[f"level{i}"] for i in range(len(align))]


def make_align_tx(cfg, align):
    """Optimizer of the align convs: the run's optimizer, weight decay on kernels only, no clip."""
    tc = copy.deepcopy(cfg.train)
    with tc.unlocked():
        tc.grad_clip = 0.0
    return optim.make_optimizer(tc, 1.0, optim.decay_mask(align, None))


def feature_loss(cfg, student_neck, teacher_neck, align):
    """Unweighted distillation loss (sum over levels) of the configured method."""
    return losses.distill_loss(student_neck, teacher_neck, align_list(align),
                               method=str(cfg.distill.method), tau=float(cfg.distill.tau))


def attach(state: dict, cfg, teacher: Teacher, replicated) -> tuple[object, dict]:
    """(align optimizer, state + align convs, their optimizer state and the frozen teacher).

    The align convs are initialised from ``fold_in(PRNGKey(train.seed), 1)`` (PyTorch Conv2d
    default init, SPEC §8); everything is created directly with the replicated sharding."""
    cs, ct = check_pair(cfg, teacher.cfg)
    key = jax.random.fold_in(jax.random.PRNGKey(int(cfg.train.seed)), 1)
    align_tx = make_align_tx(cfg, jax.eval_shape(lambda: init_align(key, cs, ct)))

    def make(frozen, key):
        align = init_align(key, cs, ct)
        return dict(align_params=align, align_opt_state=align_tx.init(align), **frozen)

    return align_tx, dict(state, **jax.jit(make, out_shardings=replicated)(teacher.frozen(), key))


def evaluate_teacher(teacher: Teacher, val_ds, progress: bool = False) -> dict | None:
    """COCO stats of the teacher on the val split (its full model), or None when it cannot be
    evaluated (no val split, or its head does not predict the data's classes)."""
    if val_ds is None or not teacher.has_head:
        return None
    from damo_jax.evaluation.evaluator import evaluate
    stats = evaluate(teacher.model, teacher.variables, val_ds, teacher.cfg, progress=progress)
    return {k: float(v) for k, v in stats.items()}


def check_resumed_teacher(saved: dict, current: dict, where) -> None:
    """ConfigError when a resumed run would distill from another teacher than it started with."""
    old, new = saved.get("teacher_fingerprint"), current.get("teacher_fingerprint")
    if old and new and old != new:
        raise ConfigError(f"{where}: the run was distilled from a teacher with fingerprint {old} "
                          f"({saved.get('teacher_source')}), the configured teacher has {new} "
                          f"({current.get('teacher_source')}); resume with the same "
                          f"distill.teacher_weights or use a new --workdir")
