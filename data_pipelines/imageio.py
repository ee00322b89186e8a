"""Image decoding to (H, W, 3) uint8 RGB with EXIF orientation and annotated-size checks.

PIL reads the header. 8-bit RGB / gray JPEG and PNG files that need no EXIF rotation are then
decoded by OpenCV (the same libjpeg-turbo / libpng pixels, 2-3x faster than PIL); everything else
is decoded by PIL (as the official code). Conversions:

* grayscale ``L``/``1``, palette ``P``, ``CMYK``, ``YCbCr``, ``LA``/``RGBA``/``PA`` →
  ``Image.convert("RGB")`` (alpha is dropped, exactly as the official ``.convert("RGB")``);
* 16-bit (``I;16*``) and 32-bit integer (``I``) images → divided by 257 (65535 → 255), clipped;
  float (``F``) images → assumed 0..1 when max ≤ 1, else 0..255; then gray → RGB.

EXIF orientation (tag 0x0112) — which frame are the boxes in?  When the annotation stores the
image size (COCO, VOC) and the orientation swaps width and height of a non-square image, the
stored size decides: annotated size == transposed size → the boxes are in the displayed (rotated)
frame and the transpose is applied (counted ``exif_rotated``); annotated size == raw size → the
boxes are in the raw pixel frame and the image is NOT rotated (counted ``exif_raw_frame``). When
the stored sizes cannot tell (orientation 2/3/4, square images), the raw frame is used (counted
``exif_raw_frame``), as the official code (PIL ``open().convert("RGB")``, no EXIF transpose, SPEC
§9.2) and pycocotools' COCO, whose annotations were drawn on the raw pixels. When no size is
stored (YOLO, predict) the displayed frame is used and the transpose applied (the convention of
labelling tools and Ultralytics).

Size mismatch: if the decoded image (in the chosen frame) differs from the annotated size, a
warning is logged, ``size_mismatch`` is counted and the image is stretched (cv2 bilinear) to the
annotated size so that boxes, image and ``orig_size`` agree.

Unreadable, truncated, undecodable (whatever the decoder raises), oversized (PIL's decompression
bomb limit) or missing files raise :class:`DataError` naming the file.
"""
from __future__ import annotations

import collections
import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from damo_jax.data_pipelines.records import DataError, log

ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

Source = Union[str, os.PathLike, bytes]


def _open(source: Source, name: str) -> Image.Image:
    try:
        if isinstance(source, (bytes, bytearray)):
            return Image.open(io.BytesIO(source))
        return Image.open(source)
    except FileNotFoundError as e:
        raise DataError(f"{name}: field 'image': file not found") from e
    except UnidentifiedImageError as e:
        raise DataError(f"{name}: field 'image': cannot identify the image format (not an image, "
                        f"or a damaged header)") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: field 'image': cannot read image ({e})") from e


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF blocks: treat as no orientation
        return 1
    return value if 1 <= value <= 8 else 1


def displayed_size(source: Source, name: str | None = None) -> tuple[int, int]:
    """(width, height) after EXIF transpose, reading only the header."""
    name = name or _name(source)
    with _open(source, name) as img:
        w, h = img.size
        if _orientation(img) in _SWAPPING_ORIENTATIONS:
            w, h = h, w
    return int(w), int(h)


def _name(source: Source) -> str:
    return "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)


def _read_bytes(source: Source, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    try:
        with open(source, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise DataError(f"{name}: field 'image': file not found") from e
    except (OSError, ValueError) as e:   # ValueError: a path with a NUL byte
        raise DataError(f"{name}: field 'image': cannot read file ({e})") from e


def _fast_path_ok(img: Image.Image, data: bytes) -> bool:
    """8-bit RGB/gray JPEG or PNG that OpenCV decodes to the same pixels (2-3x faster than PIL).

    A JPEG without its end-of-image marker goes through PIL, which reports truncation
    (OpenCV would silently return a partially grey image).
    """
    if img.mode not in ("RGB", "L"):
        return False
    if img.format == "JPEG":
        return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"
    return img.format == "PNG" and "transparency" not in img.info


def _cv2_decode(data: bytes, w: int, h: int) -> np.ndarray | None:
    """OpenCV's fast decode, or None (the caller then decodes with PIL, which names the defect of a
    broken file in the warning we log: OpenCV's own "[ WARN...] PNG input buffer is incomplete"
    line is held back, it only doubled that warning)."""
    import cv2
    level = cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    finally:
        cv2.utils.logging.setLogLevel(level)
    if arr is None or arr.shape[:2] != (h, w) or arr.dtype != np.uint8:
        return None
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):   # 16/32-bit gray: the one converter's rules
        from damo_jax.inference.images import to_rgb_uint8
        return to_rgb_uint8(np.asarray(img))
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def decode_image(source: Source, *, annotated_size: tuple[int, int] | None = None,
                 stats: collections.Counter | None = None, name: str | None = None) -> np.ndarray:
    """Decode ``source`` (path or encoded bytes) to (H, W, 3) uint8 RGB; see module docstring.

    ``annotated_size`` is (width, height) of the annotation frame, or None.
    """
    import cv2

    stats = stats if stats is not None else collections.Counter()
    name = name or _name(source)
    data = _read_bytes(source, name)
    img = _open(data, name)
    try:
        raw_w, raw_h = img.size
        orientation = _orientation(img)
        swapped = orientation in _SWAPPING_ORIENTATIONS
        transpose = orientation != 1
        if annotated_size is not None and transpose:
            sizes_tell = swapped and raw_w != raw_h
            if not sizes_tell or tuple(annotated_size) == (raw_w, raw_h):
                transpose = False
                stats["exif_raw_frame"] += 1
            elif tuple(annotated_size) == (raw_h, raw_w):
                stats["exif_rotated"] += 1
        arr = None
        if not transpose and _fast_path_ok(img, data):
            arr = _cv2_decode(data, raw_w, raw_h)
        if arr is None:
            try:
                img.load()
                if transpose:
                    img = ImageOps.exif_transpose(img)
                arr = _to_rgb_array(img)
            except (MemoryError, RecursionError):
                raise
            except Exception as e:  # noqa: BLE001 - decoder plugins raise many types on bad data
                raise DataError(f"{name}: field 'image': cannot decode image "
                                f"({type(e).__name__}: {e})") from e
    finally:
        img.close()
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{name}: field 'image': decoded to an empty array {arr.shape}")
    if annotated_size is not None:
        aw, ah = int(annotated_size[0]), int(annotated_size[1])
        if (arr.shape[1], arr.shape[0]) != (aw, ah):
            stats["size_mismatch"] += 1
            log.warning("%s: decoded size %dx%d differs from the annotated size %dx%d; "
                        "stretching the image to the annotated size", name, arr.shape[1],
                        arr.shape[0], aw, ah)
            arr = cv2.resize(arr, (aw, ah), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(arr)
