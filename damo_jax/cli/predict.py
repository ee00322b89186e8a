"""``damo-jax predict``: detect objects in an image or a folder, draw and save them.

examples:
  damo-jax predict --checkpoint runs/demo --source photo.jpg
  damo-jax predict --config s --weights damoyolo_s.pth --source images/ --out preds
  damo-jax predict --config s --onnx s.onnx --source images/ --conf 0.4
  damo-jax predict --config s --openvino s.xml --source images/ --img-size 640

Writes <out>/<name> (the image with boxes and class names drawn; same file name and format) and
<out>/detections.json: one entry per image with file, width, height, boxes (x1y1x2y2 original
pixels), scores, labels (0-based) and class_names. Unreadable images in a folder are skipped and
counted; an empty folder is an error.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from damo_jax.cli import common

log = logging.getLogger("damo_jax.cli.predict")
PROG = "damo-jax predict"


def add_arguments(p) -> None:
    p.add_argument("--config", help="model config name or path (class names, size, thresholds)")
    src = p.add_mutually_exclusive_group()
    for name in common.MODEL_SOURCES:
        src.add_argument(f"--{name}", help=common.MODEL_SOURCES[name])
    p.add_argument("--source", required=True, help="an image file or a folder of images")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--conf", type=float, default=0.3, help="score threshold (default 0.3)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default config test.iou_thre)")
    common.add_img_size(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-draw", action="store_true", help="only write detections.json")
    from damo_jax.inference.tiling import add_tile_arguments
    add_tile_arguments(p)
    p.add_argument("--no-progress", action="store_true")


def build_parser(prog: str = PROG):
    return common.command_parser(prog, __doc__, add_arguments)


def load_detector(args, overrides=()):
    from damo_jax.inference.detector import Detector
    from damo_jax.inference.loading import load_model
    size = common.img_size(args.img_size)          # checked before anything is loaded
    loaded = load_model(args.config, overrides=overrides, **common.model_source(args))
    return Detector.from_loaded(loaded, conf=args.conf, iou=args.iou, img_size=size,
                                batch_size=args.batch_size)


def _entry(path: Path, image, result) -> dict:
    return {"file": str(path), "height": int(image.shape[0]), "width": int(image.shape[1]),
            "boxes": [[round(float(v), 2) for v in box] for box in result["boxes"]],
            "scores": [round(float(s), 5) for s in result["scores"]],
            "labels": [int(c) for c in result["labels"]],
            "class_names": list(result["class_names"])}


def _output_name(path: Path, source: Path) -> Path:
    return path.relative_to(source) if source.is_dir() else Path(path.name)


def _save_drawing(target: Path, image, result, detector) -> None:
    from damo_jax.inference.draw import draw_detections
    target.parent.mkdir(parents=True, exist_ok=True)
    draw_detections(image, result["boxes"], result["scores"], result["labels"],
                    detector.class_names).save(target)


def run(args, overrides=()) -> dict:
    from damo_jax.data_pipelines.records import DataError
    from damo_jax.inference.detector import read_image
    from damo_jax.inference.images import list_images

    from damo_jax.inference.tiling import check_tile_arguments
    check_tile_arguments(args)
    files = list_images(args.source, flag="--source")
    source = Path(args.source)
    if source.is_file():  # a single image: an unreadable file is an error (before loading the model)
        read_image(source)
    out_dir = common.output_dir(args.out, "--out")      # before the model loads
    detector = load_detector(args, overrides)
    progress = None
    if not args.no_progress and len(files) > 1:
        from tqdm import tqdm
        progress = tqdm(total=len(files), desc="predict", unit="img")
    entries, skipped, pending = [], [], []
    for index, path in enumerate(files):
        try:
            pending.append((path, read_image(path)))
        except (DataError, ValueError, FileNotFoundError) as e:
            log.warning("skipping %s", e)
            skipped.append(str(path))
        if len(pending) == detector.batch_size or (index == len(files) - 1 and pending):
            if args.tile:  # the windows of each image are batched inside detector.tiled
                results = [detector.tiled(image, tile=args.tile, overlap=args.overlap,
                                          full_image=args.tile_full_image) for _, image in pending]
            else:
                results = detector([image for _, image in pending],
                                   pad_to_batch=len(files) > len(pending))
            for (p, image), result in zip(pending, results):
                entries.append(_entry(p, image, result))
                if not args.no_draw:
                    _save_drawing(out_dir / _output_name(p, source), image, result, detector)
            pending = []
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    summary = {"images": entries, "skipped": skipped, "conf": detector.conf, "iou": detector.iou,
               "image_size": list(detector.image_size)}
    if args.tile:
        summary["tiling"] = {"tile": args.tile, "overlap": args.overlap,
                             "full_image": args.tile_full_image}
    with open(out_dir / "detections.json", "w") as f:
        json.dump(summary, f, indent=1)
    total = sum(len(e["scores"]) for e in entries)
    print(f"{len(entries)} image(s), {total} detection(s), {len(skipped)} skipped -> {out_dir}")
    return summary


def main(argv=None, prog: str = PROG) -> dict:
    return common.run_command(build_parser, run, argv, prog)
