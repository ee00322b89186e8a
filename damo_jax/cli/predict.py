"""``damo-jax predict``: detect objects in an image, a folder of images or a video, draw and save them.

examples:
  damo-jax predict --checkpoint runs/demo --source photo.jpg
  damo-jax predict --config s --weights damoyolo_s.pth --source images/ --out preds
  damo-jax predict --config s --onnx s.onnx --source images/ --conf 0.4
  damo-jax predict --onnx s.onnx --source images/      # config from the file's export metadata
  damo-jax predict --checkpoint runs/demo --onnx demo.onnx --source images/   # the run's names
  damo-jax predict --config s --openvino s.xml --source images/ --img-size 640
  damo-jax predict --checkpoint runs/demo --source clip.mp4      # video: <out>/clip.mp4 drawn
  damo-jax predict --checkpoint runs/demo --source images/ --classes circle 2 --save-txt --save-conf

Writes <out>/<name> (the image with boxes and class names drawn; same file name and format;
<name>.png for a format PIL cannot write, e.g. .dng) and <out>/detections.json: one entry per image
with file, width, height, boxes (x1y1x2y2 original pixels, clipped to the image; the Python
``Detector`` and ``eval`` keep the official unclipped decode), scores, labels (0-based) and
class_names. Unreadable images in a folder are skipped and counted; an empty folder is an error.
A video --source (.mp4, .avi, .mov, .mkv, ...: OpenCV decodes it) gives <out>/<stem>.mp4 (mp4v, the
source's size and frame rate) and a detections.json with "video" (file, size, fps, frames) and
"frames": one entry per frame with frame, time_s, boxes, scores, labels, class_names.
--save-txt also writes <out>/labels/<stem>.txt per image (<stem>_<frame>.txt per video frame;
<name>.txt, e.g. photo.jpg.txt, for images whose stems collide in one folder): one
YOLO line "label cx cy w h" per detection, normalised by the image width / height, with --save-conf
the score appended; an image without detections gets an empty file. --classes keeps only the given
classes (names or 0-based indices; the others are dropped before NMS, so they take no --max-dets
place). The labels (in detections.json, and in the .txt files) are 0-based indices into
class_names; a --checkpoint run trained on YOLO data whose data.yaml class ids are not 0..K-1
(names: {1: cat, 2: dog}) writes those ids in the .txt files instead, so they read back with it.
An --end2end ONNX file (or its OpenVINO IR) runs its own NMS: its IoU threshold and topk K apply;
--conf above its score threshold (e.g. the default 0.3) and --max-dets up to K filter its rows; an
--iou other than its own, a --conf below its threshold or a --max-dets above K is an error.
--out may not be the --source folder or lie inside it (drawings would replace the inputs / be
scanned as inputs next time), and a drawing is never written over an input file.
"""
from __future__ import annotations

import json
import logging
from itertools import islice
from pathlib import Path

from damo_jax.cli import common
from damo_jax.errors import ConfigError

log = logging.getLogger("damo_jax.cli.predict")
PROG = "damo-jax predict"
PREDICT_CONF = 0.3


