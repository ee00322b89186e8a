"""The bundled demo dataset (``--data demo``): procedurally generated, no download.

Six shape classes whose fill is a random patch of a real photo, pasted on real-photo backgrounds
(scikit-image's bundled images and scikit-learn's two sample images, read from the installed
packages' files, never fetched). Objects span all three strides, overlap (each box is the tight
box of the object's VISIBLE pixels; objects less than ``MIN_VISIBLE`` visible are dropped), can be
cut by the border, and share the image with unlabelled distractors (thin bars, elongated ellipses,
text); noise and blur are added. Validation backgrounds are photos never used in training.

Generation is deterministic (image ``i`` of split ``s`` uses ``default_rng((SEED, s, i))``), done
once into ``$DAMO_JAX_CACHE/demo_v1`` (default ``~/.cache/damo_jax``) as COCO JSON + JPEG, written
to a temporary folder first and renamed into place, so ``open_dataset("demo", split)`` exercises
the real COCO reader. ``demo:<size>`` (e.g. ``demo:640``) generates the same scenes at another size.
The difficulty knobs are the constants below (changing them regenerates the cache).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

# ---- difficulty knobs ----------------------------------------------------------------------------
VERSION = 1
SEED = 4242
CLASS_NAMES = ("circle", "square", "triangle", "star", "ring", "cross")
IMAGE_SIZE = 320
NUM_TRAIN, NUM_VAL = 800, 100
OBJECTS_PER_IMAGE = (1, 6)          # inclusive range
OBJECT_SIZE = (0.08, 0.55)          # object diameter / image side, log-uniform
MIN_VISIBLE = 0.4                   # drop objects with less of their area visible
MIN_BOX_PX = 4                      # and objects whose visible box is thinner (pixels at this size)
BORDER_PROB = 0.15                  # chance an object centre is drawn near the border (truncation)
OUTLINE = 0.03                      # outline width / object diameter (0 = none)
DISTRACTORS = (0, 3)                # unlabelled shapes per image, inclusive
NOISE_SIGMA = (0.0, 6.0)            # additive Gaussian noise std (0..255 scale)
BLUR_PROB = 0.25
JPEG_QUALITY = 92
TRAIN_BACKGROUNDS = ("astronaut", "chelsea", "rocket", "china", "retina", "grass", "brick", "camera",
                     "moon", "motorcycle_left", "coins", "ihc", "hubble_deep_field", "cell", "clock_motion")
VAL_BACKGROUNDS = ("flower", "coffee", "gravel", "page")
FILL_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower", "retina", "ihc", "color",
               "motorcycle_left", "grass", "brick", "gravel")
_SPLIT_CODE = {"train": 0, "val": 1}


def _package_dir(package: str) -> Path:
    """Installed folder of a package, found without importing it (sklearn imports are slow)."""
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} (needed for the demo photos) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _photo_path(name: str) -> Path:
    if name in ("china", "flower"):
        return _package_dir("sklearn") / "datasets" / "images" / f"{name}.jpg"
    folder = _package_dir("skimage") / "data"
    for suffix in (".png", ".jpg"):
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    raise FileNotFoundError(f"bundled photo {name!r} not found in {folder}")


@lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
    """A bundled photo as (H, W, 3) uint8 RGB (grayscale photos are replicated to 3 channels)."""
    from PIL import Image
    with Image.open(_photo_path(name)) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), np.uint8))


def _crop(rng, photo: np.ndarray, out_h: int, out_w: int, min_frac: float) -> np.ndarray:
    h, w = photo.shape[:2]
    frac = rng.uniform(min_frac, 1.0)
    ch, cw = max(2, int(h * frac)), max(2, int(min(w, h * frac * out_w / out_h)))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    patch = photo[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return cv2.resize(np.ascontiguousarray(patch), (out_w, out_h), interpolation=cv2.INTER_AREA)


def _polygon(n: int, radius: float, inner: float | None, angle: float, c: float) -> np.ndarray:
    k = np.arange(n * (2 if inner else 1))
    step = np.pi / n if inner else 2 * np.pi / n
    r = np.where(k % 2 == 0, radius, inner * radius) if inner else np.full(len(k), radius)
    t = angle + k * step
    return np.stack([c + r * np.cos(t), c + r * np.sin(t)], 1)


def shape_mask(cls: int, diameter: int, rng) -> np.ndarray:
    """(S, S) uint8 alpha (0..255, anti-aliased) of shape ``CLASS_NAMES[cls]``, S = diameter + 2."""
    size, scale = diameter + 2, 8  # drawn with 3 fractional bits for smooth edges
    m = np.zeros((size, size), np.uint8)
    c, r, a = size / 2, diameter / 2, rng.uniform(0, 2 * np.pi)

    def poly(p):
        cv2.fillPoly(m, [np.round(p * scale).astype(np.int32)], 255, cv2.LINE_AA, shift=3)

    name = CLASS_NAMES[cls]
    if name in ("circle", "ring"):
        cv2.circle(m, (int(c * scale), int(c * scale)), int(r * scale), 255, -1, cv2.LINE_AA, shift=3)
        if name == "ring":
            cv2.circle(m, (int(c * scale), int(c * scale)), int(0.55 * r * scale), 0, -1, cv2.LINE_AA, shift=3)
    elif name == "square":
        poly(_polygon(4, r, None, a, c))
    elif name == "triangle":
        poly(_polygon(3, r, None, a, c))
    elif name == "star":
        poly(_polygon(5, r, 0.45, a, c))
    elif name == "cross":
        arm = np.array([[-1, -0.18], [1, -0.18], [1, 0.18], [-1, 0.18]]) * r
        for rot in (a, a + np.pi / 2):
            R = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
            poly(arm @ R.T + c)
    return m


def _paste(img, inst, alpha, fill, x0, y0, inst_value):
    """Alpha-blend ``fill`` through ``alpha`` at (x0, y0); set ``inst`` where alpha > 127."""
    H, W = inst.shape
    s = alpha.shape[0]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + s, W), min(y0 + s, H)
    if xa >= xb or ya >= yb:
        return
    a = alpha[ya - y0:yb - y0, xa - x0:xb - x0].astype(np.float32)[..., None] / 255.0
    f = fill[ya - y0:yb - y0, xa - x0:xb - x0].astype(np.float32)
    region = img[ya:yb, xa:xb].astype(np.float32)
    img[ya:yb, xa:xb] = np.clip(region * (1 - a) + f * a + 0.5, 0, 255).astype(np.uint8)
    inst[ya:yb, xa:xb][a[..., 0] > 0.5] = inst_value


def _object_fill(rng, s: int, alpha: np.ndarray, diameter: int) -> np.ndarray:
    fill = _crop(rng, load_photo(FILL_PHOTOS[rng.integers(len(FILL_PHOTOS))]), s, s, 0.05)
    if rng.random() < 0.5:  # random tint so colour does not give the class away
        fill = np.clip(fill * rng.uniform(0.5, 1.5, 3), 0, 255).astype(np.uint8)
    width = int(round(OUTLINE * diameter))
    if width > 0:
        inner = cv2.erode(alpha, np.ones((2 * width + 1,) * 2, np.uint8))
        edge = (alpha.astype(np.int32) - inner) > 64
        light = fill.mean() < 110
        fill = fill.copy()
        fill[edge] = (235, 235, 235) if light else (20, 20, 20)
    return fill


def _distractor(rng, size: int) -> tuple[np.ndarray, int]:
    s = int(size * rng.uniform(0.1, 0.5)) + 2
    m = np.zeros((s, s), np.uint8)
    kind = rng.integers(3)
    c = (s // 2, s // 2)
    if kind == 0:
        cv2.line(m, (1, int(rng.integers(s))), (s - 2, int(rng.integers(s))), 255, int(rng.integers(2, 5)), cv2.LINE_AA)
    elif kind == 1:
        ax = (max(2, s // 2 - 1), max(1, int(s / 2 / rng.uniform(3, 6))))
        cv2.ellipse(m, c, ax, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA)
    else:
        text = "".join(rng.choice(list("ABDEFGHJKLMNPRSUVWYZ0123456789"), size=int(rng.integers(2, 5))))
        cv2.putText(m, text, (1, s // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, max(0.3, s / 90), 255,
                    max(1, s // 40), cv2.LINE_AA)
    return m, s


def render_sample(rng: np.random.Generator, size: int, backgrounds: tuple[str, ...]):
    """One scene: (image (H,W,3) uint8, boxes (N,4) xyxy, labels (N,), areas (N,), instance map).

    ``instance map`` is (H, W) int32 with the 1-based index of the kept object per pixel (0 = none).
    """
    img = _crop(rng, load_photo(backgrounds[rng.integers(len(backgrounds))]), size, size, 0.3)
    inst = np.zeros((size, size), np.int32)
    n_obj = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    n_dis = int(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1))
    order = rng.permutation(n_obj + n_dis)  # distractors interleave with (and may occlude) objects
    classes, full_areas = [], []
    for k in order:
        if k >= n_obj:
            alpha, s = _distractor(rng, size)
            fill = _crop(rng, load_photo(FILL_PHOTOS[rng.integers(len(FILL_PHOTOS))]), s, s, 0.05)
            x0, y0 = (int(v) for v in rng.integers(-s // 2, size - s // 2, 2))
            _paste(img, inst, alpha, fill, x0, y0, 0)
            continue
        diameter = int(round(size * np.exp(rng.uniform(*np.log(OBJECT_SIZE)))))
        cls = int(rng.integers(len(CLASS_NAMES)))
        alpha = shape_mask(cls, diameter, rng)
        s = alpha.shape[0]
        centre = rng.uniform(0, size, 2)
        if rng.random() < BORDER_PROB:  # one coordinate near an edge: the object is cut by the border
            centre[rng.integers(2)] = rng.choice([0, size]) + rng.uniform(-0.25 * s, 0.25 * s)
        x0, y0 = (int(v) for v in np.round(centre - s / 2))
        classes.append(cls)
        full_areas.append(int((alpha > 127).sum()))
        _paste(img, inst, alpha, _object_fill(rng, s, alpha, diameter), x0, y0, len(classes))
    if rng.random() < BLUR_PROB:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    sigma = rng.uniform(*NOISE_SIGMA)
    if sigma > 0:
        img = np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)
    boxes, labels, areas, kept_map = [], [], [], np.zeros_like(inst)
    for obj, cls in enumerate(classes, 1):
        ys, xs = np.nonzero(inst == obj)
        if len(xs) < MIN_VISIBLE * full_areas[obj - 1] or len(xs) == 0:
            continue
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        if min(box[2] - box[0], box[3] - box[1]) < MIN_BOX_PX * size / IMAGE_SIZE:
            continue
        boxes.append(box)
        labels.append(cls)
        areas.append(len(xs))
        kept_map[inst == obj] = len(boxes)
    return (img, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int32),
            np.asarray(areas, np.int64), kept_map)


def fingerprint(size: int, num_train: int, num_val: int) -> str:
    knobs = {k: v for k, v in globals().items() if k.isupper() and not k.startswith("_")}
    knobs.update(size=size, num_train=num_train, num_val=num_val)
    return hashlib.sha256(json.dumps(knobs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_split(root: Path, split: str, count: int, size: int) -> None:
    backgrounds = TRAIN_BACKGROUNDS if split == "train" else VAL_BACKGROUNDS
    (root / f"{split}2017").mkdir(parents=True)
    images, annotations = [], []

    def one(i):     # image i depends on (SEED, split, i) only: any order, any thread
        rng = np.random.default_rng((SEED, _SPLIT_CODE[split], i))
        img, boxes, labels, areas, _ = render_sample(rng, size, backgrounds)
        fname = f"{i + 1:012d}.jpg"
        cv2.imwrite(str(root / f"{split}2017" / fname), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        return fname, boxes, labels, areas

    # numpy/OpenCV release the GIL for most of the work: threads cut the first run's wait
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(one, range(count)))
    for i, (fname, boxes, labels, areas) in enumerate(results):
        images.append({"id": i + 1, "file_name": fname, "width": size, "height": size})
        for b, l, a in zip(boxes.tolist(), labels.tolist(), areas.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": l + 1,
                                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": a, "iscrowd": 0})
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(CLASS_NAMES)]
    (root / "annotations").mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def cache_dir() -> Path:
    return Path(os.environ.get("DAMO_JAX_CACHE", "~/.cache/damo_jax")).expanduser()


def ensure_demo(size: int | None = None, *, root: str | os.PathLike | None = None,
                num_train: int | None = None, num_val: int | None = None) -> Path:
    """Generate the demo set once (atomically) and return its folder (defaults: the constants)."""
    size = IMAGE_SIZE if size is None else int(size)
    num_train = NUM_TRAIN if num_train is None else int(num_train)
    num_val = NUM_VAL if num_val is None else int(num_val)
    default = (size, num_train, num_val) == (IMAGE_SIZE, NUM_TRAIN, NUM_VAL)
    name = f"demo_v{VERSION}" if default else f"demo_v{VERSION}_{size}px_{num_train}_{num_val}"
    final = Path(root) if root is not None else cache_dir() / name
    fp = fingerprint(size, num_train, num_val)
    if _is_fresh(final, fp):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        _write_split(tmp, "train", num_train, size)
        _write_split(tmp, "val", num_val, size)
        (tmp / "meta.json").write_text(json.dumps({"fingerprint": fp, "size": size, "num_train": num_train,
                                                   "num_val": num_val, "classes": CLASS_NAMES}))
        if _is_fresh(final, fp):  # another process finished first: keep its copy
            return final
        if final.exists():  # stale (knobs changed): move aside, then replace
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(tmp, final)
        except OSError:  # lost a race with another process
            if not _is_fresh(final, fp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_fresh(folder: Path, fp: str) -> bool:
    try:
        return json.loads((folder / "meta.json").read_text()).get("fingerprint") == fp
    except (OSError, ValueError, AttributeError):
        return False


def open_demo(split: str = "train", size: int | None = None):
    from damo_jax.data_pipelines.readers.coco import read_coco
    if split not in _SPLIT_CODE:
        from damo_jax.data_pipelines.records import MissingSplitError
        raise MissingSplitError(f"demo: unknown split {split!r} (train, val)")
    root = ensure_demo(size)
    return read_coco(root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017",
                     name=f"demo:{size or IMAGE_SIZE}:{split}")
