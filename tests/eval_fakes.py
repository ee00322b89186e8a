"""Test doubles for eval / predict tests: a colour-box dataset and an "oracle" Flax detector.

Images are dark with filled rectangles in pure colours (class c = channel c at 255, others 0).
``ColorBoxOracle`` finds, per class, the bounding box of the pixels of that colour in the network
input — a deterministic, parameter-light stand-in for a trained detector whose outputs have the
``build_model`` layout (``scores`` (B,A,C), ``boxes`` (B,A,4) in input pixels).
"""
from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

CLASS_NAMES = ("red", "green")
CATEGORY_IDS = (5, 9)


class ColorBoxOracle(nn.Module):
    """A = C anchors; anchor c carries the box of colour c with score 0.9 (0 when absent)."""
    num_classes: int = 2

    @nn.compact
    def __call__(self, images, train: bool = False):
        bias = self.param("bias", nn.initializers.zeros, (1,))  # non-empty variables
        _, h, w, _ = images.shape
        high = images > 127.5
        xs = jnp.arange(w, dtype=jnp.float32)[None, None, :]
        ys = jnp.arange(h, dtype=jnp.float32)[None, :, None]
        boxes, present = [], []
        for c in range(self.num_classes):
            others = [high[..., k] for k in range(3) if k != c]
            mask = high[..., c] & ~others[0] & ~others[1]
            x1 = jnp.min(jnp.where(mask, xs, w), axis=(1, 2))
            y1 = jnp.min(jnp.where(mask, ys, h), axis=(1, 2))
            x2 = jnp.max(jnp.where(mask, xs + 1, 0), axis=(1, 2))
            y2 = jnp.max(jnp.where(mask, ys + 1, 0), axis=(1, 2))
            boxes.append(jnp.stack([x1, y1, x2, y2], -1))
            present.append(jnp.any(mask, axis=(1, 2)))
        boxes = jnp.stack(boxes, 1) + bias                                   # (B, C, 4)
        present = jnp.stack(present, 1)                                      # (B, C)
        scores = 0.9 * present[:, :, None] * jnp.eye(self.num_classes)[None]  # (B, A=C, C)
        return {"scores": scores, "boxes": boxes}


def draw_boxes(height, width, boxes, labels) -> np.ndarray:
    image = np.full((height, width, 3), 20, np.uint8)
    for (x1, y1, x2, y2), label in zip(np.asarray(boxes, int), labels):
        image[y1:y2, x1:x2] = 0
        image[y1:y2, x1:x2, label] = 255
    return image


class ColorBoxDataset:
    """Dataset with the ``data_pipelines.open_dataset`` interface (one box per class per image)."""

    class_names = CLASS_NAMES
    category_ids = CATEGORY_IDS

    def __init__(self, num_images=5, seed=0):
        rng = np.random.default_rng(seed)
        self.records = []
        for i in range(num_images):
            h, w = int(rng.integers(120, 260)), int(rng.integers(120, 400))
            labels = [c for c in range(2) if i == 0 or rng.uniform() < 0.8]
            boxes = []
            for c in labels:  # red in the left half, green in the right half: no overlap
                x0 = 0 if c == 0 else w // 2
                bw, bh = int(rng.integers(w // 5, w // 2 - 4)), int(rng.integers(h // 4, h - 8))
                x1, y1 = x0 + int(rng.integers(0, w // 2 - bw)), int(rng.integers(0, h - bh))
                boxes.append([x1, y1, x1 + bw, y1 + bh])
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
            self.records.append({
                "image": draw_boxes(h, w, boxes, labels), "boxes": boxes,
                "labels": np.asarray(labels, np.int32), "image_id": 1000 + i, "orig_size": (h, w)})

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def to_coco_dict(self) -> dict:
        images, anns = [], []
        for r in self.records:
            h, w = r["orig_size"]
            images.append({"id": r["image_id"], "height": h, "width": w, "file_name": f"{r['image_id']}.png"})
            for box, label in zip(r["boxes"].tolist(), r["labels"].tolist()):
                bw, bh = box[2] - box[0], box[3] - box[1]
                anns.append({"id": len(anns) + 1, "image_id": r["image_id"],
                             "category_id": CATEGORY_IDS[label], "bbox": [box[0], box[1], bw, bh],
                             "area": bw * bh, "iscrowd": 0})
        cats = [{"id": i, "name": n} for i, n in zip(CATEGORY_IDS, CLASS_NAMES)]
        return {"images": images, "annotations": anns, "categories": cats}


def box_iou_numpy(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def write_random_weights(path: Path, cfg, gain: float = 0.5) -> Path:
    """Official-format state_dict (.npz) with the golden numpy recipe, no model init needed.

    ``gain`` 0.5 keeps the class scores unsaturated (about 0.01) for the nano models."""
    from golden_weights import make_state_dict

    from damo_jax.interop.convert import expected_torch_entries
    state_dict = make_state_dict({k: v[2] for k, v in expected_torch_entries(cfg).items()}, gain=gain)
    state_dict["head.integral.project"] = np.arange(cfg.model.head.reg_max + 1, dtype=np.float32)
    np.savez(path, **state_dict)
    return path


def write_two_class_config(path: Path) -> Path:
    path.write_text(
        "from damo_jax.config import load_config\n"
        "def get_config():\n"
        "    c = load_config('ns')\n"
        f"    c.model.head.num_classes = {len(CLASS_NAMES)}\n"
        f"    c.model.class_names = {CLASS_NAMES!r}\n"
        "    return c\n")
    return path


def write_checkpoint(run_dir: Path, cfg, variables, class_names, **meta_extra) -> Path:
    """A training-run folder whose checkpoint holds ``variables`` as the EMA (and raw) weights
    (``meta_extra``: more checkpoint meta entries, e.g. ``category_ids``)."""
    import jax.numpy as jnp

    from damo_jax.train import checkpoint
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
             "opt_state": {"count": jnp.zeros((), jnp.int32)}, "step": jnp.asarray(1, jnp.int32),
             "rng": jnp.zeros((2,), jnp.uint32), "ema_params": variables["params"],
             "ema_batch_stats": variables["batch_stats"]}
    meta = {"config": checkpoint.config_to_json(cfg), "class_names": list(class_names), "step": 1,
            **meta_extra}
    with checkpoint.Checkpoints(Path(run_dir) / "checkpoints") as ck:
        ck.save(1, state, meta, metrics={"AP": 0.0})
    return Path(run_dir)


def write_two_class_run(root: Path) -> tuple[Path, Path, Path]:
    """ns with 2 classes, golden-recipe random weights, test size 64x64, saved as a training run
    in ``root/run``: (run dir, weights .npz, config .py)."""
    from damo_jax.config import load_config
    from damo_jax.interop.convert import from_torch_state_dict, read_state_dict_file
    cfg = load_config(str(write_two_class_config(root / "two_class.py")))
    cfg.test.image_size = (64, 64)
    weights = write_random_weights(root / "w.npz", cfg)
    variables = from_torch_state_dict(read_state_dict_file(weights), cfg)
    return write_checkpoint(root / "run", cfg, variables, CLASS_NAMES), weights, root / "two_class.py"