def add_arguments(p) -> None:
    common.add_model_source(p, run_config_for_exports=True, config_help=(
        "model config name or path, or a training run directory (class names, size, thresholds); "
        "optional with --onnx / --openvino files that damo-jax exported (their metadata holds them)"))
    p.add_argument("--source", required=True, help="an image file, a folder of images, or a "
                   "video file (.mp4, .avi, .mov, .mkv, ...)")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--conf", type=float, help=f"score threshold (default {PREDICT_CONF}, or "
                                               "--config.test.conf_thre when given)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default config test.iou_thre)")
    p.add_argument("--max-dets", type=int, help="detections kept per image (default config "
                                                 "test.max_dets, 500)")
    common.add_img_size(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-draw", action="store_true", help="only write detections.json")
    p.add_argument("--classes", nargs="+", metavar="CLASS",
                   help="keep only these classes: names or 0-based indices (e.g. --classes 0 car)")
    p.add_argument("--save-txt", action="store_true", help="also write <out>/labels/<name>.txt: "
                   "YOLO lines 'label cx cy w h' (normalised) per image / video frame")
    p.add_argument("--save-conf", action="store_true", help="with --save-txt: append the score")
    from damo_jax.inference.tiling import add_tile_arguments
    add_tile_arguments(p)
    p.add_argument("--no-progress", action="store_true")


def build_parser(prog: str = PROG):
    return common.command_parser(prog, __doc__, add_arguments)


def check_flags_vs_overrides(args, overrides) -> None:
    """ConfigError when a flag and ``--config.test.KEY`` both set one threshold or the size."""
    common.refuse_flag_and_override(
        overrides, ("--conf", args.conf, ("test.conf_thre",)), ("--iou", args.iou, ("test.iou_thre",)),
        ("--max-dets", args.max_dets, ("test.max_dets",)),
        ("--img-size", args.img_size, ("test.image_size",)))


def predict_conf(args, overrides=()) -> float | None:
    """--conf; else --config.test.conf_thre (None: the config's); else PREDICT_CONF, above the
    evaluation threshold because the drawings are for people."""
    from damo_jax.config import override_key
    if args.conf is not None or any(override_key(o) == "test.conf_thre" for o in overrides):
        return args.conf
    return PREDICT_CONF


def load_detector(args, overrides=()):
    """The Detector of the command's flags (``run`` checked them, check_flags_vs_overrides first)."""
    from damo_jax.inference.detector import Detector, resolve_classes
    size = common.img_size(args.img_size)
    conf = predict_conf(args, overrides)
    loaded = common.load_model_from_args(args, overrides)
    common.check_end2end_flags(loaded.backend, args, overrides, loaded.cfg.test)
    classes = resolve_classes(getattr(args, "classes", None), loaded.class_names, "--classes ")
    return Detector.from_loaded(loaded, conf=conf, iou=args.iou, img_size=size,
                                max_dets=args.max_dets, batch_size=args.batch_size, classes=classes)


def warn_earlier_results(out_dir: Path) -> None:
    """A warning when ``out_dir`` holds an earlier run's ``detections.json``: this run replaces it
    and the files of the same names, and the earlier run's other drawings / labels stay beside
    them (Ultralytics would start a new predict2 folder)."""
    if (out_dir / "detections.json").is_file():
        log.warning("--out %s holds the results of an earlier run: detections.json and the files "
                    "this run writes are replaced, the earlier run's other files stay (give a new "
                    "--out to keep the runs apart)", out_dir)


def yolo_class_ids(args, class_names) -> list[int] | None:
    """The class column of ``--save-txt`` for a ``--checkpoint`` run trained on YOLO data whose
    data.yaml class ids are not 0..K-1 (e.g. ``names: {1: cat, 2: dog}``): those ids (label k ->
    ``ids[k]``), so that the lines read back with that data.yaml as the same classes; None (the
    0-based labels) otherwise — other weights, other data formats (a COCO-trained model writes
    0..K-1, the Ultralytics convention), or ids that are 0..K-1 already."""
    if not getattr(args, "checkpoint", None):
        return None
    from damo_jax.data_pipelines import DataError, spec_kind
    from damo_jax.train.checkpoint import config_from_json, load_meta
    meta = load_meta(args.checkpoint)
    ids = [int(c) for c in meta.get("category_ids") or ()]
    try:
        kind = spec_kind(str(config_from_json(meta["config"]).data.train or ""))[0]
    except DataError:
        return None
    if kind != "yolo" or len(ids) != len(class_names) or ids == list(range(len(ids))):
        return None
    log.info("--save-txt: class ids of the run's data.yaml (%s), not 0-based labels",
             ", ".join(f"{i} {n}" for i, n in zip(ids, class_names)))
    return ids


def write_yolo_txt(target: Path, entry: dict, width: int, height: int, with_conf: bool,
                   class_ids=None) -> None:
    """``entry``'s detections (``boxes`` x1y1x2y2 pixels, ``labels``, ``scores``) as YOLO lines
    ``label cx cy w h [score]`` normalised by ``width`` / ``height`` (an empty file: none);
    ``class_ids``: the id written for each label (:func:`yolo_class_ids`), else the label."""
    lines = []
    for (x1, y1, x2, y2), label, score in zip(entry["boxes"], entry["labels"], entry["scores"]):
        values = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
        lines.append(f"{int(class_ids[label] if class_ids else label)} "
                     + " ".join(f"{v:.6f}" for v in values)
                     + (f" {float(score):.5f}" if with_conf else ""))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(line + "\n" for line in lines))


