"""Data problems are visible: drops counted by reason, warnings that guess the cause, iscrowd and
file_name rules, spec options, and the dataset summary printed by train / eval."""
from __future__ import annotations

import collections
import json
import logging

import numpy as np
import pytest
from PIL import Image

from data_helpers import random_scene, write_coco
from damo_jax.data_pipelines import DataError, format_summary, open_dataset
from damo_jax.data_pipelines.quality import DROP_KEYS, DropAudit, classify_boxes, clean_boxes


# ----------------------------------------------------------------------------------- classification
def test_every_box_gets_exactly_one_reason():
    boxes = [[1, 1, 5, 5],            # kept
             [np.nan, 1, 5, 5],       # non-finite
             [6, 1, 2, 5],            # inverted
             [3, 3, 3, 8],            # zero width
             [20, 20, 30, 30],        # outside a 10x10 image
             [-5, 2, 4, 6]]           # clipped, kept
    clipped, reason = classify_boxes(boxes, 10, 10)
    assert reason.tolist() == [-1, 0, 1, 2, 3, -1]
    assert [DROP_KEYS[r] for r in reason if r >= 0] == [
        "nonfinite_boxes", "inverted_boxes", "zero_size_boxes", "outside_boxes"]
    stats = collections.Counter()
    b, l = clean_boxes(boxes, np.arange(6), 10, 10, stats)
    assert l.tolist() == [0, 5] and b.tolist() == [[1, 1, 5, 5], [0, 2, 4, 6]]
    assert stats == {"nonfinite_boxes": 1, "inverted_boxes": 1, "zero_size_boxes": 1,
                     "outside_boxes": 1, "clipped_boxes": 1}


def test_audit_warns_only_above_the_share_and_caps_file_warnings():
    audit = DropAudit("ds", share=0.2)
    audit.add("ok.txt", 10, collections.Counter(outside_boxes=2))                 # 20%: not above
    audit.add("bad.txt", 4, collections.Counter(inverted_boxes=3), lambda c: "guess!")
    msgs = audit.messages()
    assert msgs == ["bad.txt: 3 of 4 boxes dropped (3 inverted (x2 < x1 or y2 < y1)): guess!",
                    "ds: 5 of 14 boxes dropped (3 inverted (x2 < x1 or y2 < y1), 2 outside the image)"]
    many = DropAudit("big", share=0.2)
    for i in range(9):
        many.add(f"{i}.txt", 1, collections.Counter(zero_size_boxes=1))
    msgs = many.messages()
    assert len(msgs) == 5 + 2 and "4 more files" in msgs[5] and msgs[6].startswith("big: all 9 boxes")


