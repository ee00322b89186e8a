"""Reader edge cases from a user audit: validation on the training set (single-file / flat specs),
image ids beyond int64, Unicode-digit file names, VOC splits and unreadable images, COCO polygons
that disagree with their bbox. Tiny datasets written to tmp_path; no training runs."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from damo_jax.data_pipelines import DataError, MissingSplitError, eval_batches, open_dataset


def _png(path: Path, w: int = 32, h: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def _coco_file(root: Path, *, image_ids=(1, 2), annotations=None, name="instances_train.json") -> Path:
    """``root/annotations/instances_<x>.json`` + ``root/<x>/<k>.png`` (32x32), one category ``a``
    (id 1)."""
    images = []
    for k, iid in enumerate(image_ids):
        _png(root / Path(name).stem.removeprefix("instances_") / f"{k}.png")
        images.append({"id": iid, "file_name": f"{k}.png", "width": 32, "height": 32})
    if annotations is None:
        annotations = [{"id": k + 1, "image_id": iid, "category_id": 1, "bbox": [4, 4, 10, 10]}
                       for k, iid in enumerate(image_ids)]
    path = root / "annotations" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "a"}]}))
    return path


def _voc_pair(folder: Path, stem: str, *, size: bool = True, image: str | None = "ok") -> None:
    """``folder/stem.xml`` (one object 'a' at 4..20) and ``folder/stem.png`` (``image``: 'ok', 'broken'
    (a truncated PNG) or None)."""
    folder.mkdir(parents=True, exist_ok=True)
    sz = "<size><width>32</width><height>32</height></size>" if size else ""
    (folder / f"{stem}.xml").write_text(
        f"<annotation><filename>{stem}.png</filename>{sz}<object><name>a</name><difficult>0</difficult>"
        f"<bndbox><xmin>4</xmin><ymin>4</ymin><xmax>20</xmax><ymax>20</ymax></bndbox></object></annotation>")
    if image == "ok":
        _png(folder / f"{stem}.png")
    elif image == "broken":
        _png(folder / f"{stem}.png")
        data = (folder / f"{stem}.png").read_bytes()
        (folder / f"{stem}.png").write_bytes(data[:20])      # the header cut short


def _train_cfg(train: str, val: str = ""):
    from damo_jax.config import load_config
    cfg = load_config("demo")
    cfg.data.train, cfg.data.val = train, val
    cfg.data.train_split, cfg.data.val_split = "train", "val"
    return cfg


# ------------------------------------------------------------- F4: never validate on the training set
def test_training_on_a_coco_json_file_has_no_val_split_unless_one_is_given(tmp_path, caplog):
    from damo_jax.train.loop import open_datasets
    ann = _coco_file(tmp_path)
    spec = f"coco:{ann}"
    with caplog.at_level(logging.WARNING):
        train_ds, val_ds = open_datasets(_train_cfg(spec))
    assert len(train_ds) == 2 and val_ds is None
    assert "single annotation file has no split 'val'" in caplog.text and "evaluation skipped" in caplog.text
    # the reader on its own, as eval / show use it, reads the file for any split
    assert len(open_dataset(spec, "val")) == 2
    with pytest.raises(MissingSplitError, match=r"instances_train\.json.*'val'"):
        open_dataset(spec, "val", require_split=True)
    # an explicit val spec is the user's choice, even the same file
    val_file = _coco_file(tmp_path / "v", image_ids=(7,), name="instances_val.json")
    for val in (spec, f"coco:{val_file}"):
        _, val_ds = open_datasets(_train_cfg(spec, val))
        assert val_ds is not None and len(val_ds) == (2 if val == spec else 1)


def test_training_on_a_flat_voc_folder_has_no_val_split(tmp_path, caplog):
    from damo_jax.train.loop import open_datasets
    for stem in ("x", "y"):
        _voc_pair(tmp_path / "flat", stem)
    spec = f"voc:{tmp_path / 'flat'}"
    with caplog.at_level(logging.WARNING):
        train_ds, val_ds = open_datasets(_train_cfg(spec))
    assert len(train_ds) == 2 and val_ds is None and "no split 'val'" in caplog.text
    assert len(open_dataset(spec, "val")) == 2                 # eval on the folder: allowed
    _, val_ds = open_datasets(_train_cfg(spec, spec))          # explicit: allowed
    assert val_ds is not None and len(val_ds) == 2
    # a devkit without ImageSets/Main (every XML in every split) likewise
    dev = tmp_path / "dev"
    _voc_pair(dev / "Annotations", "x", image=None)
    _png(dev / "JPEGImages" / "x.png")
    _, val_ds = open_datasets(_train_cfg(f"voc:{dev}"))
    assert val_ds is None
    assert len(open_dataset(f"voc:{dev}", "val")) == 1


def test_a_split_folder_voc_set_still_validates_on_its_val_folder(tmp_path):
    from damo_jax.train.loop import open_datasets
    _voc_pair(tmp_path / "train", "x")
    _voc_pair(tmp_path / "train", "y")
    _voc_pair(tmp_path / "val", "z")
    _, val_ds = open_datasets(_train_cfg(f"voc:{tmp_path}"))
    assert val_ds is not None and [r.file for r in val_ds.records] == [str(tmp_path / "val" / "z.png")]


# ------------------------------------------------------------------- F5 / F6: ids that are not int64
def _yolo(root: Path, stems) -> str:
    for s in stems:
        _png(root / "images" / "val" / f"{s}.png")
        (root / "labels" / "val").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "val" / f"{s}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/val\nval: images/val\nnames: [a]\n")
    return f"yolo:{root / 'data.yaml'}"


@pytest.mark.parametrize("stems, ids", [
    (("7", "0042"), [42, 7]),                                          # sorted by path: 0042, 7
    (("9223372036854775807", "5"), [5, 2**63 - 1]),                    # int64 max: still numeric
    (("9223372036854775808", "5"), [1, 2]),                            # 2**63: file order instead
    (("12345678901234567890", "12345678901234567891"), [1, 2]),
    (("\u00b2", "1"), [1, 2]),                                         # '²'.isdigit() is True
])
def test_yolo_file_names_are_ids_only_when_all_are_ascii_int64(tmp_path, stems, ids):
    ds = open_dataset(_yolo(tmp_path, stems), "val")
    assert [r.image_id for r in ds.records] == ids
    batch = next(eval_batches(ds, (32, 32), 2))
    assert batch["image_ids"].tolist() == ids


def test_coco_image_id_outside_int64_is_a_data_error(tmp_path):
    big = 2**64 + 1
    ann = _coco_file(tmp_path, image_ids=(1, big))
    with pytest.raises(DataError, match=r"instances_train\.json: images\[1\]: field 'id' = "
                                        r"18446744073709551617 does not fit"):
        open_dataset(f"coco:{ann}")
    ann = _coco_file(tmp_path, image_ids=(-2**63 - 1,))
    with pytest.raises(DataError, match=r"images\[0\]: field 'id'"):
        open_dataset(f"coco:{ann}")
    ann = _coco_file(tmp_path, image_ids=(1, 2**63 - 1))              # the largest that fits
    ds = open_dataset(f"coco:{ann}")
    assert next(eval_batches(ds, (32, 32), 2))["image_ids"].tolist() == [1, 2**63 - 1]


# ------------------------------------------------------------------------- F9: VOC splits and images
def test_voc_split_folder_missing_is_a_missing_split(tmp_path, caplog):
    from damo_jax.train.loop import open_datasets
    _voc_pair(tmp_path / "train", "x")
    with pytest.raises(MissingSplitError, match=r"no split folder .*val"):
        open_dataset(f"voc:{tmp_path}", "val")
    with caplog.at_level(logging.WARNING):
        train_ds, val_ds = open_datasets(_train_cfg(f"voc:{tmp_path}"))
    assert len(train_ds) == 1 and val_ds is None and "evaluation skipped" in caplog.text


def test_voc_image_without_size_that_cannot_be_read_is_skipped_and_counted(tmp_path, caplog):
    _voc_pair(tmp_path / "train", "good", size=False)
    _voc_pair(tmp_path / "train", "broken", size=False, image="broken")
    with caplog.at_level(logging.WARNING):
        ds = open_dataset(f"voc:{tmp_path}", "train")
    assert [Path(r.file).name for r in ds.records] == ["good.png"]
    assert ds.stats["skipped_images"] == 1 and ds.stats["size_from_image"] == 1
    assert "broken.xml" in caplog.text
    assert ds[0]["orig_size"] == (32, 32)


# ----------------------------------------------------------------- F8: polygons that miss their bbox
def test_coco_polygons_that_do_not_match_the_bbox_are_not_used(tmp_path, caplog):
    def square(x1, y1, x2, y2):
        return [[x1, y1, x2, y1, x2, y2, x1, y2]]
    anns = [
        # polygon in 0..1 (normalised by 32): IoU with the bbox 0 -> not used
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10],
         "segmentation": square(4 / 32, 4 / 32, 14 / 32, 14 / 32)},
        # the same object in pixels, 1 px off on two edges (rounding): used
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [16, 16, 10, 10],
         "segmentation": square(16.5, 16.5, 25, 25)},
        # a 2x2 box against a 3x3 polygon (plain IoU 4/9 < 0.5; within the 1 px padding): used
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [28, 2, 2, 2],
         "segmentation": square(28, 2, 31, 5)},
        # half overlapping (IoU 50/150 = 0.33; padded 84/204 = 0.41): not used
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [2, 2, 10, 10],
         "segmentation": square(7, 2, 17, 12)},
    ]
    ann = _coco_file(tmp_path, annotations=anns)
    with caplog.at_level(logging.WARNING):
        ds = open_dataset(f"coco:{ann}")
    assert ds.stats["polygons_not_used"] == 2
    s0, s1 = ds[0], ds[1]
    assert s0["segments"][0] is None and s1.get("segments") in (None, [None])
    np.testing.assert_allclose(s0["segments"][1], [[16.5, 16.5], [25, 16.5], [25, 25], [16.5, 25]])
    np.testing.assert_allclose(s0["segments"][2], [[28, 2], [31, 2], [31, 5], [28, 5]])
    np.testing.assert_allclose(s0["boxes"], [[4, 4, 14, 14], [16, 16, 26, 26], [28, 2, 30, 4]])
    assert "instances_train.json: 2 polygon" in caplog.text and "annotations[0] (id 1)" in caplog.text
