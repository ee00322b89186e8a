"""Image files: the one set of image suffixes and the listing of a file or folder of images."""
from __future__ import annotations

from pathlib import Path

# What the decoders (PIL / cv2, data_pipelines.imageio) read; readers and predict use this set.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".mpo",
                  ".dng", ".pfm")


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_images(source, *, flag: str = "source") -> list[Path]:
    """The image files of ``source`` (a file, or a folder searched recursively), sorted;
    :class:`~damo_jax.errors.InputPathError` naming ``flag`` when there is none."""
    from damo_jax.errors import InputPathError
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise InputPathError(f"{flag} {source}: no such file or folder")
    files = sorted(p for p in source.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise InputPathError(f"{flag} {source}: the folder has no images "
                             f"({', '.join(IMAGE_SUFFIXES)})")
    return files
