"""Video in and out for ``damo-jax predict --source clip.mp4`` (the official ``tools/demo.py video``
mode): frames decoded by OpenCV, detected in batches by the one :class:`Detector`, drawn into an
MP4 and listed per frame in ``detections.json``.

Frames go to the detector as RGB, like every image path. (The official demo feeds OpenCV's BGR
frames to the model directly, SPEC §10.2: an upstream inconsistency this does not copy.)
The drawn video is MPEG-4 Part 2 (``mp4v``, what the OpenCV wheels can encode everywhere; VLC,
ffmpeg and most players read it, most browsers do not), at the source's frame rate and size (an odd
width / height padded by one black column / row: MPEG-4 needs even sizes).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

log = logging.getLogger("damo_jax.inference.video")

# What OpenCV's FFmpeg backend decodes; predict treats a --source file with one of these as a video.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv",
                  ".flv", ".ts", ".3gp", ".ogv")
DEFAULT_FPS = 25.0          # for a file whose header has no usable frame rate


def is_video_file(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


class VideoReader:
    """The frames of a video file as (H, W, 3) uint8 RGB arrays, in order.

    Opening checks that OpenCV can open the file and decode its first frame; a
    :class:`~damo_jax.data_pipelines.records.DataError` naming the file otherwise. ``fps``,
    ``width``, ``height`` come from the stream (``fps`` falls back to ``DEFAULT_FPS``);
    ``frame_count`` is the container's estimate (0 when it has none), not a promise: iteration
    stops at the first frame that does not decode, and ``frames_read`` counts what it gave."""

    def __init__(self, path):
        import cv2
        from damo_jax.data_pipelines.records import DataError
        from damo_jax.errors import InputPathError
        self.path = Path(path)
        if self.path.is_dir():
            raise InputPathError(f"video {path}: is a folder, expected a video file")
        if not self.path.is_file():
            raise InputPathError(f"video {path}: no such file")
        if self.path.stat().st_size == 0:
            raise DataError(f"video {path}: the file is empty")
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")   # FFmpeg's own lines: quiet
        self._cap = cv2.VideoCapture(str(self.path))
        if not self._cap.isOpened():
            raise DataError(f"video {path}: OpenCV cannot open it (not a video, or a codec this "
                            f"OpenCV build lacks)")
        ok, first = self._cap.read()
        if not ok or first is None:
            self._cap.release()
            raise DataError(f"video {path}: no frame could be decoded")
        self._first = first
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps_from_file = math.isfinite(fps) and 0.0 < fps < 1000.0
        self.fps = fps if self.fps_from_file else DEFAULT_FPS
        self.height, self.width = first.shape[:2]
        count = self._cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if math.isfinite(count) and count > 0 else 0
        self.frames_read = 0

    def __iter__(self):
        import cv2
        from damo_jax.data_pipelines.records import DataError
        frame, self._first = self._first, None
        while frame is not None:
            if frame.shape[:2] != (self.height, self.width):
                raise DataError(f"video {self.path}: frame {self.frames_read} is "
                                f"{frame.shape[1]}x{frame.shape[0]}, the first frame "
                                f"{self.width}x{self.height} (a stream that changes size is not "
                                f"supported)")
            if frame.ndim == 2:
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
            elif frame.shape[-1] == 4:
                frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
            else:
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            self.frames_read += 1
            yield frame
            ok, frame = self._cap.read()
            if not ok:
                frame = None

    def close(self) -> None:
        self._cap.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class VideoWriter:
    """An MP4 (``mp4v``) written from RGB frames to a temporary file beside ``target`` (a unique
    hidden name) and moved onto ``target`` by :meth:`finish`: an interrupted run leaves no file
    that looks complete, and no other file is touched. MPEG-4 needs even sizes: an odd width or
    height is padded by one black column / row (right / bottom), so no source pixel is lost.
    ``OSError`` when OpenCV cannot open the encoder."""

    def __init__(self, target, fps: float, width: int, height: int):
        import secrets

        import cv2
        self.target = Path(target)
        self.size = (int(width), int(height))
        self.padded = (self.size[0] + self.size[0] % 2, self.size[1] + self.size[1] % 2)
        self._tmp = self.target.with_name(
            f".{self.target.stem}.{os.getpid()}.{secrets.token_hex(4)}.partial.mp4")
        self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"),
                                       float(fps), self.padded)
        if not self._writer.isOpened():
            self._tmp.unlink(missing_ok=True)
            raise OSError(f"OpenCV could not open an mp4v encoder for {self._tmp}")

    def write(self, rgb) -> None:
        import cv2
        rgb = np.asarray(rgb, np.uint8)
        if (rgb.shape[1], rgb.shape[0]) != self.size:
            raise ValueError(f"frame of {rgb.shape[1]}x{rgb.shape[0]} in a "
                             f"{self.size[0]}x{self.size[1]} video")
        if self.padded != self.size:
            rgb = np.pad(rgb, ((0, self.padded[1] - self.size[1]),
                               (0, self.padded[0] - self.size[0]), (0, 0)))
        self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def finish(self) -> Path:
        """Close the file and move it onto ``target``; on ``OSError`` the temporary file is removed
        and the error raised."""
        self._writer.release()
        try:
            os.replace(self._tmp, self.target)
        except OSError:
            self._tmp.unlink(missing_ok=True)
            raise
        return self.target

    def abort(self) -> None:
        self._writer.release()
        self._tmp.unlink(missing_ok=True)


def iter_detections(detector, frames, *, tile: dict | None = None):
    """``(frame, result)`` for every RGB frame of the iterable ``frames``, in order, detected in
    batches of ``detector.batch_size`` padded to it (one compiled shape for the whole video);
    ``tile``: ``{"tile", "overlap", "full_image"}`` for :meth:`Detector.tiled` per frame.
    Boxes unclipped, in frame pixels (as ``Detector.__call__``)."""
    pending = []

    def flush():
        if tile is not None:
            results = [detector.tiled(f, tile=tile["tile"], overlap=tile["overlap"],
                                      full_image=tile["full_image"]) for f in pending]
        else:
            results = detector(pending, pad_to_batch=True)
        done = list(zip(pending, results))
        pending.clear()
        return done

    for frame in frames:
        pending.append(frame)
        if len(pending) == detector.batch_size:
            yield from flush()
    if pending:
        yield from flush()


def _frame_entry(index: int, fps: float, result) -> dict:
    return {"frame": index, "time_s": round(index / fps, 4),
            "boxes": [[round(float(v), 2) for v in box] for box in result["boxes"]],
            "scores": [round(float(s), 5) for s in result["scores"]],
            "labels": [int(c) for c in result["labels"]],
            "class_names": list(result["class_names"])}


def predict_video(detector, source, out_dir, *, draw: bool = True, tile: dict | None = None,
                  progress: bool = False) -> dict:
    """Detect every frame of the video ``source`` (a path, or a :class:`VideoReader` not yet
    iterated, which this closes); return the ``detections.json`` summary.

    ``detector``: a :class:`~damo_jax.inference.detector.Detector` (frames go in batches of its
    ``batch_size``, padded to it, so one compiled shape serves the whole video). ``draw``: write
    ``<out_dir>/<stem>.mp4`` with the boxes drawn (a ConfigError when that is the source itself
    or a folder; a failed save is warned and the detections kept). ``tile``: ``{"tile", "overlap", "full_image"}`` for tiled inference per
    frame. Boxes are x1y1x2y2 frame pixels, clipped to the frame."""
    from damo_jax.errors import ConfigError
    from damo_jax.inference.draw import draw_detections
    from damo_jax.ops.boxes import clip_boxes
    reader = source if isinstance(source, VideoReader) else VideoReader(source)
    source, out_dir = reader.path, Path(out_dir)
    frames_out, writer, drawing = [], None, None
    with reader:
        if draw:
            target = out_dir / (source.stem + ".mp4")
            if target.exists() and target.resolve() == source.resolve():
                raise ConfigError(f"the drawing {target} would replace the --source video "
                                  f"(choose another --out)")
            if target.is_dir():
                raise ConfigError(f"the drawing {target}: is a folder (choose another --out)")
            try:
                writer = VideoWriter(target, reader.fps, reader.width, reader.height)
            except OSError as e:
                log.warning("%s; the video is not drawn", e)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=reader.frame_count or None, desc="predict", unit="frame")
        try:
            for frame, result in iter_detections(detector, reader, tile=tile):
                result = dict(result, boxes=clip_boxes(result["boxes"], frame.shape[:2]))
                frames_out.append(_frame_entry(len(frames_out), reader.fps, result))
                if writer is not None:
                    writer.write(np.asarray(draw_detections(
                        frame, result["boxes"], result["scores"], result["labels"],
                        detector.class_names)))
                if bar is not None:
                    bar.update(1)
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
        if writer is not None:
            try:
                drawing = str(writer.finish())
            except OSError as e:
                log.warning("could not save the drawn video %s (%s); the detections are kept",
                            writer.target, e)
        if reader.frame_count and reader.frames_read < reader.frame_count:
            log.warning("video %s: decoded %d of the %d frames its header announces (the rest "
                        "did not decode)", source, reader.frames_read, reader.frame_count)
        video = {"file": str(source), "width": reader.width, "height": reader.height,
                 "fps": reader.fps, "fps_from_file": reader.fps_from_file,
                 "frames": reader.frames_read, "frames_announced": reader.frame_count,
                 "drawing": drawing}
    return {"video": video, "frames": frames_out}
