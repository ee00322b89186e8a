"""``python -m damo_jax.inference.predict``: detect objects in an image or a folder, draw and save them.

    python -m damo_jax.inference.predict --checkpoint runs/s_demo --source photo.jpg
    python -m damo_jax.inference.predict --config s --weights damoyolo_s.pth --source images/ --out preds
    python -m damo_jax.inference.predict --config s --onnx s.onnx --source images/ --conf 0.4
    python -m damo_jax.inference.predict --config s --openvino s.xml --source images/

Writes ``<out>/<name>`` (the image with boxes and class names drawn; same file name and format)
and ``<out>/detections.json``: one entry per image with ``file``, ``width``, ``height``,
``boxes`` (x1y1x2y2 original pixels), ``scores``, ``labels`` (0-based) and ``class_names``.
Unreadable images in a folder are skipped and counted; an empty folder is an error.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from damo_jax.inference.detector import IMAGE_SUFFIXES, Detector, read_image

log = logging.getLogger("damo_jax.inference.predict")


def list_images(source) -> list[Path]:
    """The image files of ``source`` (a file, or a folder searched recursively), sorted."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"--source {source}: no such file or folder")
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--source {source}: the folder has no images "
                                f"({', '.join(IMAGE_SUFFIXES)})")
    return files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m damo_jax.inference.predict", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="training checkpoint directory")
    src.add_argument("--weights", help="official .pth / converted .npz (needs --config)")
    src.add_argument("--onnx", help="exported ONNX model (needs --config)")
    src.add_argument("--openvino", help="exported OpenVINO model .xml (needs --config)")
    p.add_argument("--config", help="model config name or path (class names, size, thresholds)")
    p.add_argument("--source", required=True, help="an image file or a folder of images")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--conf", type=float, default=0.3, help="score threshold (default 0.3)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default config test.iou_thre)")
    p.add_argument("--img-size", type=int, nargs=2, metavar=("H", "W"), help="network input size")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-draw", action="store_true", help="only write detections.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def load_detector(args) -> Detector:
    common = dict(conf=args.conf, iou=args.iou, img_size=args.img_size, batch_size=args.batch_size)
    if args.checkpoint:
        return Detector.load(args.checkpoint, **common)
    if not args.config:
        raise ValueError("--config is needed with --weights / --onnx / --openvino")
    if args.weights:
        return Detector.load(args.config, weights=args.weights, **common)
    kind, path = ("onnx", args.onnx) if args.onnx else ("openvino", args.openvino)
    return Detector.load(args.config, backend=kind, model_path=path, **common)


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


def run(args) -> dict:
    files = list_images(args.source)
    source = Path(args.source)
    if source.is_file():  # a single image: an unreadable file is an error (before loading the model)
        read_image(source)
    detector = load_detector(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = None
    if not args.no_progress and len(files) > 1:
        from tqdm import tqdm
        progress = tqdm(total=len(files), desc="predict", unit="img")
    entries, skipped, pending = [], [], []
    for index, path in enumerate(files):
        try:
            pending.append((path, read_image(path)))
        except (ValueError, FileNotFoundError) as e:
            log.warning("skipping %s", e)
            skipped.append(str(path))
        if len(pending) == detector.batch_size or (index == len(files) - 1 and pending):
            results = detector([image for _, image in pending], pad_to_batch=len(files) > len(pending))
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
    with open(out_dir / "detections.json", "w") as f:
        json.dump(summary, f, indent=1)
    total = sum(len(e["scores"]) for e in entries)
    print(f"{len(entries)} image(s), {total} detection(s), {len(skipped)} skipped -> {out_dir}")
    return summary


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("damo_jax").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"damo_jax.inference.predict: {e}")


if __name__ == "__main__":
    main()
