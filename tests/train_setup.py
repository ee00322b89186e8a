"""Shared helpers of the training tests: a tiny synthetic COCO folder, a tiny config file, and
subprocess runs of ``python -m damo_jax.train`` on 4 fake CPU devices that share one persistent XLA
compilation cache (so only the first run of a test session pays for compiling the DAMO-YOLO-Ns
train step; set
``DAMO_JAX_TEST_XLA_CACHE=/some/dir`` to keep that cache across sessions while developing).
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMG = 64
CLASSES = ("square", "disc")


def _draw(rng: np.random.Generator, n_obj: int):
    """A 64×64 RGB image with n_obj coloured squares / discs and their exact boxes."""
    img = (rng.uniform(40, 90, size=(IMG, IMG, 3))).astype(np.uint8)
    yy, xx = np.mgrid[:IMG, :IMG]
    anns = []
    for _ in range(n_obj):
        cls = int(rng.integers(0, 2))
        s = int(rng.integers(14, 30))
        x0, y0 = (int(v) for v in rng.integers(0, IMG - s, size=2))
        color = (230, 60, 40) if cls == 0 else (40, 200, 230)
        if cls == 0:
            img[y0:y0 + s, x0:x0 + s] = color
        else:
            r = s / 2
            img[(yy - (y0 + r - 0.5)) ** 2 + (xx - (x0 + r - 0.5)) ** 2 <= r * r] = color
        anns.append((cls, [float(x0), float(y0), float(s), float(s)]))
    return img, anns


def write_coco(root: Path, split: str, n_images: int, seed: int) -> None:
    """root/annotations/instances_<split>.json + root/<split>/*.jpg (the COCO reader layout)."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        img, anns = _draw(rng, int(rng.integers(1, 3)))
        name = f"{split}_{i:03d}.jpg"
        Image.fromarray(img).save(root / split / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "height": IMG, "width": IMG})
        for cls, box in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": cats}))


# A small Ns-shaped network for the training tests: one block per TinyNAS stage, narrow (the Ns
# structure file's classes, kernels and strides). The tests check the training machinery, not the
# architecture (the released networks have golden tests), and XLA compilation of the update step
# is most of their time: this network compiles in a fraction of the full Ns's time.
TINY_STRUCTURE = """[
  {'class': 'ConvKXBNRELU', 'in': 3, 'out': 8, 's': 1, 'k': 3},
  {'class': 'SuperResConvK1KX', 'in': 8, 'out': 16, 's': 2, 'k': 3, 'L': 1, 'btn': 8},
  {'class': 'SuperResConvK1KX', 'in': 16, 'out': 24, 's': 2, 'k': 3, 'L': 1, 'btn': 16},
  {'class': 'SuperResConvK1KX', 'in': 24, 'out': 32, 's': 2, 'k': 3, 'L': 1, 'btn': 16},
  {'class': 'SuperResConvK1KX', 'in': 32, 'out': 40, 's': 1, 'k': 3, 'L': 1, 'btn': 24},
  {'class': 'SuperResConvK1KX', 'in': 40, 'out': 48, 's': 2, 'k': 3, 'L': 1, 'btn': 24},
]
"""
TINY_STRUCTURE_FILE = "tiny_structure.txt"   # written next to the config files that use it

# the lines of a config file's get_config() that turn load_config("ns") into that network
TINY_MODEL_LINES = f'''    c.model.backbone.structure = str(Path(__file__).with_name("{TINY_STRUCTURE_FILE}"))
    c.model.neck.depth = 0.3                 # one block per neck node
    c.model.neck.in_channels = (24, 40, 48)  # structure entries 2, 4, 5 (out_indices)
    c.model.neck.out_channels = (24, 32, 48)
    c.model.head.in_channels = (24, 32, 48)
'''



def write_tiny_config(folder: Path, name: str, text: str) -> Path:
    """``folder/name`` holding the config ``text`` (built with ``TINY_MODEL_LINES``) and, beside it,
    the structure file that config reads; returns the config's path."""
    (folder / TINY_STRUCTURE_FILE).write_text(TINY_STRUCTURE)
    path = folder / name
    path.write_text(text)
    return path


CONFIG_TEMPLATE = '''"""Tiny run for the training tests: a small Ns-shaped network (64x64, batch 4, 2 epochs of 4
steps, SGD).

SGD (not the nano AdamW) so that the multi-device test in tests/test_train_run.py can compare a 1- and a 4-device
step of THIS program (shared with the CLI runs through the persistent XLA cache) without Adam's
first-step amplification of float noise; AdamW numerics are covered by tests/test_optim.py.
"""
from pathlib import Path

from damo_jax.config import load_config


def get_config():
    c = load_config("ns")
''' + TINY_MODEL_LINES + '''    c.data.image_size = (64, 64)
    c.data.mosaic_size = (64, 64)
    c.data.max_boxes = 8
    c.data.workers = 0
    c.train.batch_size = 4
    c.train.optimizer = "sgd"
    c.train.weight_decay = 5e-4
    c.train.epochs = 2
    c.train.warmup_epochs = 1
    c.train.no_aug_epochs = 1
    c.train.eval_every_epochs = 1
    c.train.log_every_steps = 1
    c.train.keep_checkpoints = 5
    c.train.base_lr_per_img = 0.01 / 64
    c.test.image_size = (64, 64)
    c.test.batch_size = 4
    return c
'''


LEARN_CONFIG = '''"""Overfit check: the small Ns-shaped test network on {n} synthetic 64x64 images, evaluated on
the same images.

No augmentation (no mosaic / mixup / flip / SADA), no EMA (its warm-up is thousands of steps),
AdamW at a high learning rate, one evaluation and one checkpoint at the end.
"""
from pathlib import Path

from damo_jax.config import load_config


def get_config():
    c = load_config("ns")
''' + TINY_MODEL_LINES + '''    c.data.image_size = (64, 64)
    c.data.mosaic_size = (64, 64)
    c.data.mosaic_prob = 0.0
    c.data.mixup_prob = 0.0
    c.data.flip_prob = 0.0
    c.data.sada = False
    c.data.max_boxes = 8
    c.data.workers = 0
    c.train.batch_size = {n}
    c.train.epochs = {steps}
    c.train.warmup_epochs = {warmup}
    c.train.no_aug_epochs = 0
    c.train.eval_every_epochs = 0
    c.train.eval_every_epochs_tail = 0
    c.train.ckpt_every_steps = 1000000
    c.train.log_every_steps = 10
    c.train.ema = False
    c.train.base_lr_per_img = {lr} / {n}
    c.train.min_lr_ratio = 0.1
    c.test.image_size = (64, 64)
    c.test.batch_size = {n}
    c.test.conf_thre = 0.05
    return c
'''


def learn_setup(root: Path, n: int = 8, steps: int = 120, warmup: int = 5, lr: float = 0.01) -> tuple[Path, str]:
    """(config file, data spec) of the overfit run: train and val splits hold the SAME images."""
    write_coco(root / "coco", "train", n, seed=7)
    write_coco(root / "coco", "val", n, seed=7)
    cfg = write_tiny_config(root, "learn.py", LEARN_CONFIG.format(n=n, steps=steps, warmup=warmup, lr=lr))
    return cfg, f"coco:{root / 'coco'}"


@functools.lru_cache(maxsize=None)
def shared_dir() -> Path:
    """One folder per test process: data, config, XLA cache."""
    d = Path(tempfile.mkdtemp(prefix="damo_train_test_"))
    atexit.register(shutil.rmtree, d, True)        # removed when the test process ends
    write_coco(d / "coco", "train", 16, seed=1)
    write_coco(d / "coco", "val", 4, seed=2)
    write_tiny_config(d, "tiny.py", CONFIG_TEMPLATE)
    (d / "xla_cache").mkdir()
    return d


def train_cmd(workdir: Path, *extra: str) -> list[str]:
    d = shared_dir()
    return [sys.executable, "-m", "damo_jax.train.loop", "--config", str(d / "tiny.py"),
            "--data", f"coco:{d / 'coco'}", "--workdir", str(workdir), "--no-progress", *extra]


DEVICES = 4


def train_env(**extra: str) -> dict:
    """Subprocess environment: shared XLA cache, 4 fake CPU devices (so the CLI runs are data
    parallel, and the multi-device test in tests/test_train_run.py reuses their compiled 4-device step), only the
    given test hooks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAMO_JAX_TEST_")}
    cache = os.environ.get("DAMO_JAX_TEST_XLA_CACHE") or str(shared_dir() / "xla_cache")
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    env.update(extra)
    return env


def run_train(workdir: Path, *extra: str, timeout: float = 600, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(workdir, *extra), cwd=ROOT, env=train_env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def final_params(workdir: Path, which: str = "model", step="latest"):
    from damo_jax.train.checkpoint import load_for_inference
    _, variables, _ = load_for_inference(workdir, which=which, step=step)
    return variables