def _entry(path: Path, image, result) -> dict:
    return {"file": str(path), "height": int(image.shape[0]), "width": int(image.shape[1]),
            "boxes": [[round(float(v), 2) for v in box] for box in result["boxes"]],
            "scores": [round(float(s), 5) for s in result["scores"]],
            "labels": [int(c) for c in result["labels"]],
            "class_names": list(result["class_names"])}


def _output_name(path: Path, source: Path) -> Path:
    return path.relative_to(source) if source.is_dir() else Path(path.name)


def label_names(files, source: Path) -> dict:
    """``{image: labels/ file name}`` for ``--save-txt``: ``<stem>.txt`` (the YOLO pairing), and
    ``<name>.txt`` (e.g. ``photo.jpg.txt``, warned) for images whose stems collide in one folder
    (``photo.jpg`` and ``photo.png`` would write the same file and the first one's boxes would be
    lost). ConfigError if names still collide after that (``a.jpg``, ``a.png``, ``a.jpg.png``)."""
    from collections import Counter
    names = {p: _output_name(p, source).with_suffix(".txt") for p in files}
    counts = Counter(names.values())
    clashing = [p for p, n in names.items() if counts[n] > 1]
    for p in clashing:
        full = _output_name(p, source)
        names[p] = full.with_name(full.name + ".txt")
    if clashing:
        log.warning("--save-txt: %d image(s) share a file stem with another image in the same "
                    "folder (e.g. %s); their labels are written as <name>.txt (e.g. labels/%s), "
                    "not <stem>.txt", len(clashing), clashing[0], names[clashing[0]])
        counts = Counter(names.values())
        still = sorted(str(p) for p, n in names.items() if counts[n] > 1)
        if still:
            raise ConfigError(f"--save-txt: images {', '.join(still[:3])} would write the same "
                              f"label file; rename one of them")
    return names


def check_out_vs_source(out, source) -> None:
    """ConfigError when ``--out`` is the ``--source`` folder or inside it (the drawings would
    replace the input images, and a later recursive scan would pick them up as inputs), or when
    it is the folder of a single ``--source`` image (its drawing would be written over it) or
    video (its drawing ``<stem>.mp4`` could replace another file there)."""
    from damo_jax.inference.video import is_video_file
    out_r, src_r = Path(out).resolve(), Path(source).resolve()
    if src_r.is_dir():
        if out_r == src_r:
            raise ConfigError(f"--out {out}: is the --source folder; the drawings would replace "
                              f"the input images (choose another --out)")
        if out_r.is_relative_to(src_r):
            raise ConfigError(f"--out {out}: lies inside the --source folder {source}; the "
                              f"drawings would be read as input images by the next run (choose "
                              f"an --out outside it)")
    elif out_r / src_r.name == src_r:
        what = ("the drawn video (<stem>.mp4) would land among the input files and could replace "
                "one" if is_video_file(src_r) else "the drawing would replace the input image")
        raise ConfigError(f"--out {out}: is the folder of --source {source}; {what} (choose "
                          f"another --out, or --no-draw)")


