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

import importlib.util
import math
import os
from pathlib import Path
from typing import Sequence

import ml_collections

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
    shear: float,
    mosaic_scale: tuple[float, float] = (0.1, 2.0),
) -> ml_collections.ConfigDict:
    """The full config of one released model (architecture + official training recipe)."""
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
        depthwise=depthwise, spp=False, block_name="BasicBlock_3x3_Reverse")
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

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 300
    c.train.no_aug_epochs = 16
    c.train.warmup_epochs = 5
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
    c.train.grad_clip = 0.0        # 0 = off (the official code clips only when distilling)
    c.train.seed = 0
    c.train.eval_every_epochs = 10
    c.train.eval_every_epochs_tail = 1
    c.train.ckpt_every_steps = 0   # 0 = once per epoch
    c.train.keep_checkpoints = 3
    c.train.log_every_steps = 10
    c.train.finetune = ""          # path to an official .pth / .npz to start from
    c.train.max_steps = 0          # >0 stops early (tests, demos)

    c.test = ml_collections.ConfigDict()
    c.test.image_size = (size, size)
    c.test.conf_thre = 0.03 if nano else 0.05
    c.test.iou_thre = 0.65 if nano else 0.7
    c.test.max_dets = 500
    c.test.pre_nms_topk = 1000     # static candidate cap per image for the jit-able NMS
    c.test.batch_size = 8
    return c


def neck_depth_n(depth: float) -> int:
    """Number of blocks per neck node: Python's banker's ``round(3 * depth)`` (SPEC §0)."""
    return int(round(3 * depth))


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".py" and p.exists():
        return p
    short = name_or_path.lower()
    cand = CONFIG_DIR / f"{short}.py"
    if cand.exists():
        return cand
    known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.py") if not q.stem.startswith("_")))
    raise FileNotFoundError(
        f"config {name_or_path!r}: not a config file path and not a known model name "
        f"(known: {known}; directory {CONFIG_DIR})")


def load_config(name_or_path) -> ml_collections.ConfigDict:
    """Return the ConfigDict of ``configs/<name>.py`` or of a config file path.

    A ConfigDict passed in is returned unchanged, so APIs can take either form.
    """
    if isinstance(name_or_path, ml_collections.ConfigDict):
        return name_or_path
    path = resolve_config_path(str(name_or_path))
    spec = importlib.util.spec_from_file_location(f"damo_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path}: config files must define get_config()")
    cfg = module.get_config()
    return cfg


def _parse_value(text: str, current):
    import ast
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply ``key.sub=value`` overrides (the ``--config.key.sub=value`` CLI form, prefix optional)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, text = item.split("=", 1)
        key = key.removeprefix("--").removeprefix("config.")
        parts = key.split(".")
        node = cfg
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"override {item!r}: unknown config section {p!r}")
            node = node[p]
        leaf = parts[-1]
        if leaf not in node:
            raise KeyError(f"override {item!r}: unknown config key {key!r}")
        node[leaf] = _parse_value(text, node[leaf])
    return cfg


def flat_items(cfg, prefix: str = ""):
    """Yield (dotted key, value) for every leaf, for ``--help`` listings and logging."""
    for k, v in cfg.items():
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            yield from flat_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def iters_per_epoch(num_images: int, batch_size: int) -> int:
    return max(1, math.ceil(num_images / batch_size))


def runlocal(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink a config for a quick CPU run (the big_vision ``runlocal`` idea)."""
    cfg.train.batch_size = 8
    cfg.train.epochs = 3
    cfg.train.warmup_epochs = 1
    cfg.train.no_aug_epochs = 1
    cfg.train.eval_every_epochs = 1
    cfg.data.workers = min(cfg.data.workers, os.cpu_count() or 1)
    return cfg
