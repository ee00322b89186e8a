"""Config loading: ``configs/<name>.py`` by short name, or any config file by path.

Every config file defines ``get_config() -> ml_collections.ConfigDict``. The dict has four
sections (SPEC §1.2, §9):

* ``model``  — architecture (backbone / neck / head), class names, input size.
* ``data``   — dataset spec string (``demo``, ``coco:/path``, ...), augmentation recipe, batching.
* ``train``  — optimisation recipe, EMA, checkpointing, logging.
* ``test``   — evaluation protocol (size, thresholds, max detections).

``model_config(...)`` below builds the per-model dict from the values of SPEC §1.2 so that the
seven config files stay a few lines each.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import ml_collections

#: default ``test.pre_nms_topk``: candidates per image entering the static-shape NMS (the official
#: NMS takes all of them; 1000 bound on trained models' crowded images and changed their results,
#: 4000 costs ~4 ms more per image on a 2-core CPU: damo_jax/ops/nms.py)
PRE_NMS_TOPK = 4000

MODEL_NAMES = ("t", "s", "m", "l", "ns", "nm", "nl", "n")
def _config_dir() -> Path:
    """The bundled config files: the ``damo_jax.configs`` package (repo folder ``configs/``)."""
    import damo_jax.configs
    return Path(damo_jax.configs.__file__).resolve().parent


CONFIG_DIR = _config_dir()

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)


def model_config(
    *,
    name: str,
    backbone: str,
    structure: str,
    out_indices: Sequence[int],
    use_focus: bool,
    act: str,
    reparam: bool,
    neck_depth: float,
    hidden_ratio: float,
    in_channels: Sequence[int],
    out_channels: Sequence[int],
    depthwise: bool,
    reg_max: int,
    last_kernel_size: int,
    nano: bool,
    shear: float = 2.0,
    mosaic_scale: tuple[float, float] = (0.1, 2.0),
) -> ml_collections.ConfigDict:
    """The full config of one released model: architecture, evaluation protocol and default
    data / train sections (the official recipe); model configs then pick their training recipe
    explicitly with :func:`with_recipe`."""
    size = 416 if nano else 640
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name = name
    c.model.backbone = dict(
        name=backbone, structure=structure, out_indices=tuple(out_indices), with_spp=True,
        use_focus=use_focus, act=act, reparam=reparam, depthwise=depthwise, use_se=False)
    c.model.neck = dict(
        name="GiraffeNeckV2", depth=neck_depth, hidden_ratio=hidden_ratio,
        in_channels=tuple(in_channels), out_channels=tuple(out_channels), act=act,
        depthwise=depthwise, spp=False, block_name=NECK_BLOCK)
    c.model.head = dict(
        name="ZeroHead", num_classes=len(COCO_CLASSES), in_channels=tuple(out_channels),
        stacked_convs=0, reg_max=reg_max, last_kernel_size=last_kernel_size,
        strides=(8, 16, 32), legacy=False)
    c.model.class_names = COCO_CLASSES
    c.model.image_size = (size, size)  # (H, W) used by the FLOP report and export defaults
    c.model.bn_epsilon = 1e-3
    c.model.bn_momentum = 0.97  # flax convention (= 1 - torch momentum 0.03)
    c.model.dtype = "float32"   # compute dtype; params stay float32
    c.model.depthwise_impl = "auto"  # depthwise convs + SPP pools: auto | conv | taps (models/cpu_ops.py)
    c.model.grad_impl = "auto"  # train-graph convs on CPU: auto | native | matmul | onednn (models/conv_grad.py)
    c.model.pointwise_impl = "auto"  # 1x1 convs: auto | conv | dot (matrix product; models/cpu_ops.py)
    c.model.dense_impl = "auto"  # k x k convs of folded inference graphs: auto | conv | onednn (models/conv_grad.py)
    c.model.bn_impl = "auto"  # training-mode BatchNorm (+ReLU): auto | xla | native (models/batchnorm.py)
    c.model.conv3x3_impl = "auto"  # 3x3 s1 convs in oneDNN's place: auto | direct | winograd (models/conv_grad.py)

    c.data = ml_collections.ConfigDict()
    c.data.train = "demo"          # dataset spec, see data_pipelines.open_dataset
    c.data.val = ""                # "" = same spec as train, split "val"
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.image_size = (size, size)
    c.data.mosaic_size = (640, 640)  # nano models also build mosaics at 640 (SPEC §9.2)
    c.data.mosaic_prob = 1.0
    c.data.mosaic_scale = tuple(mosaic_scale)
    c.data.mixup_prob = 0.15
    c.data.degrees = 10.0
    c.data.translate = 0.2
    c.data.shear = shear
    c.data.flip_prob = 0.5
    c.data.sada = True
    c.data.max_boxes = 200         # static G of the padded ground truth
    c.data.workers = 2
    c.data.prefetch = 2
    c.data.loader = "process"      # worker backend: process (pickle) | grain (shared memory; pod hosts)

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 300
    c.train.no_aug_epochs = 16.0   # floats: fractional epochs are fine (a 0.3-epoch demo warm-up)
    c.train.warmup_epochs = 5.0
    c.train.batch_size = 256       # global batch
    c.train.optimizer = "adamw" if nano else "sgd"
    c.train.base_lr_per_img = (0.001 if nano else 0.01) / 64
    c.train.min_lr_ratio = 0.05
    c.train.momentum = 0.9
    c.train.nesterov = True
    c.train.weight_decay = 1e-2 if nano else 5e-4
    c.train.adam_betas = (0.9, 0.999)
    c.train.adam_eps = 1e-8
    c.train.ema = True
    c.train.ema_decay = 0.9998
    c.train.ema_tau = 2000.0
    c.train.grad_clip = -1.0       # global-norm clip of the student grads; <0 = official (30 when distilling, else off), 0 = off
    c.train.seed = 0
    c.train.eval_every_epochs = 10
    c.train.eval_every_epochs_tail = 1
    c.train.ckpt_every_steps = 0   # 0 = once per epoch
    c.train.keep_checkpoints = 3
    c.train.log_every_steps = 10
    c.train.finetune = ""          # path to an official .pth / .npz to start from
    c.train.finetune_head = False  # also load its head (the official fine-tuning starts the head fresh)
    c.train.max_steps = 0          # >0 stops early (tests, demos)
    c.train.precompile = "auto"    # auto | on | off: compile the update step in a child process (CPU: faster steps, damo_jax/train/precompile.py)

    c.distill = ml_collections.ConfigDict()   # feature distillation (SPEC §8, damo_jax/train/distill.py)
    c.distill.teacher = ""         # teacher config name or path ("" = off, or taken from a damo_jax run)
    c.distill.teacher_weights = "" # official .pth / .npz, or a damo_jax run directory / checkpoint
    c.distill.method = "cwd"       # cwd (official) | mimic
    c.distill.weight = 1.0         # loss weight at step 0 ...
    c.distill.weight_end = 0.1     # ... cosine-decayed to this at the last step (official 1 -> 0.1)
    c.distill.tau = 1.0
    c.distill.min_teacher_ap = 0.01  # teacher val AP below this stops the run ...
    c.distill.allow_weak_teacher = False  # ... unless this is set

    c.test = ml_collections.ConfigDict()
    c.test.image_size = (size, size)
    c.test.conf_thre = 0.03 if nano else 0.05
    c.test.iou_thre = 0.65 if nano else 0.7
    c.test.max_dets = 500
    c.test.pre_nms_topk = PRE_NMS_TOPK     # static candidate cap per image for the jit-able NMS
    c.test.batch_size = 8
    return c


#: One line per config key, for ``--help`` (:func:`key_help`); a key ending in "." explains every
#: key under it. A key that a shipped config holds without an entry here fails
#: ``tests/test_train_cli.py::test_every_config_key_is_explained``.
KEY_HELP = {
    # model: architecture (official names; changing these keys makes official weights unloadable)
    "model.name": "model size: t, s, m, l (TinyNAS-res/-csp) or ns, nm, nl, n (nano); names the run",
    "model.backbone.": "backbone architecture (SPEC §2); changes make official weights unloadable",
    "model.neck.": "neck architecture (Efficient RepGFPN, SPEC §3; block_name: BasicBlock_3x3_Reverse "
                   "only); changes make official weights unloadable",
    "model.head.": "head architecture (ZeroHead, SPEC §4); num_classes comes from the training data",
    "model.class_names": "class names, in label order (a training run takes them from its data)",
    "model.image_size": "(H, W) for the FLOP report and export defaults",
    "model.bn_epsilon": "BatchNorm epsilon (official 1e-3)",
    "model.bn_momentum": "BatchNorm running-statistics momentum, flax convention (= 1 - torch's 0.03)",
    "model.dtype": "compute dtype: float32 | bfloat16 | float16 (params stay float32)",
    "model.depthwise_impl": "depthwise convs and SPP pools: auto | conv | taps (models/cpu_ops.py)",
    "model.grad_impl": "train-graph conv gradients: auto (oneDNN on CPU, XLA elsewhere) | native | "
                       "matmul | onednn (models/conv_grad.py)",
    "model.pointwise_impl": "1x1 convs: auto | conv | dot (a matrix product; models/cpu_ops.py)",
    "model.dense_impl": "k x k convs of folded (deploy) graphs: auto | conv | onednn (models/conv_grad.py)",
    "model.bn_impl": "training-mode BatchNorm (+ its ReLU): auto (one native call on every core in a "
                     "one-device CPU process, else XLA) | xla | native (models/batchnorm.py)",
    "model.conv3x3_impl": "3x3 stride-1 convs that run in oneDNN (grad_impl / dense_impl onednn): auto "
                          "(Winograd F(2x2,3x3) where its x86-64 kernels run, for convs large enough) "
                          "| direct | winograd (models/conv_grad.py, models/winograd_ffi.c)",
    # data
    "data.train": "training data: demo, coco:DIR, coco:FILE.json, yolo:DATA.yaml, voc:DIR, tfds:NAME",
    "data.val": "validation data spec; '' = the training spec with split data.val_split",
    "data.train_split": "split of data.train used for training",
    "data.val_split": "split evaluated during training",
    "data.image_size": "(H, W) training input size, multiples of 32",
    "data.mosaic_size": "(H, W) canvas of a mosaic before it is resized to data.image_size",
    "data.mosaic_prob": "probability that a training image is a 4-image mosaic",
    "data.mosaic_scale": "(low, high) random scale of the mosaic's affine transform",
    "data.mixup_prob": "probability of mixing a second mosaic in (MixUp)",
    "data.degrees": "random rotation range, degrees (+/-), in [0, 180]",
    "data.translate": "random translation, fraction of the image size (+/-), in [0, 0.5]",
    "data.shear": "random shear range, degrees (+/-), in [0, 45)",
    "data.flip_prob": "horizontal flip probability",
    "data.sada": "scale-aware data augmentation (SADA, box-level colour / geometry ops)",
    "data.mixup_scale": "(low, high) scale of the mixed-in image (optional key; default (0.5, 1.5))",
    "data.min_box_area": "boxes smaller than this many pixels after augmentation are dropped "
                         "(optional key; default 4)",
    "data.max_boxes": "boxes per image kept (the largest; a warning counts the rest)",
    "data.workers": "data loader worker processes (0 = in the main process)",
    "data.prefetch": "batches prepared ahead beyond one per worker",
    "data.loader": "worker backend: process (pickled batches) | grain (shared memory; pod hosts)",
    # train
    "train.epochs": "epochs of the schedule",
    "train.no_aug_epochs": "last epochs without mosaic / mixup / affine (flip and SADA stay on), at the minimum lr",
    "train.warmup_epochs": "epochs of lr warm-up from 0, quadratic (official; may be fractional)",
    "train.batch_size": "global batch size, over all devices and processes",
    "train.optimizer": "sgd | adamw",
    "train.base_lr_per_img": "learning rate per image; lr = base_lr_per_img x train.batch_size",
    "train.min_lr_ratio": "cosine schedule floor, as a fraction of the peak lr",
    "train.momentum": "SGD momentum",
    "train.nesterov": "SGD with Nesterov momentum",
    "train.weight_decay": "weight decay (conv kernels and the head's scales only)",
    "train.adam_betas": "AdamW (beta1, beta2)",
    "train.adam_eps": "AdamW epsilon",
    "train.ema": "keep an exponential moving average of the model (evaluated and exported)",
    "train.ema_decay": "EMA decay d; the decay at step i is d (1 - exp(-i / ema_tau))",
    "train.ema_tau": "EMA warm-up in steps (see train.ema_decay)",
    "train.grad_clip": "global-norm gradient clip; < 0 = official (30 when distilling, else off), 0 = off",
    "train.seed": "seed of the model init and the data order (batch k = f(seed, k))",
    "train.eval_every_epochs": "evaluate every N epochs (0 = only at the end)",
    "train.eval_every_epochs_tail": "evaluate every N epochs during the no-augmentation tail",
    "train.ckpt_every_steps": "checkpoint every N steps (0 = once per epoch)",
    "train.keep_checkpoints": "checkpoints kept (the newest; the best-AP weights are kept apart)",
    "train.log_every_steps": "log the loss and lr every N steps",
    "train.finetune": "weights to start from: an official .pth or a damo_jax .npz",
    "train.finetune_head": "also load the fine-tuning weights' head where its shapes match (off: the "
                           "head starts fresh, as in the official fine-tuning, SPEC §9.1)",
    "train.max_steps": "stop after N steps (0 = the whole schedule); for quick checks",
    "train.precompile": "auto | on | off: compile the update step in a child process (CPU: faster steps)",
    # distill
    "distill.teacher": "teacher config name or path ('' = no distillation; SPEC §8)",
    "distill.teacher_weights": "teacher weights: official .pth, .npz, or a damo_jax run / checkpoint",
    "distill.method": "cwd (channel-wise distillation, official) | mimic (MSE)",
    "distill.weight": "distillation loss weight at step 0, cosine-decayed to distill.weight_end",
    "distill.weight_end": "distillation loss weight at the last step (official 0.1)",
    "distill.tau": "CWD softmax temperature (> 0)",
    "distill.min_teacher_ap": "a teacher whose val AP is below this stops the run",
    "distill.allow_weak_teacher": "train with a teacher below distill.min_teacher_ap anyway",
    # test
    "test.image_size": "(H, W) evaluation / predict input size, multiples of 32",
    "test.conf_thre": "score threshold of the detections kept",
    "test.iou_thre": "NMS IoU threshold (class-aware)",
    "test.max_dets": "detections kept per image after NMS",
    "test.pre_nms_topk": "candidates per image entering NMS (static cap for jit)",
    "test.batch_size": "evaluation batch size",
}


#: keys a config file may add that :func:`model_config` does not set (read with a default)
OPTIONAL_KEYS = ("data.mixup_scale", "data.min_box_area")


@functools.lru_cache(maxsize=None)
def known_keys() -> frozenset:
    """Every dotted key a config may hold: :func:`model_config`'s (the same for every model) and
    :data:`OPTIONAL_KEYS`."""
    base = model_config(name="t", backbone="TinyNAS_res", structure="-", out_indices=(2, 4, 5),
                        use_focus=True, act="relu", reparam=True, neck_depth=1.0, hidden_ratio=1.0,
                        in_channels=(1, 1, 1), out_channels=(1, 1, 1), depthwise=False, reg_max=16,
                        last_kernel_size=3, nano=False)
    return frozenset([k for k, _ in flat_items(base)] + list(OPTIONAL_KEYS))


def _check_file_keys(cfg, path: Path) -> None:
    """A config file's keys against :func:`known_keys`: a typo (``c.model.neck.hiden_ratio``) was
    a new key that no code reads, i.e. the default silently kept; a missing section failed deep in
    a run."""
    import difflib
    from damo_jax.errors import ConfigError
    for section in ("model", "data", "train", "test"):
        if not hasattr(cfg.get(section), "items"):
            raise ConfigError(f"config file {path}: section {section!r} is missing (start from "
                              f"load_config('<model>') and change it, as configs/demo_ns.py does)")
    known = known_keys()
    for key, _ in flat_items(cfg):
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"config file {path}: unknown key {key}{hint} (no code reads it; "
                              f"damo-jax train --help lists every key)")


def key_help(key: str) -> str | None:
    """The one-line explanation of a dotted config key (:data:`KEY_HELP`), or None."""
    if key in KEY_HELP:
        return KEY_HELP[key]
    groups = [g for g in KEY_HELP if g.endswith(".") and key.startswith(g)]
    return KEY_HELP[max(groups, key=len)] if groups else None


# Named training recipes (SPEC §9.1/§9.2): what a model config picks with ``with_recipe``. Keys are
# ``section.key`` of the config; a model config adds its own augmentation strength (shear, mosaic
# scale) as keyword arguments of ``with_recipe``.
_COMMON_RECIPE = {
    "train.epochs": 300, "train.no_aug_epochs": 16.0, "train.warmup_epochs": 5.0,
    "train.batch_size": 256, "train.min_lr_ratio": 0.05, "train.ema": True,
    "train.ema_decay": 0.9998, "train.ema_tau": 2000.0,
    "data.mosaic_size": (640, 640), "data.mosaic_prob": 1.0, "data.mixup_prob": 0.15,
    "data.degrees": 10.0, "data.translate": 0.2, "data.flip_prob": 0.5, "data.sada": True,
}
RECIPES = {
    # T / S / M / L: SGD (momentum 0.9, Nesterov), lr 0.01 per 64 images, wd 5e-4, 640x640
    "official": dict(_COMMON_RECIPE, **{
        "train.optimizer": "sgd", "train.base_lr_per_img": 0.01 / 64, "train.weight_decay": 5e-4,
        "train.momentum": 0.9, "train.nesterov": True,
        "data.image_size": (640, 640), "test.image_size": (640, 640)}),
    # nano models: AdamW, lr 0.001 per 64 images, wd 1e-2, 416x416 inputs built from 640 mosaics
    "official_nano": dict(_COMMON_RECIPE, **{
        "train.optimizer": "adamw", "train.base_lr_per_img": 0.001 / 64,
        "train.weight_decay": 1e-2, "train.adam_betas": (0.9, 0.999),
        "data.image_size": (416, 416), "test.image_size": (416, 416)}),
}


def with_recipe(cfg: ml_collections.ConfigDict, name: str, *, shear: float,
                mosaic_scale: tuple[float, float]) -> ml_collections.ConfigDict:
    """``cfg`` with the named training recipe of :data:`RECIPES` and the model's augmentation
    strength (``data.shear``, ``data.mosaic_scale``); the one line a model config uses to show
    how it is trained."""
    from damo_jax.errors import ConfigError
    if name not in RECIPES:
        raise ConfigError(f"unknown training recipe {name!r} (known: {', '.join(RECIPES)})")
    values = dict(RECIPES[name], **{"data.shear": float(shear),
                                    "data.mosaic_scale": tuple(mosaic_scale)})
    for key, value in values.items():
        section, leaf = key.split(".")
        cfg[section][leaf] = value
    return cfg


def neck_depth_n(depth: float) -> int:
    """Number of blocks per neck node: Python's banker's ``round(3 * depth)`` (SPEC §0)."""
    return int(round(3 * depth))


def known_config_names() -> list[str]:
    """Short names of the bundled configs (``configs/*.py``)."""
    return sorted(q.stem for q in CONFIG_DIR.glob("*.py") if not q.stem.startswith("_"))


def resolve_config_path(name_or_path: str, flag: str = "--config") -> Path:
    """``configs/<name>.py`` for a short name, or an existing ``.py`` path; else
    :class:`~damo_jax.errors.InputPathError` naming ``flag`` and the known names."""
    from damo_jax.errors import InputPathError
    p = Path(name_or_path)
    if p.suffix == ".py" and p.is_file():
        return p
    cand = CONFIG_DIR / f"{name_or_path.lower()}.py"
    if "/" not in name_or_path and cand.is_file():
        return cand
    what = "config file not found" if p.suffix == ".py" else "not a known config name"
    if p.suffix != ".py" and "/" not in name_or_path:
        import difflib
        close = difflib.get_close_matches(name_or_path.lower(), known_config_names(), n=1, cutoff=0.6)
        what += f"; did you mean {close[0]!r}?" if close else ""
    raise InputPathError(f"{flag} {name_or_path!r}: {what} (known names: "
                         f"{', '.join(known_config_names())}; or give a path to a .py config file)")


def load_config(name_or_path) -> ml_collections.ConfigDict:
    """Return the ConfigDict of ``configs/<name>.py`` or of a config file path.

    A ConfigDict passed in is returned unchanged, so APIs can take either form.
    """
    from damo_jax.errors import ConfigError
    if isinstance(name_or_path, ml_collections.ConfigDict):
        return name_or_path
    path = resolve_config_path(str(name_or_path))
    spec = importlib.util.spec_from_file_location(f"damo_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}: syntax error line {e.lineno}: {e.msg}") from e
    except Exception as e:   # noqa: BLE001 (a user's file: any error is a config mistake)
        raise _config_file_error(path, "importing it", e) from e
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path}: config files must define get_config()")
    try:
        cfg = module.get_config()
    except Exception as e:   # noqa: BLE001
        raise _config_file_error(path, "get_config()", e) from e
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() returned a {type(cfg).__name__}, expected "
                          f"an ml_collections.ConfigDict (start from load_config('<model>') and "
                          f"change it, as configs/demo_ns.py does)")
    _check_file_keys(cfg, path)
    return cfg


def _config_file_error(path: Path, what: str, e: Exception):
    """A ConfigError for an exception raised while a config file ran: ``config file PATH: WHAT
    raised TYPE: MESSAGE (line N)``, the line being the file's own last frame in the traceback."""
    from damo_jax.errors import ConfigError, UserError
    line, own = None, path.resolve()
    tb = e.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == own:
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f" (line {line})" if line else ""
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, UserError):       # e.g. load_config('<unknown name>') inside get_config()
        return ConfigError(f"config file {path}: {message}{where}")
    return ConfigError(f"config file {path}: {what} raised {type(e).__name__}"
                       f"{': ' + message if message else ''}{where}")


def _parse_value(text: str, current, key: str):
    """``text`` as a value of the type of ``current`` (the default); ConfigError naming ``key``."""
    import ast
    from damo_jax.errors import ConfigError

    def bad(expected):
        return ConfigError(f"--config.{key}={text}: expected {expected} "
                           f"(default {current!r})")

    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise bad("a boolean (true/false)")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if current is None:
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(current, (tuple, list)):
        if isinstance(value, int) and len(current) == 2 and all(type(v) is int for v in current):
            value = (value, value)  # one size for both sides, like --img-size 640
        if not isinstance(value, (tuple, list)):
            raise bad(f"a {type(current).__name__} like {current!r}")
        return tuple(value) if isinstance(current, tuple) else list(value)
    return value


def override_key(item: str) -> str:
    """The dotted key of a ``--config.key.sub=value`` / ``key.sub=value`` override."""
    return item.split("=", 1)[0].removeprefix("--").removeprefix("config.")


#: names other frameworks use for a setting -> (our key's last part, a note); only for the
#: "did you mean" hint of an unknown override key
_KEY_ALIASES = {
    **dict.fromkeys(("lr", "learning_rate", "base_lr", "lr0"),
                    ("base_lr_per_img", "the learning rate per image: lr = base_lr_per_img x batch size")),
    **dict.fromkeys(("nms_iou", "nms_thre", "nms_threshold", "iou", "iou_threshold", "nms"),
                    ("iou_thre", "the NMS IoU threshold")),
    **dict.fromkeys(("conf", "conf_threshold", "score_thresh", "score_threshold", "nms_conf"),
                    ("conf_thre", "the score threshold")),
    **dict.fromkeys(("imgsz", "img_size", "input_size", "size"), ("image_size", "")),
    **dict.fromkeys(("total_epochs", "max_epoch", "max_epochs", "num_epochs"), ("epochs", "")),
    **dict.fromkeys(("num_workers",), ("workers", "")),
}


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``key.sub=value`` overrides (the ``--config.key.sub=value`` CLI form, prefix optional).

    Unknown keys raise :class:`~damo_jax.errors.ConfigKeyError`, values of the wrong type
    :class:`~damo_jax.errors.ConfigError`; both name the key (and the closest known key).
    """
    import difflib
    from damo_jax.errors import ConfigError, ConfigKeyError
    if isinstance(overrides, str):      # one override, not a sequence of its characters
        overrides = [overrides]
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must look like --config.key.sub=value")
        key, text = override_key(item), item.split("=", 1)[1]
        parts = key.split(".")
        node = cfg
        for depth, p in enumerate(parts):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or p not in node:
                known = [k for k, _ in flat_items(cfg)]
                alias = _KEY_ALIASES.get(parts[-1].lower())
                close = sorted((k for k in known if alias and k.endswith("." + alias[0])),
                               key=lambda k: not k.startswith(parts[0] + "."))[:1] \
                    or difflib.get_close_matches(key, known, n=1)    # the same section first
                hint = (f"; did you mean --config.{close[0]}?" if close else "") + (
                    f" ({alias[1]})" if alias and alias[1] and close else "")
                what = "config key" if depth == len(parts) - 1 else "config section"
                raise ConfigKeyError(f"--config.{key}: unknown {what} {p!r}{hint}")
            if depth < len(parts) - 1:
                node = node[p]
        leaf = parts[-1]
        value = _parse_value(text, node[leaf], key)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--config.{key}={text}: {e}") from e
    return cfg


def validate_config(cfg: ml_collections.ConfigDict, where: str = "config") -> ml_collections.ConfigDict:
    """Reject values no run can use, naming the key: batch sizes, epochs, ``train.log_every_steps``
    / ``keep_checkpoints``, ``test.max_dets`` / ``pre_nms_topk`` >= 1; ``train.max_steps``,
    ``warmup_epochs``, ``no_aug_epochs``, ``eval_every_epochs(_tail)``, ``ckpt_every_steps`` >= 0;
    ``test.conf_thre`` / ``iou_thre`` in [0, 1]; image sizes positive multiples of 32
    (:func:`damo_jax.ops.boxes.check_image_size`); the keys of :data:`CHOICES`
    (:func:`check_choices`, which stores their canonical spelling); the model section
    (:func:`validate_model`) and the augmentation recipe (:func:`validate_augmentation`). Every
    command runs it; a training run also checks :func:`validate_recipe`."""
    from damo_jax.errors import ConfigError, is_probability
    from damo_jax.ops.boxes import check_image_size

    def at_least(section, key, low, integer=False):
        if section in cfg and key in cfg[section]:
            value = cfg[section][key]
            kinds = int if integer else (int, float)
            if not isinstance(value, kinds) or isinstance(value, bool) or not value >= low:
                raise ConfigError(f"{where}: {section}.{key} = {value!r} must be "
                                  f"{'an integer ' if integer else ''}>= {low}")

    for section, key in (("train", "batch_size"), ("test", "batch_size"), ("test", "max_dets"),
                         ("test", "pre_nms_topk"), ("train", "log_every_steps"),
                         ("train", "keep_checkpoints"), ("train", "epochs")):
        at_least(section, key, 1, integer=True)
    for key in ("max_steps", "eval_every_epochs", "eval_every_epochs_tail",   # 0: off / per epoch
                "ckpt_every_steps"):
        at_least("train", key, 0, integer=True)
    for key in ("warmup_epochs", "no_aug_epochs"):                             # may be fractional
        at_least("train", key, 0)
    if "test" in cfg:                   # the evaluation / predict thresholds: probabilities
        for key in ("conf_thre", "iou_thre"):
            value = cfg.test.get(key)
            if value is not None and not is_probability(value):
                raise ConfigError(f"{where}: test.{key} = {value!r} must be a number in [0, 1]")
    for section in ("model", "data", "test"):
        if section in cfg and "image_size" in cfg[section]:
            check_image_size(cfg[section]["image_size"], f"{where}: {section}.image_size")
    check_choices(cfg, where)
    if "model" in cfg:
        validate_model(cfg.model, where)
    if hasattr(cfg.get("data"), "get"):
        validate_augmentation(cfg.data, where)
    return cfg


#: the activations the blocks know (models/blocks.py ``activation``)
ACTIVATIONS = ("relu", "silu", "swish", "identity")
#: backbone name -> what its ``depthwise`` key must be (TinyNAS_mob is depthwise by construction,
#: the others have no depthwise form); the key is the official configs', read by no block
_BACKBONE_DEPTHWISE = {"TinyNAS_res": False, "TinyNAS_csp": False, "TinyNAS_mob": True}


#: the neck block of every released model (SPEC §3); the key ``model.neck.block_name`` selects nothing
NECK_BLOCK = "BasicBlock_3x3_Reverse"


def _backbone_last_stage(bb, where: str) -> int:
    """The highest stage index ``backbone.out_indices`` may name: the structure file's stage
    count for TinyNAS_res / _mob, the CSP stage groups for TinyNAS_csp (0 is the stem)."""
    from damo_jax.errors import ConfigError
    from damo_jax.models.structures import load_structure
    try:
        structure = load_structure(str(bb.get("structure")))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: model.backbone.structure: {e}") from e
    if bb.name == "TinyNAS_csp":
        from damo_jax.models.backbone_csp import STAGE_GROUPS
        if len(structure.stages) != sum(map(len, STAGE_GROUPS)):
            raise ConfigError(f"{where}: model.backbone.structure {structure.name!r} has "
                              f"{len(structure.stages)} NAS stages; TinyNAS_csp needs "
                              f"{sum(map(len, STAGE_GROUPS))}")
        return len(STAGE_GROUPS)
    return len(structure.stages)


def validate_model(m, where: str = "config") -> None:
    """The model section's architecture, checked before a model is built (a variant config's
    mistakes were tracebacks deep in Flax, or nothing: a key no block reads): names of the
    backbone / neck / head and activations; three levels everywhere (``backbone.out_indices``,
    ``neck.in_channels`` / ``out_channels``, ``head.in_channels`` / ``strides``), the head reading
    the neck's channels; counts and ranges (``num_classes``, ``reg_max``, ``last_kernel_size`` odd,
    ``hidden_ratio``, ``depth``, ``bn_epsilon``, ``bn_momentum``); ``backbone.out_indices``
    increasing and within the backbone's stages (its structure file); the unsupported options
    (``use_se``, ``neck.spp``, ``neck.block_name``, ``head.stacked_convs``). ConfigError naming
    the key."""
    from damo_jax.errors import ConfigError

    def fail(key, value, what):
        raise ConfigError(f"{where}: model.{key} = {value!r} {what}")

    def ints(value, n=3, low=1):
        return (isinstance(value, (tuple, list)) and len(value) == n
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value))

    number = _is_number

    for part in ("backbone", "neck", "head"):
        if not hasattr(m.get(part), "get"):
            raise ConfigError(f"{where}: model.{part} is missing (start from load_config('<model>') "
                              f"and change it, as configs/demo_ns.py does)")
    bb, nk, hd = m.backbone, m.neck, m.head
    if bb.get("name") not in _BACKBONE_DEPTHWISE:
        fail("backbone.name", bb.get("name"), f"is not a known backbone ({', '.join(_BACKBONE_DEPTHWISE)})")
    if nk.get("name") != "GiraffeNeckV2":
        fail("neck.name", nk.get("name"), "is not a known neck (GiraffeNeckV2)")
    if hd.get("name") != "ZeroHead":
        fail("head.name", hd.get("name"), "is not a known head (ZeroHead)")
    for key, section in (("backbone.act", bb), ("neck.act", nk)):
        if section.get("act") not in ACTIVATIONS:
            fail(key, section.get("act"), f"is not a known activation ({', '.join(ACTIVATIONS)})")
    want = _BACKBONE_DEPTHWISE[bb.name]
    if "depthwise" in bb and bool(bb.depthwise) != want:
        fail("backbone.depthwise", bb.depthwise,
             f"does not fit {bb.name}: it is {'always' if want else 'never'} depthwise (the key "
             f"selects nothing; a depthwise backbone is TinyNAS_mob, the nano models')")
    for key, section, what in (("backbone.use_se", bb, "the SE module (no released model uses it)"),
                               ("neck.spp", nk, "an SPP in the neck (no released model uses it)")):
        if section.get(key.split(".")[1]):
            fail(key, section.get(key.split(".")[1]), f"is not supported: {what}")
    if hd.get("stacked_convs", 0):
        fail("head.stacked_convs", hd.get("stacked_convs"), "is not supported: all released "
             "ZeroHeads use 0 (the head is one conv per level)")
    if nk.get("block_name", NECK_BLOCK) != NECK_BLOCK:
        fail("neck.block_name", nk.get("block_name"), f"is not supported: every released neck is "
             f"built of {NECK_BLOCK} blocks (the one block GiraffeNeckV2 has; the key is the "
             f"official configs')")
    out_indices = bb.get("out_indices")
    if not ints(out_indices, low=0):
        fail("backbone.out_indices", out_indices, "must be 3 stage indices (the neck has 3 levels)")
    if list(out_indices) != sorted(set(out_indices)):
        fail("backbone.out_indices", tuple(out_indices), "must be 3 increasing stage indices (the "
             "backbone returns its stages in order, one output each)")
    last = _backbone_last_stage(bb, where)
    if max(out_indices) > last:
        fail("backbone.out_indices", tuple(out_indices), f"indexes a stage {bb.name} does not have: "
             f"with structure {bb.get('structure')!r} its stages are 0 (the stem) .. {last}")
    for key, value in (("neck.in_channels", nk.get("in_channels")),
                       ("neck.out_channels", nk.get("out_channels")),
                       ("head.in_channels", hd.get("in_channels"))):
        if not ints(value):
            fail(key, value, "must be 3 channel counts >= 1 (strides 8, 16, 32)")
    if tuple(hd.in_channels) != tuple(nk.out_channels):
        fail("head.in_channels", tuple(hd.in_channels), f"must equal model.neck.out_channels "
             f"{tuple(nk.out_channels)} (the head reads the neck's outputs)")
    strides = hd.get("strides", (8, 16, 32))
    if not ints(strides) or list(strides) != sorted(set(strides)):
        fail("head.strides", strides, "must be 3 increasing strides (8, 16, 32 for every released "
             "backbone)")
    for key, low in (("num_classes", 1), ("reg_max", 1)):
        value = hd.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            fail(f"head.{key}", value, f"must be an integer >= {low}")
    k = hd.get("last_kernel_size")
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1 and k % 2 == 1):
        fail("head.last_kernel_size", k, "must be an odd integer >= 1 (a 'same' conv)")
    depth, ratio = nk.get("depth"), nk.get("hidden_ratio")
    if not (number(depth) and depth >= 0):
        fail("neck.depth", depth, "must be a number >= 0")
    if not (number(ratio) and ratio > 0):
        fail("neck.hidden_ratio", ratio, "must be a number > 0")
    narrowest = min(min(nk.in_channels), min(nk.out_channels))
    if not nk.get("depthwise") and int((narrowest - narrowest // 2) * ratio) < 1:
        fail("neck.hidden_ratio", ratio, f"leaves no channel in the neck's narrowest block "
             f"({narrowest} channels)")
    eps, momentum = m.get("bn_epsilon", 1e-3), m.get("bn_momentum", 0.97)
    if not (number(eps) and eps > 0):
        fail("bn_epsilon", eps, "must be a number > 0")
    if not (number(momentum) and 0 <= momentum < 1):
        fail("bn_momentum", momentum, "must be a number in [0, 1) (flax convention: 0.97 = torch's 0.03)")


#: config keys with a fixed set of values (canonical lower-case spelling), checked by
#: :func:`check_choices` (:func:`validate_config`, i.e. for every command)
CHOICES = {("train", "optimizer"): ("sgd", "adamw"), ("data", "loader"): ("process", "grain"),
           ("model", "dtype"): ("float32", "bfloat16", "float16"),
           ("distill", "method"): ("cwd", "mimic")}


def check_choices(cfg, where: str = "config") -> None:
    """Each key of :data:`CHOICES` one of its values, in any letter case; the canonical
    (lower-case) spelling is stored back, since the code using them compares exactly
    (``--config.model.dtype=BFLOAT16`` passed a case-insensitive check, then failed in numpy)."""
    from damo_jax.errors import ConfigError
    for (section, key), allowed in CHOICES.items():
        node = cfg.get(section) if hasattr(cfg, "get") else None
        value = node.get(key) if hasattr(node, "get") else None
        if value is None:
            continue
        canonical = str(value).lower() if isinstance(value, str) else None
        if canonical not in allowed:
            raise ConfigError(f"{where}: {section}.{key} = {value!r} must be one of {', '.join(allowed)}")
        if value != canonical:
            try:
                node[key] = canonical
            except (TypeError, AttributeError) as e:     # a FrozenConfigDict: ask for the spelling
                raise ConfigError(f"{where}: {section}.{key} = {value!r}: write it {canonical!r}") from e


def _is_number(value) -> bool:
    """A real int / float, not a bool, not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _scale_range(value) -> bool:
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and 0 < value[0] <= value[1])


def validate_augmentation(data, where: str = "config") -> None:
    """The ``data`` section's augmentation recipe (what ``AugParams.from_config`` reads), for
    training and ``damo-jax show``: probabilities in [0, 1]; ``mosaic_scale`` / ``mixup_scale``
    (the latter an optional key of config files) ``(low, high)`` with ``0 < low <= high``;
    ``degrees`` in [0, 180]; ``translate`` in [0, 0.5] (the input's centre lands at
    U(0.5 - t, 0.5 + t) x the output size: beyond 0.5 outside the image, with every box);
    ``shear`` in [0, 45) (x and y shears of tan(U(-s, s)) each: at 45 degrees they can flatten
    the image to a line); ``min_box_area`` >= 0. A negative range was numpy's ``high - low < 0``
    traceback; a huge translate trained on images without a box, silently."""
    from damo_jax.errors import ConfigError, is_probability
    number = _is_number
    checks = (("mosaic_scale", _scale_range, "(low, high) with 0 < low <= high"),
              ("mixup_scale", _scale_range, "(low, high) with 0 < low <= high"),
              ("degrees", lambda v: number(v) and 0 <= v <= 180,
               "a number in [0, 180] (rotation by U(-degrees, degrees))"),
              ("translate", lambda v: number(v) and 0 <= v <= 0.5,
               "a number in [0, 0.5] (a fraction of the image size; beyond 0.5 the image's centre, "
               "and every box, can be moved out of the image)"),
              ("shear", lambda v: number(v) and 0 <= v < 45,
               "a number in [0, 45) (degrees; shear by U(-shear, shear) in x and y)"),
              ("min_box_area", lambda v: number(v) and v >= 0, "a number >= 0 (pixels)"))
    for key, ok, what in checks:
        value = data.get(key)
        if value is not None and not ok(value):
            raise ConfigError(f"{where}: data.{key} = {value!r} must be {what}")
    for key in ("mosaic_prob", "mixup_prob", "flip_prob"):
        value = data.get(key)
        if value is not None and not is_probability(value):
            raise ConfigError(f"{where}: data.{key} = {value!r} must be a number in [0, 1]")


def validate_recipe(cfg, where: str = "config") -> ml_collections.ConfigDict:
    """The training recipe's choices and ranges (they failed deep inside a run with a traceback,
    or trained silently with a nonsense value), and a schedule whose warm-up and no-augmentation
    tail fit in the run (``epochs <= no_aug_epochs`` trained at the minimum lr, without
    augmentation, from the first step); the distillation settings (``distill.tau`` > 0, weights
    >= 0, ``min_teacher_ap`` in [0, 1]: ``tau = 0`` compiled, then stopped on a non-finite loss).
    The choices (:func:`check_choices`) and the augmentation (:func:`validate_augmentation`) are
    :func:`validate_config`'s, checked here too for callers of this function alone. Training only:
    a stored run's config is loaded for eval / predict / export whatever its schedule was."""
    from damo_jax.errors import ConfigError

    def get(section, key):
        return cfg[section].get(key) if section in cfg and hasattr(cfg[section], "get") else None

    number = _is_number

    check_choices(cfg, where)
    if hasattr(cfg.get("data"), "get"):
        validate_augmentation(cfg.data, where)
    checks = ((("data", "max_boxes"), lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
              (("train", "base_lr_per_img"), lambda v: number(v) and v > 0, "a number > 0"),
              (("train", "weight_decay"), lambda v: number(v) and v >= 0, "a number >= 0"),
              (("train", "momentum"), lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
              (("train", "ema_decay"), lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
              (("train", "ema_tau"), lambda v: number(v) and v > 0, "a number > 0"),
              (("train", "min_lr_ratio"), lambda v: number(v) and 0 <= v <= 1, "a number in [0, 1] "
               "(the cosine's floor as a fraction of the peak lr; below 0 the lr turns negative)"),
              (("train", "adam_betas"), lambda v: isinstance(v, (tuple, list)) and len(v) == 2
               and all(number(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
              (("train", "adam_eps"), lambda v: number(v) and v > 0, "a number > 0"),
              (("distill", "tau"), lambda v: number(v) and v > 0, "a number > 0 (the CWD "
               "softmax temperature; the logits are divided by it)"),
              (("distill", "weight"), lambda v: number(v) and v >= 0, "a number >= 0"),
              (("distill", "weight_end"), lambda v: number(v) and v >= 0, "a number >= 0"),
              (("distill", "min_teacher_ap"), lambda v: number(v) and 0 <= v <= 1,
               "a number in [0, 1] (an AP)"),
              (("train", "grad_clip"), number, "a number (< 0: official, 0: off)"),
              (("data", "workers"), lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
               "an integer >= 0 (0: batches built in the main process)"),
              (("data", "prefetch"), lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
               "an integer >= 0"))
    for (section, key), ok, what in checks:
        value = get(section, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{where}: {section}.{key} = {value!r} must be {what}")
    epochs, warmup, no_aug = (get("train", k) for k in ("epochs", "warmup_epochs", "no_aug_epochs"))
    if number(epochs) and number(no_aug) and number(warmup) and warmup + no_aug > epochs:
        raise ConfigError(
            f"{where}: train.warmup_epochs ({warmup:g}) + train.no_aug_epochs ({no_aug:g}) > "
            f"train.epochs ({epochs}): the no-augmentation tail, at the minimum lr, would start "
            f"before the warm-up ends (the official recipe: 300 epochs, 5 warm-up, the last 16 "
            f"without augmentation); lower them, e.g. {_fitting_schedule(epochs, warmup, no_aug)}")
    return cfg


def _fitting_schedule(epochs, warmup, no_aug) -> str:
    """Overrides that make warm-up + no-aug tail fit in ``epochs``: the tail shortened when the
    warm-up fits, else both at the official proportions (5 and 16 of 300 epochs)."""
    if warmup <= epochs:
        tail = max(0, int(epochs - warmup) // 5)
        if tail < no_aug:
            return f"--config.train.no_aug_epochs={tail}"
    warm = round(epochs * 5 / 300, 3)
    tail = int(epochs * 16 / 300)
    return f"--config.train.warmup_epochs={warm:g} --config.train.no_aug_epochs={tail}"


def config_value(section, key: str, default=None):
    """``section[key]`` when present and not None, else ``default`` (ConfigDict, dict or None)."""
    try:
        value = section[key]
    except (KeyError, TypeError, AttributeError):
        return default
    return default if value is None else value


def flat_items(cfg, prefix: str = ""):
    """Yield (dotted key, value) for every leaf, for ``--help`` listings and logging."""
    for k, v in cfg.items():
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            yield from flat_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


RUNLOCAL_STEPS = 30


def runlocal(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config for a quick CPU run (the big_vision ``runlocal`` idea): batch 8, a 3-epoch
    schedule of which the run does the first ``RUNLOCAL_STEPS`` steps (``train.max_steps``), then
    one evaluation and one checkpoint — minutes on a 2-core CPU, whatever the data's size."""
    cfg.train.batch_size = 8
    cfg.train.max_steps = RUNLOCAL_STEPS
    cfg.train.epochs = 3
    cfg.train.warmup_epochs = 1
    cfg.train.no_aug_epochs = 1
    cfg.train.eval_every_epochs = 1
    cfg.data.workers = min(cfg.data.workers, os.cpu_count() or 1)
    return cfg
