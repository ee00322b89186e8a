"""``damo-jax show``: draw augmented training samples with their boxes into one PNG.

examples:
  damo-jax show --data demo --out samples.png
  damo-jax show --data coco:/data/coco --config ns --num 8 --step 0
  damo-jax show --data yolo:/data/data.yaml --img-size 320 --no-aug

--step picks the global step (SADA strength grows with step / total; --no-aug shows the no-mosaic
tail). --config takes the augmentation recipe from a model config (default: the official S
recipe; --config.data.KEY=VALUE overrides it); --img-size overrides both the image and the mosaic
size. Alias: python -m damo_jax.data_pipelines.show.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PROG = "damo-jax show"


def add_arguments(p) -> None:
    from damo_jax.cli import common
    common.add_data(p, default="demo")
    p.add_argument("--split", default="train")
    p.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    p.add_argument("--config", default=None, help="model config name/path for the augmentation recipe")
    p.add_argument("--num", type=int, default=8, help="number of samples (default 8)")
    p.add_argument("--step", type=int, default=None, help="global step (default: 3/4 of the schedule)")
    p.add_argument("--total-steps", type=int, default=1000)
    common.add_img_size(p, "image and mosaic size")
    p.add_argument("--size", type=int, default=None, help=argparse_suppress())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-aug", action="store_true", help="show the no-mosaic/mixup tail")


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS  # --size N: old spelling of --img-size N


def build_parser(prog: str = PROG):
    from damo_jax.cli.common import command_parser
    return command_parser(prog, __doc__, add_arguments)


def sample_grid(batch: dict, class_names, cols: int = 4):
    """PIL grid of a train batch's images with their valid ground-truth boxes drawn."""
    from damo_jax.inference.draw import draw_detections, image_grid
    tiles = [draw_detections(img, boxes[valid], None, labels[valid], class_names)
             for img, boxes, labels, valid in zip(batch["images"], batch["gt_boxes"],
                                                  batch["gt_labels"], batch["gt_valid"])]
    return image_grid(tiles, cols=cols, pad=4)


def run(args, overrides=()) -> dict:
    from damo_jax.cli import common
    from damo_jax.data_pipelines import TrainLoader, open_dataset
    from damo_jax.errors import ConfigError

    common.check_data_spec(args.data)
    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    from PIL import Image
    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        raise ConfigError(f"--out {args.out}: not an image file name (use .png or .jpg)")
    common.output_file(args.out, "--out")
    data_cfg = {}
    if args.config or overrides:
        data_cfg = dict(common.load_cli_config(args.config or "s", overrides).data)
    size = common.img_size(args.img_size or ([args.size] if args.size else None))
    if size:
        data_cfg.update(image_size=size, mosaic_size=size)
    ds = open_dataset(args.data, args.split)
    if len(ds) == 0:
        from damo_jax.data_pipelines import DataError
        raise DataError(f"--data {args.data} --split {args.split}: the split has no images")
    total = args.total_steps
    step = args.step if args.step is not None else (3 * total) // 4
    loader = TrainLoader(ds, data_cfg, batch_size=args.num, seed=args.seed, steps_per_epoch=total,
                         total_steps=total, no_aug_start_step=0 if args.no_aug else total, start_step=step,
                         workers=0)
    batch = next(loader)
    sample_grid(batch, ds.class_names, cols=min(4, args.num)).save(args.out)
    n_boxes = int(np.asarray(batch["gt_valid"]).sum())
    print(f"wrote {args.out}: {args.num} samples of {ds!r} at step {step}/{total}, {n_boxes} boxes; "
          f"loader stats {dict(loader.stats)}")
    return {"out": args.out, "boxes": n_boxes, "step": step}


def main(argv=None, prog: str = "python -m damo_jax.data_pipelines.show") -> dict:
    from damo_jax.cli.common import run_command
    return run_command(build_parser, run, argv, prog)


if __name__ == "__main__":
    main()
