"""Small on-disk datasets for the data_pipelines tests (tiny images, written to tmp folders)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# pure, well separated colours per class (RGB) for box/image consistency checks
CLASS_COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255],
                         [0, 255, 255]], np.uint8)


def rect_image(h: int, w: int, boxes, labels, background: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 image with each integer box filled in its class colour."""
    img = np.full((h, w, 3), background, np.uint8)
    for (x1, y1, x2, y2), c in zip(np.asarray(boxes, int), labels):
        img[y1:y2, x1:x2] = CLASS_COLORS[c]
    return img


def random_scene(rng: np.random.Generator, h: int, w: int, max_objects: int = 3, margin: float = 0.1):
    """Non-overlapping rectangles of distinct classes, away from the border: (image, boxes, labels)."""
    boxes, labels = [], []
    classes = rng.permutation(len(CLASS_COLORS))[: int(rng.integers(1, max_objects + 1))]
    for c in classes:
        for _ in range(50):
            bw, bh = int(rng.integers(w // 8, w // 3)), int(rng.integers(h // 8, h // 3))
            x1 = int(rng.integers(int(margin * w), int(w * (1 - margin)) - bw))
            y1 = int(rng.integers(int(margin * h), int(h * (1 - margin)) - bh))
            cand = [x1, y1, x1 + bw, y1 + bh]
            if all(cand[2] + 3 < b[0] or b[2] + 3 < cand[0] or cand[3] + 3 < b[1] or b[3] + 3 < cand[1]
                   for b in boxes):
                boxes.append(cand)
                labels.append(int(c))
                break
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int32)
    return rect_image(h, w, boxes, labels), boxes, labels


def ellipse_scene(rng: np.random.Generator, h: int, w: int, max_objects: int = 3):
    """Like :func:`random_scene` but each object is the filled ellipse inscribed in its rectangle,
    drawn from its polygon: (image, boxes, labels, polygons (K, 2) px per object)."""
    import cv2
    _, boxes, labels = random_scene(rng, h, w, max_objects)
    img = np.zeros((h, w, 3), np.uint8)
    polygons = []
    for (x1, y1, x2, y2), c in zip(boxes, labels):
        centre = ((x1 + x2) / 2, (y1 + y2) / 2)
        t = np.radians(np.arange(0, 360, 4))
        poly = np.stack([centre[0] + (x2 - x1) / 2 * np.cos(t), centre[1] + (y2 - y1) / 2 * np.sin(t)], 1)
        cv2.fillPoly(img, [np.round(poly).astype(np.int32)], CLASS_COLORS[c].tolist())
        polygons.append(poly.astype(np.float32))
    return img, boxes, labels, polygons


def write_coco(root: Path, scenes, *, split: str = "train", names=None, extra_annotations=(),
               category_ids=None, polygons=None) -> Path:
    """COCO layout ``root/annotations/instances_{split}2017.json`` + ``root/{split}2017/*.png``;
    ``polygons``: per scene, per box a (K, 2) px polygon written as its ``segmentation``."""
    names = names or [f"c{k}" for k in range(len(CLASS_COLORS))]
    category_ids = category_ids or [10 + 3 * k for k in range(len(names))]  # non-contiguous ids
    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, anns = [], []
    for i, (img, boxes, labels) in enumerate(scenes):
        fname = f"{i + 1:06d}.png"
        Image.fromarray(img).save(img_dir / fname)
        images.append({"id": i + 1, "file_name": fname, "width": img.shape[1], "height": img.shape[0]})
        for k, (b, l) in enumerate(zip(np.asarray(boxes).tolist(), np.asarray(labels).tolist())):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": category_ids[l],
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1]),
                         "iscrowd": 0})
            if polygons is not None:
                anns[-1]["segmentation"] = [np.asarray(polygons[i][k], float).reshape(-1).tolist()]
    anns.extend(extra_annotations)
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": n} for c, n in zip(category_ids, names)]}
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(data))
    return path


def make_coco_dataset(root: Path, n: int = 6, size=(96, 128), seed: int = 0, max_objects: int = 3):
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, size[0], size[1], max_objects) for _ in range(n)]
    write_coco(root, scenes)
    from damo_jax.data_pipelines import open_dataset
    return open_dataset(f"coco:{root}", "train"), scenes


def color_components(img: np.ndarray, label: int, tol: int = 60):
    """Bounding boxes (x1, y1, x2, y2) of the connected regions of class ``label``'s colour."""
    import cv2
    mask = (np.abs(img.astype(int) - CLASS_COLORS[label].astype(int)).max(-1) < tol).astype(np.uint8)
    n, _, st, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return [(s[0], s[1], s[0] + s[2], s[1] + s[3], s[4]) for s in st[1:n]]