def _file_id(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _writable_suffix(suffix: str) -> bool:
    from PIL import Image
    Image.init()
    fmt = Image.registered_extensions().get(suffix.lower())
    return fmt is not None and fmt in Image.SAVE


def _save_drawing(target: Path, image, result, detector, inputs: set) -> Path | None:
    """Draw and save; returns the file written, or None (warned) when it could not be. Never
    writes over an input file (``inputs``: (device, inode) of every input); a suffix PIL cannot
    write (.dng, ...) is saved as ``<name>.png``; a failed save never stops the run."""
    from damo_jax.inference.draw import draw_detections
    if not _writable_suffix(target.suffix):
        png = target.with_name(target.name + ".png")
        log.info("%s: PIL cannot write %s files; the drawing is saved as %s", target.name,
                 target.suffix, png.name)
        target = png
    if _file_id(target) in inputs:
        log.warning("not drawing %s: it is an input image (the drawing would replace it)", target)
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        canvas = draw_detections(image, result["boxes"], result["scores"], result["labels"],
                                 detector.class_names)
        try:
            canvas.save(target)
        except (OSError, ValueError, KeyError) as e:       # the format refuses this image
            png = target.with_name(target.name + ".png")
            if target.suffix.lower() == ".png" or _file_id(png) in inputs:
                raise
            log.warning("could not save the drawing %s (%s); saved as %s", target, e, png.name)
            target.unlink(missing_ok=True)
            canvas.save(png)
            target = png
    except (OSError, ValueError, KeyError) as e:
        log.warning("could not save the drawing %s (%s); skipped", target, e)
        return None
    return target


def run(args, overrides=()) -> dict:
    from damo_jax.data_pipelines.records import DataError
    from damo_jax.inference.detector import read_image
    from damo_jax.inference.images import list_images_and_videos
    from damo_jax.inference.video import is_video_file
    from damo_jax.ops.boxes import clip_boxes

    from damo_jax.inference.pipeline import check_detection_options
    from damo_jax.inference.tiling import check_tile_arguments
    check_tile_arguments(args)
    check_flags_vs_overrides(args, overrides)
    check_detection_options(conf=args.conf, iou=args.iou, max_dets=args.max_dets,
                            batch_size=args.batch_size)
    if args.save_conf and not args.save_txt:
        raise ConfigError("--save-conf appends scores to the --save-txt files: give --save-txt too")
    source = Path(args.source)
    if source.is_file() and is_video_file(source):
        return _run_video(args, overrides, source)
    files, videos = list_images_and_videos(args.source, flag="--source")
    if source.is_file():  # a single image: an unreadable file is an error (before loading the model)
        _read_single_image(source)
    if videos:
        log.warning("%d video file(s) in %s are not read (a folder gives its images; give a video "
                    "as --source, e.g. --source %s)", len(videos), source, videos[0])
    if not args.no_draw or source.is_dir():
        check_out_vs_source(args.out, source)
    out_dir = common.output_dir(args.out, "--out")      # before the model loads
    warn_earlier_results(out_dir)
    inputs = {i for i in map(_file_id, files) if i is not None}
    txt_names = label_names(files, source) if args.save_txt else {}
    detector = load_detector(args, overrides)
    txt_ids = yolo_class_ids(args, detector.class_names) if args.save_txt else None
    progress = None
    if not args.no_progress and len(files) > 1:
        from tqdm import tqdm
        progress = tqdm(total=len(files), desc="predict", unit="img")
    entries, skipped, pending, not_drawn = [], [], [], []
    reasons: dict[str, str] = {}       # skipped file -> why (detections.json "skipped_reasons")
    for index, path in enumerate(files):
        try:
            pending.append((path, read_image(path)))
        except (DataError, ValueError, FileNotFoundError) as e:
            log.warning("skipping %s", e)
            skipped.append(str(path))
            reasons[str(path)] = str(e)
        if len(pending) == detector.batch_size or (index == len(files) - 1 and pending):
            if args.tile:  # the windows of each image are batched inside detector.tiled
                results = [detector.tiled(image, tile=args.tile, overlap=args.overlap,
                                          full_image=args.tile_full_image) for _, image in pending]
            else:
                results = detector([image for _, image in pending],
                                   pad_to_batch=True if len(files) > detector.batch_size else None)
            for (p, image), result in zip(pending, results):
                result = dict(result, boxes=clip_boxes(result["boxes"], image.shape[:2]))
                entries.append(_entry(p, image, result))
                if args.save_txt:
                    write_yolo_txt(out_dir / "labels" / txt_names[p],
                                   entries[-1], image.shape[1], image.shape[0], args.save_conf,
                                   txt_ids)
                if not args.no_draw and _save_drawing(out_dir / _output_name(p, source), image,
                                                      result, detector, inputs) is None:
                    not_drawn.append(str(p))
            pending = []
        if progress is not None:
            progress.update(1)
    if progress is not None:
        progress.close()
    summary = {"images": entries, "skipped": skipped, "skipped_reasons": reasons,
               "conf": detector.conf, "iou": detector.iou,
               "image_size": list(detector.image_size), "not_drawn": not_drawn,
               "videos_not_read": [str(p) for p in videos]}
    if args.tile:
        summary["tiling"] = {"tile": args.tile, "overlap": args.overlap,
                             "full_image": args.tile_full_image}
    with open(out_dir / "detections.json", "w") as f:
        json.dump(summary, f, indent=1)
    if skipped and not entries:         # a batch job must not read this as a run that worked
        raise DataError(f"--source {source}: none of its {len(skipped)} image(s) could be read "
                        f"(reasons in the warnings above and in {out_dir / 'detections.json'})")
    total = sum(len(e["scores"]) for e in entries)
    drawn = f", {len(not_drawn)} not drawn (see the log)" if not_drawn else ""
    hint = ""
    if entries and not total and not args.tile:
        readable = (p for p in files if str(p) not in skipped)
        hint = _nothing_found_hint(detector, [read_image(p) for p in islice(readable, 4)],
                                   "image(s)")
    print(f"{len(entries)} image(s), {total} detection(s), {len(skipped)} skipped{drawn} "
          f"-> {out_dir}{hint}")
    return summary


def _read_single_image(path: Path):
    """A single --source file that is not a video: read it (errors before the model loads); a file
    that is neither a known image nor a known video suffix says which suffixes are read."""
    from damo_jax.data_pipelines.records import DataError
    from damo_jax.inference.detector import read_image
    from damo_jax.inference.images import IMAGE_SUFFIXES
    from damo_jax.inference.video import VIDEO_SUFFIXES
    try:
        return read_image(path)
    except DataError as e:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise
        raise DataError(f"{e.args[0] if e.args else e} (--source reads images: "
                        f"{' '.join(IMAGE_SUFFIXES)}; videos: {' '.join(VIDEO_SUFFIXES)})") from e


def _run_video(args, overrides, source: Path) -> dict:
    """``--source`` is a video file: every frame detected, ``<out>/<stem>.mp4`` drawn (unless
    --no-draw), ``<out>/detections.json`` with one entry per frame."""
    from damo_jax.inference.video import VideoReader, predict_video
    if not args.no_draw:
        check_out_vs_source(args.out, source)
    reader = VideoReader(source)          # an unreadable video is an error before the model loads
    try:
        out_dir = common.output_dir(args.out, "--out")
        warn_earlier_results(out_dir)
        detector = load_detector(args, overrides)
    except BaseException:
        reader.close()
        raise
    tile = ({"tile": args.tile, "overlap": args.overlap, "full_image": args.tile_full_image}
            if args.tile else None)
    summary = predict_video(detector, reader, out_dir, draw=not args.no_draw, tile=tile,
                            progress=not args.no_progress)
    summary.update(conf=detector.conf, iou=detector.iou, image_size=list(detector.image_size))
    if args.save_txt:
        width, height = summary["video"]["width"], summary["video"]["height"]
        txt_ids = yolo_class_ids(args, detector.class_names)
        for entry in summary["frames"]:
            write_yolo_txt(out_dir / "labels" / f"{source.stem}_{entry['frame']}.txt", entry,
                           width, height, args.save_conf, txt_ids)
    if tile:
        summary["tiling"] = tile
    with open(out_dir / "detections.json", "w") as f:
        json.dump(summary, f, indent=1)
    video = summary["video"]
    total = sum(len(e["scores"]) for e in summary["frames"])
    drawn = f", drawn to {video['drawing']}" if video["drawing"] else (
        "" if args.no_draw else ", not drawn (see the log)")
    hint = ""
    if not total and video["frames"] and not tile:
        with VideoReader(source) as again:
            hint = _nothing_found_hint(detector, list(islice(again, 4)), "frame(s)")
    print(f"video {source.name}: {video['frames']} frame(s) at {video['fps']:g} fps, {total} "
          f"detection(s){drawn} -> {out_dir}{hint}")
    return summary


def _nothing_found_hint(detector, images, what: str) -> str:
    """``"; the highest score in the first 4 image(s) is 0.12 < --conf 0.3: lower --conf ..."``:
    a second look at ``images`` (RGB arrays) with no score threshold, when nothing passed --conf."""
    from damo_jax.inference.detector import Detector
    loose = Detector(detector.backend, class_names=detector.class_names,
                     image_size=detector.image_size, conf=0.0, iou=detector.iou, max_dets=1,
                     batch_size=detector.batch_size)
    best = max((float(max(r["scores"], default=0.0)) for r in loose(images)), default=0.0)
    return (f"; the highest score in the first {len(images)} {what} is {best:.3g} < --conf "
            f"{detector.conf:g}: lower --conf to see weaker detections")


def main(argv=None, prog: str = PROG) -> dict:
    return common.run_command(build_parser, run, argv, prog)
