"""Tiled inference (damo_jax.inference.tiling): windows, cut-box handling, class-aware merge.

The backend is a deterministic stand-in for a perfect detector: it "detects" every connected
blob of a class colour in the network input and returns its tight box with score 0.9, so what is
tested is the slicing, batching, shift back to original pixels and the merge -- not a model.
An object cut by a window edge gives a truncated box in that window, exactly like a real model.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from damo_jax.inference.detector import Detector
from damo_jax.inference.tiling import cut_mask, detect_tiled, merge_detections, tile_grid

from tests.data_helpers import CLASS_COLORS, write_coco  # noqa: E402

COLORS = CLASS_COLORS.astype(np.float32)  # red, green, blue, ... (6 classes, as the demo config)
SLOTS = 32


class BlobBackend:
    """images (B,H,W,3) float RGB -> (scores (B,SLOTS,C), boxes (B,SLOTS,4)) of the colour blobs."""

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        images = np.asarray(images, np.float32)
        self.calls.append(images.shape)
        scores = np.zeros((len(images), SLOTS, len(COLORS)), np.float32)
        boxes = np.zeros((len(images), SLOTS, 4), np.float32)
        for b, image in enumerate(images):
            slot = 0
            for c, color in enumerate(COLORS):
                mask = np.all(np.abs(image - color) < 60, axis=-1)
                labelled, _ = ndimage.label(mask)
                for sl in ndimage.find_objects(labelled):
                    boxes[b, slot] = [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]
                    scores[b, slot, c] = 0.9
                    slot += 1
        return scores, boxes


def make_detector(size=128, batch_size=4):
    return Detector(BlobBackend(), class_names=tuple(f"c{k}" for k in range(len(COLORS))),
                    image_size=(size, size),
                    conf=0.3, iou=0.6, batch_size=batch_size)


def paint(height, width, objects):
    image = np.full((height, width, 3), 40, np.uint8)
    for x0, y0, x1, y1, c in objects:
        image[y0:y1, x0:x1] = COLORS[c].astype(np.uint8)
    return image


def test_tile_grid_covers_image_with_windows_inside():
    windows = tile_grid(300, 420, 128, 0.4)
    assert windows.shape[1] == 4
    assert (windows[:, 2] - windows[:, 0] == 128).all() and (windows[:, 3] - windows[:, 1] == 128).all()
    assert windows.min() >= 0 and windows[:, 2].max() == 420 and windows[:, 3].max() == 300
    covered = np.zeros((300, 420), bool)
    for x0, y0, x1, y1 in windows:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    steps = np.diff(np.unique(windows[:, 0]))
    assert steps.max() <= round(128 * 0.6)  # consecutive windows overlap by >= 40 %
    assert tile_grid(100, 90, 128, 0.2).tolist() == [[0, 0, 90, 100]]
    with pytest.raises(ValueError, match="overlap"):
        tile_grid(300, 300, 128, 1.0)


def test_cut_mask_ignores_image_border_edges():
    boxes = np.array([[0, 10, 20, 30], [100, 10, 128, 30], [50, 50, 60, 60]], np.float32)
    # window at the image's left/top border: only its right edge (x=128 < width) cuts
    assert cut_mask(boxes, (0, 0, 128, 128), (128, 400), 2.0).tolist() == [False, True, False]
    # same window when the image is exactly one window wide and tall: nothing is cut
    assert cut_mask(boxes, (0, 0, 128, 128), (128, 128), 2.0).tolist() == [False, False, False]


def test_objects_across_tile_borders_found_once_with_full_box():
    # windows along x start at 0, 77, 154, 231, 292 and along y at 0, 77, 154, 172 (tile 128,
    # overlap 0.4); every object below crosses at least one window edge
    objects = [(110, 20, 150, 55, 0),     # across x = 128 (first window's right edge)
               (195, 60, 240, 100, 1),    # across x = 205 and y = 77 / 128 edges
               (280, 140, 320, 180, 2),   # across x = 292 / 282, y = 154 / 172
               (60, 230, 100, 262, 0),    # across y = 249 / 205 edges
               (380, 10, 420, 40, 1)]     # on the image's right border
    image = paint(300, 420, objects)
    det = make_detector()
    result = detect_tiled(det, image, tile=128, overlap=0.4)
    assert len(result["scores"]) == len(objects)
    got = sorted(zip(result["labels"].tolist(), result["boxes"].round().astype(int).tolist()))
    want = sorted((c, [x0, y0, x1, y1]) for x0, y0, x1, y1, c in objects)
    assert got == want
    assert result["class_names"] == [det.class_names[c] for c in result["labels"]]
    # the windows went through the backend batched (batch_size 4), not one by one
    assert {shape[0] for shape in det.backend.calls} == {4}


def test_without_cut_box_handling_plain_tiles_would_duplicate():
    """Guard of the test above: the raw per-window detections DO contain truncated copies."""
    image = paint(300, 420, [(110, 20, 150, 55, 0)])
    det = make_detector()
    windows = tile_grid(300, 420, 128, 0.4)
    crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in windows]
    total = sum(len(r["scores"]) for r in det(crops))
    assert total >= 2


def test_full_image_pass_recovers_object_larger_than_tile():
    big = (40, 60, 360, 120, 2)  # 320 px wide: no 128-px window holds it whole
    image = paint(256, 400, [big])
    det = make_detector()
    tiles_only = detect_tiled(det, image, tile=128, overlap=0.25)
    assert len(tiles_only["scores"]) >= 2  # only cut pieces, none whole
    merged = detect_tiled(det, image, tile=128, overlap=0.25, full_image=True)
    assert len(merged["scores"]) == 1
    # the full-image pass sees the object through a 400x256 -> 128x128 stretch: ~3 px precision
    np.testing.assert_allclose(merged["boxes"][0], big[:4], atol=4)


def test_image_within_one_tile_equals_single_pass():
    objects = [(5, 5, 40, 30, 0), (30, 20, 60, 50, 0), (50, 60, 90, 95, 1), (70, 10, 100, 40, 2)]
    image = paint(100, 110, objects)
    det = make_detector()
    single = det(image)
    tiled = detect_tiled(det, image, tile=128, overlap=0.2, full_image=True)
    for key in ("boxes", "scores", "labels"):
        np.testing.assert_array_equal(tiled[key], single[key])
    assert tiled["class_names"] == single["class_names"]


def test_merge_is_class_aware_nms_in_original_pixels():
    a = {"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 10.5]], np.float32),
         "scores": np.array([0.9, 0.8], np.float32), "labels": np.array([0, 1], np.int32)}
    b = {"boxes": np.array([[0.5, 0, 10, 10], [50, 50, 60, 60]], np.float32),
         "scores": np.array([0.95, 0.5], np.float32), "labels": np.array([0, 0], np.int32)}
    out = merge_detections([(a, np.zeros(2, bool)), (b, np.zeros(2, bool))], iou_thre=0.6,
                           max_dets=10)
    # class 0: the 0.95 box suppresses the 0.9 one (IoU 0.95); class 1 survives next to it
    assert out["scores"].tolist() == pytest.approx([0.95, 0.8, 0.5])
    assert out["labels"].tolist() == [0, 1, 0]
    capped = merge_detections([(a, np.zeros(2, bool)), (b, np.zeros(2, bool))], iou_thre=0.6,
                              max_dets=2)
    assert capped["scores"].tolist() == pytest.approx([0.95, 0.8])


def test_eval_cli_tiled_reports(tmp_path, monkeypatch):
    """``damo-jax eval --tile --out --save-json`` end to end with the blob backend: tiling finds
    every object with its exact box (AP 1.0), a single stretched pass does not; reports written."""
    from damo_jax.cli import eval as eval_cli
    from damo_jax.cli.common import load_cli_config
    from damo_jax.inference.loading import LoadedModel

    objects = [[(110, 20, 150, 55, 0), (195, 60, 240, 100, 1), (280, 140, 320, 180, 2)],
               [(60, 230, 100, 262, 0), (380, 10, 420, 40, 1), (120, 100, 165, 141, 3)]]
    scenes = [(paint(300, 420, objs), np.array([o[:4] for o in objs], np.float32),
               np.array([o[4] for o in objs], np.int32)) for objs in objects]
    write_coco(tmp_path / "coco", scenes, split="val")

    def fake_load(args, overrides, **kwargs):
        names = "(" + ", ".join(f"'c{k}'" for k in range(6)) + ")"
        cfg = load_cli_config("demo_ns", list(overrides) + ["model.head.num_classes=6",
                                                         f"model.class_names={names}"])
        return LoadedModel(cfg=cfg, class_names=tuple(cfg.model.class_names),
                           backend=BlobBackend(), kind="stub", source="blob stub")
    from damo_jax.cli import common as cli_common
    monkeypatch.setattr(cli_common, "load_model_from_args", fake_load)
    common = ["--config", "demo_ns", "--data", f"coco:{tmp_path / 'coco'}", "--split", "val",
              "--img-size", "128", "--conf", "0.3", "--no-progress"]
    out = tmp_path / "report"
    tiled = eval_cli.main(common + ["--tile", "128", "--overlap", "0.4", "--out", str(out),
                                    "--save-json"])
    single = eval_cli.main(common)
    assert tiled["AP"] == pytest.approx(1.0) and tiled["AP50"] == pytest.approx(1.0)
    assert single["AP"] < 0.9
    assert {p.name for p in out.iterdir()} >= {"per_class.json", "pr_curves.png",
                                              "confusion_matrix.png", "detections.json"}
    import json
    dets = json.loads((out / "detections.json").read_text())
    assert len(dets) == 6 and {d["category_id"] for d in dets} == {10, 13, 16, 19}
