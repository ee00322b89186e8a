"""Bad and unusual image files: clear errors or counted, converted, consistent results."""
from __future__ import annotations

import collections
import io
import logging

import numpy as np
import pytest
from PIL import Image

from data_helpers import write_coco
from damo_jax.data_pipelines import DataError, TrainLoader, open_dataset
from damo_jax.data_pipelines.imageio import decode_image, displayed_size


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_missing_truncated_and_non_image_files_raise_naming_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jpg: field 'image': file not found"):
        decode_image(tmp_path / "nope.jpg")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match=r"trunc\.jpg: field 'image'"):
        decode_image(tmp_path / "trunc.jpg")
    (tmp_path / "text.png").write_text("definitely not a png")
    with pytest.raises(DataError, match=r"text\.png: field 'image'"):
        decode_image(tmp_path / "text.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_fast_opencv_decode_matches_pil(tmp_path, fmt, mode):
    from damo_jax.data_pipelines.imageio import _fast_path_ok
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).convert(mode)
    path = _save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    with Image.open(path) as im:
        assert _fast_path_ok(im, path.read_bytes())
        expected = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(decode_image(path), expected)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "1", "CMYK", "LA"])
def test_modes_convert_to_rgb_uint8(tmp_path, mode):
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[:, :5] = (200, 40, 10)
    base = Image.fromarray(rgb)
    if mode == "I;16":
        arr16 = np.full((8, 10), 65535, np.uint16)
        arr16[:, :5] = 257 * 100
        img = Image.fromarray(arr16)
        assert img.mode.startswith("I;16")
        expected = np.repeat(np.where(np.arange(10) < 5, 100, 255)[None, :, None], 8, 0).repeat(3, 2)
    else:
        img = base.convert(mode)
        expected = np.asarray(img.convert("RGB"))
    path = _save(img, tmp_path / f"im_{mode.replace(';', '')}.{'tiff' if mode == 'CMYK' else 'png'}")
    out = decode_image(path, annotated_size=(10, 8))
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def _exif_jpeg(path, orientation: int):
    """Raw 40x20 image, red block in the raw top-left corner, EXIF orientation tag set."""
    raw = np.zeros((20, 40, 3), np.uint8)
    raw[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(raw).save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


def test_exif_rotation_frame_is_decided_by_the_annotated_size(tmp_path):
    path = _exif_jpeg(tmp_path / "rot.jpg", 6)  # displayed = raw rotated 90° clockwise
    assert displayed_size(path) == (20, 40)
    stats = collections.Counter()
    shown = decode_image(path, annotated_size=(20, 40), stats=stats)
    assert shown.shape == (40, 20, 3) and stats["exif_rotated"] == 1
    assert shown[2, -3, 0] > 200 and shown[-3, 2, 0] < 60   # raw top-left → displayed top-right
    raw = decode_image(path, annotated_size=(40, 20), stats=stats)
    assert raw.shape == (20, 40, 3) and raw[2, 2, 0] > 200 and stats["exif_raw_frame"] == 1
    assert stats["size_mismatch"] == 0
    # sizes that cannot tell (180°): the raw frame, as the official PIL load and COCO's annotations
    stats = collections.Counter()
    kept = decode_image(_exif_jpeg(tmp_path / "r180.jpg", 3), annotated_size=(40, 20), stats=stats)
    assert kept[2, 2, 0] > 200 and kept[-3, -3, 0] < 60 and stats["exif_raw_frame"] == 1
    # no stored size (YOLO, predict): the displayed frame
    assert decode_image(tmp_path / "r180.jpg")[-3, -3, 0] > 200


def test_yolo_uses_the_displayed_frame_of_exif_images(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    _exif_jpeg(tmp_path / "images" / "train" / "0.jpg", 6)
    (tmp_path / "labels" / "train" / "0.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "d.yaml").write_text("train: images/train\nnames: [x]\n")
    ds = open_dataset(f"yolo:{tmp_path / 'd.yaml'}")
    s = ds[0]
    assert s["orig_size"] == (40, 20) and s["image"].shape == (40, 20, 3)
    np.testing.assert_allclose(s["boxes"], [[5, 10, 15, 30]])


def test_annotation_image_size_mismatch_is_counted_and_rescaled(tmp_path, caplog):
    img = np.zeros((30, 40, 3), np.uint8)
    img[:15, :20] = 255
    write_coco(tmp_path, [(img, np.array([[0, 0, 20, 15]]), np.array([0]))])
    import json
    p = tmp_path / "annotations" / "instances_train2017.json"
    data = json.loads(p.read_text())
    data["images"][0].update(width=80, height=60)  # annotation made on a 2x larger copy
    data["annotations"][0]["bbox"] = [0, 0, 40, 30]
    p.write_text(json.dumps(data))
    ds = open_dataset(f"coco:{tmp_path}")
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        s = ds[0]
    assert s["image"].shape == (60, 80, 3) and s["orig_size"] == (60, 80)
    assert ds.stats["size_mismatch"] == 1 and "differs from the annotated size" in caplog.text
    assert s["image"][25, 35].min() > 200 and s["image"][35, 45].max() < 50  # box stays on the object


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_skips_and_counts_unreadable_images(tmp_path, caplog, workers):
    """Each bad file is warned about once per run, in the main process: with worker processes
    it used to be once per worker (and out of the main process's log)."""
    rng = np.random.default_rng(0)
    scenes = [(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), np.array([[2, 2, 20, 20]]), np.array([0]))
              for _ in range(4)]
    write_coco(tmp_path, scenes)
    (tmp_path / "train2017" / "000002.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "train2017" / "000003.png").unlink()
    ds = open_dataset(f"coco:{tmp_path}")
    with pytest.raises(DataError, match="000003.png"):
        ds[2]
    cfg = {"image_size": (32, 32), "mosaic_size": (32, 32), "max_boxes": 4}
    loader = TrainLoader(ds, cfg, batch_size=4, seed=0, steps_per_epoch=1, total_steps=2,
                         no_aug_start_step=0, workers=workers)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    loader.close()
    assert len(batches) == 2 and batches[0]["images"].shape == (4, 32, 32, 3)
    assert loader.stats["skipped_samples"] >= 2 * 2  # two bad files, met in each step
    assert not [k for k in loader.stats if str(k).startswith("note:")]   # notes are logged, not kept
    warned = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(warned) == 2, warned                   # once per bad file, not once per hit
    assert any("000002.png" in w for w in warned) and any("000003.png" in w for w in warned)
    assert set(batches[0]["image_ids"].tolist()) <= {1, 4}


def test_a_truncated_image_is_reported_once_not_also_by_opencv(tmp_path, capfd):
    """OpenCV's fast path printed its own "[ WARN:0@…] … PNG input buffer is incomplete" line to
    stderr before our one-line warning named the file: the user read the defect twice."""
    from damo_jax.data_pipelines.imageio import decode_image
    path = tmp_path / "t.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    with pytest.raises(DataError, match="t.png"):
        decode_image(path)
    assert "PNG input buffer" not in capfd.readouterr().err