# ------------------------------------------------------------------------------------------- YOLO
def _yolo(root, label_lines: dict[str, str], size=(60, 80)):
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for stem, text in label_lines.items():
        Image.fromarray(np.zeros((size[0], size[1], 3), np.uint8)).save(root / "images" / "train" / f"{stem}.png")
        (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [a, b]\n")
    return f"yolo:{root / 'data.yaml'}"


def test_yolo_pixel_labels_are_dropped_counted_and_explained(tmp_path, caplog):
    spec = _yolo(tmp_path, {"0": "0 0.5 0.5 0.2 0.2\n",
                            "1": "0 40 30 16 12\n1 20 20 10 10\n",        # pixels, not normalised
                            "2": "0 0.5 0.5 -0.2 0.2\n1 nan 0.5 0.1 0.1\n0 0.3 0.3 0.1 0.1\n"})
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        ds = open_dataset(spec)
    assert ds.stats["outside_boxes"] == 2 and ds.stats["inverted_boxes"] == 1
    assert ds.stats["nonfinite_boxes"] == 1
    assert [len(r.labels) for r in ds.records] == [1, 0, 1]
    text = caplog.text
    assert "1.txt: all 2 boxes dropped (2 outside the image)" in text
    assert "fall outside [0, 1]: YOLO labels must be normalised" in text and "look like pixels" in text
    assert "2.txt: 2 of 3 boxes dropped" in text
    summary = format_summary(ds, "train data")
    assert "3 images (0 skipped)" in summary and "2 boxes used" in summary
    assert "dropped 4 (" in summary and "outside the image 2" in summary and "inverted" in summary


def test_yolo_clean_file_gives_no_warning(tmp_path, caplog):
    spec = _yolo(tmp_path, {"0": "0 0.5 0.5 0.2 0.2\n1 0.99 0.5 0.1 0.1\n"})   # one box clipped only
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        ds = open_dataset(spec)
    assert "dropped" not in caplog.text and ds.stats["clipped_boxes"] == 1


# ------------------------------------------------------------------------------------------- COCO
def _coco(tmp_path, extra=(), mutate=None):
    rng = np.random.default_rng(0)
    path = write_coco(tmp_path, [random_scene(rng, 48, 64) for _ in range(2)], extra_annotations=list(extra))
    if mutate:
        data = json.loads(path.read_text())
        mutate(data)
        path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("value", ["0", "1", 2, -1, None, 0.5, [0]])
def test_coco_iscrowd_must_be_0_or_1(tmp_path, value):
    _coco(tmp_path, [{"id": 77, "image_id": 1, "category_id": 10, "bbox": [1, 1, 5, 5], "iscrowd": value}])
    with pytest.raises(DataError, match=r"instances_train2017\.json: annotations\[\d+\] \(id 77\): "
                                        r"field 'iscrowd' must be 0 or 1"):
        open_dataset(f"coco:{tmp_path}")


@pytest.mark.parametrize("value,crowd", [(0, 0), (1, 1), (True, 1), (False, 0), (1.0, 1)])
def test_coco_iscrowd_accepts_int_and_bool(tmp_path, value, crowd):
    _coco(tmp_path, [{"id": 77, "image_id": 1, "category_id": 10, "bbox": [1, 1, 5, 5], "iscrowd": value}])
    ds = open_dataset(f"coco:{tmp_path}")
    assert ds.stats["crowd_boxes"] == crowd


@pytest.mark.parametrize("name", ["/etc/passwd", "../secret.png", "a/../../x.png", ".."])
def test_coco_file_name_outside_the_image_folder(tmp_path, name):
    def mutate(data):
        data["images"][1]["file_name"] = name
    _coco(tmp_path, mutate=mutate)
    with pytest.raises(DataError, match=r"images\[1\] \(id 2\): field 'file_name' = .* points outside "
                                        r"the image folder.*allow_outside_root"):
        open_dataset(f"coco:{tmp_path}")


def test_coco_file_name_outside_allowed_by_option(tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.full((48, 64, 3), 9, np.uint8)).save(outside)

    def mutate(data):
        data["images"][1]["file_name"] = str(outside)
    _coco(tmp_path / "d", mutate=mutate)
    for ds in (open_dataset(f"coco:{tmp_path / 'd'}?allow_outside_root=1"),
               open_dataset(f"coco:{tmp_path / 'd'}", allow_outside_root=True)):
        assert ds[1]["image"][0, 0].tolist() == [9, 9, 9]
    # inside the folder, sub-folders and a harmless '..' are fine
    def inside(data):
        data["images"][0]["file_name"] = "./sub/../000001.png"
        (tmp_path / "e" / "train2017" / "sub").mkdir(parents=True)
    _coco(tmp_path / "e", mutate=inside)
    assert open_dataset(f"coco:{tmp_path / 'e'}")[0]["image"].shape == (48, 64, 3)


def test_spec_options_are_checked(tmp_path):
    _coco(tmp_path)
    with pytest.raises(DataError, match=r"unknown option 'allow_outside' for coco.*allow_outside_root"):
        open_dataset(f"coco:{tmp_path}?allow_outside=1")
    with pytest.raises(DataError, match=r"option 'allow_outside_root' must be 1/0"):
        open_dataset(f"coco:{tmp_path}?allow_outside_root=maybe")


def test_coco_inverted_and_outside_boxes_warn_with_a_guess(tmp_path, caplog):
    bad = [{"id": 100 + k, "image_id": 1, "category_id": 10, "bbox": [30, 30, -10, 5]} for k in range(6)]
    _coco(tmp_path, bad)
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        ds = open_dataset(f"coco:{tmp_path}")
    assert ds.stats["inverted_boxes"] == 6
    assert "boxes dropped (6 inverted" in caplog.text and "[x, y, width, height]" in caplog.text


# -------------------------------------------------------------------------------------------- VOC
def test_voc_filename_escape_and_inverted_warning(tmp_path, caplog):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    Image.fromarray(np.zeros((60, 100, 3), np.uint8)).save(tmp_path / "JPEGImages" / "a.jpg")
    obj = ("<object><name>dog</name><bndbox><xmin>50</xmin><ymin>5</ymin><xmax>10</xmax><ymax>20</ymax>"
           "</bndbox></object>")
    size = "<size><width>100</width><height>60</height></size>"
    (tmp_path / "Annotations" / "a.xml").write_text(f"<annotation><filename>a.jpg</filename>{size}{obj}</annotation>")
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        ds = open_dataset(f"voc:{tmp_path}", class_names=["dog"])
    assert ds.stats["inverted_boxes"] == 1 and "xmax < xmin" in caplog.text
    (tmp_path / "Annotations" / "b.xml").write_text(
        f"<annotation><filename>../../etc/x.jpg</filename>{size}{obj}</annotation>")
    with pytest.raises(DataError, match=r"b\.xml: field 'filename' = '\.\./\.\./etc/x\.jpg' points outside"):
        open_dataset(f"voc:{tmp_path}", class_names=["dog"])
