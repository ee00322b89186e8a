"""Draw augmented training samples with their boxes into one PNG.

    python -m damo_jax.data_pipelines.show --data demo --out samples.png [--config ns] [--num 8]
        [--step 0] [--size 320] [--seed 0] [--no-aug]

``--step`` picks the global step (SADA strength grows with step / total; ``--no-aug`` shows the
no-mosaic tail). ``--config`` takes the augmentation recipe from a model config (default: the
official S recipe); ``--size`` overrides both the image and the mosaic size.
"""
from __future__ import annotations

import argparse
import colorsys

import cv2
import numpy as np

from damo_jax.data_pipelines import TrainLoader, open_dataset


def _color(k: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((k * 0.618) % 1.0, 0.9, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_boxes(image: np.ndarray, boxes, labels, class_names) -> np.ndarray:
    """RGB uint8 copy of ``image`` with labelled boxes."""
    out = np.ascontiguousarray(image.copy())
    scale = max(0.35, image.shape[0] / 900)
    for box, label in zip(np.asarray(boxes), np.asarray(labels)):
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        color = _color(int(label))
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), color, 1 + image.shape[0] // 400)
        name = class_names[int(label)] if 0 <= int(label) < len(class_names) else str(int(label))
        cv2.putText(out, name, (x1 + 2, max(10, y1 + int(12 * scale / 0.35))), cv2.FONT_HERSHEY_SIMPLEX,
                    scale, color, 1, cv2.LINE_AA)
    return out


def grid(images: list[np.ndarray], cols: int) -> np.ndarray:
    h, w = images[0].shape[:2]
    rows = -(-len(images) // cols)
    canvas = np.full((rows * (h + 4), cols * (w + 4), 3), 255, np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        canvas[r * (h + 4):r * (h + 4) + h, c * (w + 4):c * (w + 4) + w] = im
    return canvas


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo")
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", default="samples.png")
    ap.add_argument("--config", default=None, help="model config name/path for the augmentation recipe")
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--step", type=int, default=None, help="global step (default: 3/4 of the schedule)")
    ap.add_argument("--total-steps", type=int, default=1000)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-aug", action="store_true", help="show the no-mosaic/mixup tail")
    args = ap.parse_args(argv)

    data_cfg = {}
    if args.config:
        from damo_jax.config import load_config
        data_cfg = dict(load_config(args.config).data)
    if args.size:
        data_cfg.update(image_size=(args.size, args.size), mosaic_size=(args.size, args.size))
    ds = open_dataset(args.data, args.split)
    total = args.total_steps
    step = args.step if args.step is not None else (3 * total) // 4
    loader = TrainLoader(ds, data_cfg, batch_size=args.num, seed=args.seed, steps_per_epoch=total,
                         total_steps=total, no_aug_start_step=0 if args.no_aug else total, start_step=step,
                         workers=0)
    batch = next(loader)
    tiles = [draw_boxes(img, boxes[valid], labels[valid], ds.class_names)
             for img, boxes, labels, valid in zip(batch["images"], batch["gt_boxes"], batch["gt_labels"],
                                                  batch["gt_valid"])]
    cv2.imwrite(args.out, cv2.cvtColor(grid(tiles, cols=min(4, len(tiles))), cv2.COLOR_RGB2BGR))
    n_boxes = int(batch["gt_valid"].sum())
    print(f"wrote {args.out}: {len(tiles)} samples of {ds!r} at step {step}/{total}, {n_boxes} boxes; "
          f"loader stats {dict(loader.stats)}")


if __name__ == "__main__":
    main()
