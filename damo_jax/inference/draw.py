"""THE drawing module: detections or ground-truth boxes (boxes + "class [score]" tags) on an image,
and a grid of images. Used by ``damo-jax predict``, training's ``predictions.png`` and
``damo-jax show`` (augmented samples). PIL only."""
from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_color(label: int) -> tuple[int, int, int]:
    """A stable, well-separated RGB colour per class index (golden-ratio hue walk)."""
    hue = (int(label) * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _text_color(rgb) -> tuple[int, int, int]:
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def draw_detections(image, boxes, scores, labels, class_names: Sequence[str] = (), *,
                    score_thr: float = 0.0, line_width: int | None = None) -> Image.Image:
    """Return a copy of ``image`` with the detections drawn.

    image: (H,W,3) uint8 RGB array or PIL image; boxes (N,4) x1y1x2y2 in its pixels; scores (N,)
    or None (ground truth: the tag is the class name only); labels (N,) 0-based class indices
    (names from ``class_names``; the index when missing). Detections with ``score < score_thr``
    are not drawn.
    """
    canvas = image.convert("RGB").copy() if isinstance(image, Image.Image) else Image.fromarray(
        np.asarray(image, dtype=np.uint8)).convert("RGB")
    width, height = canvas.size
    line_width = line_width or max(1, round(min(width, height) / 300))
    font = _font(max(10, round(min(width, height) / 40)))
    draw = ImageDraw.Draw(canvas)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    show_scores = scores is not None
    scores = np.asarray(scores if show_scores else np.ones(len(boxes)), np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(int)
    for box, score, label in sorted(zip(boxes, scores, labels), key=lambda t: t[1]):  # best on top
        if score < score_thr:
            continue
        color = class_color(label)
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=color, width=line_width)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        text = f"{name} {score:.2f}" if show_scores else name
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1  # above the box, else inside it
        tx = min(max(x1, 0), max(width - tw - 4, 0))
        draw.rectangle([tx, ty, tx + tw + 4, ty + th + 4], fill=color)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=_text_color(color), font=font)
    return canvas


def image_grid(images: Sequence, cols: int = 4, *, pad: int = 0) -> Image.Image:
    """Tile equally sized images (PIL or (H,W,3) uint8 arrays) row-major, ``cols`` per row, with
    ``pad`` white pixels between them; white background."""
    tiles = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))
             for im in images]
    if not tiles:
        raise ValueError("image_grid: no images")
    w, h = tiles[0].size
    cols = max(1, min(int(cols), len(tiles)))
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * (w + pad) - pad, rows * (h + pad) - pad), (255, 255, 255))
    for i, tile in enumerate(tiles):
        grid.paste(tile.convert("RGB"), ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid
