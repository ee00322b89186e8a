"""Images in: the one set of image suffixes, the listing of a file or folder of images, and the
one array -> RGB uint8 converter (used by ``Detector`` and by the dataset decoder
``data_pipelines.imageio`` for 16-bit / float images)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# What the decoders (PIL / cv2, data_pipelines.imageio) read; readers and predict use this set.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".mpo",
                  ".dng", ".pfm")


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(source, *, flag: str = "source") -> list[Path]:
    """The image files of ``source`` (a file, or a folder searched recursively, broken links
    included), sorted;
    :class:`~damo_jax.errors.InputPathError` naming ``flag`` when there is none."""
    return list_images_and_videos(source, flag=flag)[0]


def list_images_and_videos(source, *, flag: str = "source") -> tuple[list[Path], list[Path]]:
    """:func:`list_images`, and the video files the same walk of a folder found (sorted; ``[]``
    for a file): a folder gives its images, the caller names the videos it passes over."""
    from damo_jax.errors import InputPathError, is_url
    from damo_jax.inference.video import is_video_file
    text = str(source)
    source = Path(source)
    if source.is_file():
        return [source], []
    if not source.is_dir():
        if is_url(text):                       # (Path() made https:// https:/)
            raise InputPathError(f"{flag} {text}: a URL; images, folders and video files are read "
                                 f"from local paths only (download it first, e.g. curl -LO {text})")
        hint = (" (camera indices and streams are not read: record a video file and give it)"
                if text.isdigit() else "")
        raise InputPathError(f"{flag} {source}: no such file or folder{hint}")
    # a broken link named like an image is listed too: reading it fails, and the caller skips and
    # counts it (leaving it out made it vanish from the report)
    files, videos = [], []
    for p in _walk_files(source):
        if is_image_file(p) and (p.is_file() or (p.is_symlink() and not p.exists())):
            files.append(p)
        elif is_video_file(p) and p.is_file():
            videos.append(p)
    if not files:
        hint = (f"; it holds {len(videos)} video file(s): give one as {flag} (e.g. {flag} "
                f"{min(videos)})" if videos else "")
        raise InputPathError(f"{flag} {source}: the folder has no images "
                             f"({', '.join(IMAGE_SUFFIXES)}){hint}")
    return sorted(files), sorted(videos)


def _walk_files(folder: Path):
    """Every non-folder entry under ``folder``, following links to folders (a linked folder of
    images is searched; ``Path.rglob`` skipped it silently) but each real folder once (a link loop
    ends)."""
    import os
    seen = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in names:
            yield Path(root) / name


#: largest float value that :func:`to_rgb_uint8` still reads as a 0..1 image (a 0..255 image that
#: dark is black either way)
FLOAT_01_MAX = 1.5


def to_rgb_uint8(arr, *, small_ints_are_8bit: bool = False) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) array -> (H, W, 3) uint8 RGB: gray repeated, alpha dropped;
    uint8 as is; other integers are 16-bit (``/ 257``) — with ``small_ints_are_8bit`` (arrays
    from a caller, whose bit depth is unknown: ``Detector``) only when their maximum is > 255,
    else they are 8-bit values (0..255, as is); floats are 0..1 (``x 255``) when their maximum is
    <= :data:`FLOAT_01_MAX` (1.5: a 0..1 image resized with cubic / Lanczos interpolation overshoots
    1; above 1 is warned), else 0..255; NaN -> 0; rounded and clipped to 0..255. Decoded image files keep the
    default: their bit depth is known (a dark 16-bit file stays 16-bit)."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or 0 in arr.shape:
        raise ValueError(f"image array must be (H, W, 3) RGB (or gray / RGBA), got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == bool:
        values = arr.astype(np.float64) * 255.0
    elif np.issubdtype(arr.dtype, np.integer):
        values = arr.astype(np.float64)
        if not (small_ints_are_8bit and values.max(initial=0.0) <= 255.0):
            values = values / 257.0
    else:
        values = arr.astype(np.float64)
        peak = float(np.nanmax(values, initial=0.0))
        if peak <= FLOAT_01_MAX:
            if peak > 1.0:
                log.warning("a float image with values up to %.3g is read as a 0..1 image (values "
                            "above 1, e.g. from an interpolation's overshoot, are clipped); scale a "
                            "0..255 image that dark to uint8 first", peak)
            values = values * 255.0
    return np.ascontiguousarray(np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8))
