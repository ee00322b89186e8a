"""Readers (COCO, YOLO, VOC) and ``open_dataset`` spec parsing, on tiny generated datasets."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_helpers import random_scene, write_coco
from damo_jax.data_pipelines import DataError, open_dataset


# ---------------------------------------------------------------------------------------------- COCO
def _coco_with_edge_cases(tmp_path):
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng, 64, 80) for _ in range(3)]
    scenes.append((np.zeros((64, 80, 3), np.uint8), np.zeros((0, 4)), np.zeros((0,), int)))  # negative
    extra = [
        {"id": 900, "image_id": 1, "category_id": 10, "bbox": [5, 5, 20, 20], "iscrowd": 1, "area": 300.0},
        {"id": 901, "image_id": 2, "category_id": 13, "bbox": [70, 50, 30, 30]},   # crosses the border
        {"id": 902, "image_id": 2, "category_id": 13, "bbox": [10, 10, 0, 5]},     # zero width
        {"id": 903, "image_id": 3, "category_id": 16, "bbox": [-10, -5, 5, 5]},    # fully outside
    ]
    write_coco(tmp_path, scenes, extra_annotations=extra)
    return scenes


def test_coco_reader_cleans_boxes_and_keeps_negatives(tmp_path):
    scenes = _coco_with_edge_cases(tmp_path)
    ds = open_dataset(f"coco:{tmp_path}", "train")
    assert len(ds) == 4 and ds.num_classes == 6
    assert ds.category_ids == tuple(10 + 3 * k for k in range(6))
    assert ds.stats["crowd_boxes"] == 1 and ds.stats["clipped_boxes"] == 1
    assert ds.stats["zero_size_boxes"] == 1 and ds.stats["outside_boxes"] == 1
    assert ds.stats["images_without_boxes"] == 1
    s0 = ds[0]
    np.testing.assert_allclose(s0["boxes"], scenes[0][1])
    np.testing.assert_array_equal(s0["labels"], scenes[0][2])
    np.testing.assert_array_equal(s0["image"], scenes[0][0])
    assert s0["image"].dtype == np.uint8 and s0["orig_size"] == (64, 80) and s0["image_id"] == 1
    s1 = ds[1]  # clipped box appended after the scene's boxes: [70, 50, 80, 64], label 1
    np.testing.assert_allclose(s1["boxes"][-1], [70, 50, 80, 64])
    assert s1["labels"][-1] == 1 and len(s1["boxes"]) == len(scenes[1][1]) + 1
    assert len(ds[3]["boxes"]) == 0 and ds[3]["boxes"].shape == (0, 4)


def test_coco_reader_keeps_each_used_objects_polygons(tmp_path):
    """SPEC §9.2 / the official pull_item: all polygons of an object concatenated into one outline;
    crowd objects, RLE masks, malformed polygons and dropped boxes give none; outlines stay paired
    with their boxes."""
    img = np.zeros((40, 60, 3), np.uint8)
    write_coco(tmp_path, [(img, np.zeros((0, 4)), np.zeros((0,), int))], extra_annotations=[
        {"id": 1, "image_id": 1, "category_id": 10, "bbox": [2, 2, 10, 10],
         "segmentation": [[2, 2, 12, 2, 12, 12], [2, 12, 7, 7]]},                 # two polygons
        {"id": 2, "image_id": 1, "category_id": 13, "bbox": [20, 5, 0, 5],
         "segmentation": [[20, 5, 20, 10, 21, 10]]},                              # zero width: dropped
        {"id": 3, "image_id": 1, "category_id": 13, "bbox": [20, 20, 10, 10],
         "segmentation": {"counts": "abc", "size": [40, 60]}},                    # RLE
        {"id": 4, "image_id": 1, "category_id": 16, "bbox": [30, 2, 10, 10], "iscrowd": 1,
         "segmentation": [[30, 2, 40, 2, 40, 12]]},                               # crowd: ignored
        {"id": 5, "image_id": 1, "category_id": 16, "bbox": [40, 20, 10, 10],
         "segmentation": [[40, 20, 50, 20, "x", 30]]},                            # malformed
        {"id": 6, "image_id": 1, "category_id": 19, "bbox": [5, 25, 10, 10]},    # no segmentation
    ])
    ds = open_dataset(f"coco:{tmp_path}", "train")
    s = ds[0]
    np.testing.assert_allclose(s["boxes"], [[2, 2, 12, 12], [20, 20, 30, 30], [40, 20, 50, 30],
                                            [5, 25, 15, 35]])
    assert len(s["segments"]) == 4
    np.testing.assert_array_equal(s["segments"][0], [[2, 2], [12, 2], [12, 12], [2, 12], [7, 7]])
    assert s["segments"][1:] == [None, None, None]
    assert ds.stats["polygons_not_used"] == 2


def test_coco_labels_follow_the_files_category_order(tmp_path):
    """The official COCODataset numbers categories in pycocotools' getCatIds() order, i.e. the
    order of the file's ``categories`` list, not sorted by id."""
    img = np.zeros((20, 20, 3), np.uint8)
    write_coco(tmp_path, [(img, np.array([[2, 2, 8, 8], [10, 10, 18, 18]]), np.array([0, 1]))],
               names=["zebra", "apple"], category_ids=[7, 3])
    ds = open_dataset(f"coco:{tmp_path}", "train")
    assert ds.category_ids == (7, 3) and ds.class_names == ("zebra", "apple")
    np.testing.assert_array_equal(ds[0]["labels"], [0, 1])
    assert [c["id"] for c in ds.to_coco_dict()["categories"]] == [7, 3]


def test_coco_to_coco_dict_is_the_source_ground_truth(tmp_path):
    _coco_with_edge_cases(tmp_path)
    ds = open_dataset(f"coco:{tmp_path}", "train")
    gt = ds.to_coco_dict()
    src = json.loads((tmp_path / "annotations" / "instances_train2017.json").read_text())
    assert len(gt["annotations"]) == len(src["annotations"])
    crowd = [a for a in gt["annotations"] if a["id"] == 900][0]
    assert crowd["iscrowd"] == 1 and crowd["area"] == 300.0 and crowd["category_id"] == 10
    assert {c["id"] for c in gt["categories"]} == set(ds.category_ids)
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert len(coco.getImgIds()) == 4


def test_coco_json_path_and_bare_json_spec(tmp_path):
    _coco_with_edge_cases(tmp_path)
    ann = tmp_path / "annotations" / "instances_train2017.json"
    for spec in (f"coco:{ann}", str(ann)):
        ds = open_dataset(spec)
        assert len(ds) == 4 and ds[0]["image"].shape == (64, 80, 3)


def test_coco_unknown_category_and_image_ids_name_file_and_value(tmp_path):
    rng = np.random.default_rng(0)
    write_coco(tmp_path, [random_scene(rng, 32, 32)],
               extra_annotations=[{"id": 5, "image_id": 1, "category_id": 777, "bbox": [1, 1, 4, 4]}])
    with pytest.raises(DataError, match=r"instances_train2017\.json.*777"):
        open_dataset(f"coco:{tmp_path}")
    write_coco(tmp_path, [random_scene(rng, 32, 32)],
               extra_annotations=[{"id": 5, "image_id": 42, "category_id": 10, "bbox": [1, 1, 4, 4]}])
    with pytest.raises(DataError, match=r"image_id.*42"):
        open_dataset(f"coco:{tmp_path}")


def test_coco_missing_split_lists_what_was_tried(tmp_path):
    (tmp_path / "annotations").mkdir()
    with pytest.raises(DataError, match="instances_val2017.json"):
        open_dataset(f"coco:{tmp_path}", "val")


def test_coco_annotation_name_that_is_a_folder_is_named(tmp_path):
    (tmp_path / "annotations" / "instances_val.json").mkdir(parents=True)
    with pytest.raises(DataError, match=r"instances_val\.json is a folder"):
        open_dataset(f"coco:{tmp_path}", "val")
    with pytest.raises(DataError, match=r"a folder, not an annotation file"):
        open_dataset(f"coco:{tmp_path / 'annotations' / 'instances_val.json'}", "val")


# ---------------------------------------------------------------------------------------------- YOLO
def _write_yolo(root, names_yaml: str):
    for split, n in (("train", 3), ("val", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((50, 100, 3), 40 * i, np.uint8)).save(root / "images" / split / f"{i}.jpg")
    lab = root / "labels" / "train"
    (lab / "0.txt").write_text("0 0.5 0.5 0.2 0.4\n2 0.1 0.1 0.4 0.4\n")   # second box clipped at 0
    (lab / "1.txt").write_text("\n1 0.1 0.2 0.3 0.2 0.3 0.6\n")              # polygon
    # 2.jpg has no label file: a negative
    (root / "labels" / "val" / "0.txt").write_text("2 0.5 0.5 1.0 1.0\n")
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\n{names_yaml}\n")


@pytest.mark.parametrize("names_yaml", ["names: [a, b, c]", "names:\n  0: a\n  1: b\n  2: c"])
def test_yolo_reader(tmp_path, names_yaml):
    _write_yolo(tmp_path, names_yaml)
    ds = open_dataset(f"yolo:{tmp_path / 'data.yaml'}", "train")
    assert ds.class_names == ("a", "b", "c") and len(ds) == 3
    s = ds[0]
    np.testing.assert_allclose(s["boxes"], [[40, 15, 60, 35], [0, 0, 30, 15]], atol=1e-4)
    np.testing.assert_array_equal(s["labels"], [0, 2])
    np.testing.assert_allclose(ds[1]["boxes"], [[10, 10, 30, 30]], atol=1e-4)  # polygon hull
    # the polygon rides along in pixels (the random affine's boxes, SPEC §9.2); box lines have none
    np.testing.assert_allclose(ds[1]["segments"][0], [[10, 10], [30, 10], [30, 30]], atol=1e-4)
    assert "segments" not in ds[0]
    assert ds.stats["missing_label_files"] == 1 and len(ds[2]["boxes"]) == 0
    assert ds.stats["clipped_boxes"] == 1
    val = open_dataset(f"yolo:{tmp_path / 'data.yaml'}", "val")
    np.testing.assert_allclose(val[0]["boxes"], [[0, 0, 100, 50]])
    gt = val.to_coco_dict()
    assert gt["annotations"][0]["bbox"] == [0.0, 0.0, 100.0, 50.0]


def test_yolo_bad_lines_raise_with_file_and_line(tmp_path):
    _write_yolo(tmp_path, "names: [a, b, c]")
    (tmp_path / "labels" / "train" / "1.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match=r"1\.txt:2: unknown class index '7'"):
        open_dataset(f"yolo:{tmp_path / 'data.yaml'}")
    (tmp_path / "labels" / "train" / "1.txt").write_text("0 0.5 zero 0.2 0.2\n")
    with pytest.raises(DataError, match=r"1\.txt:1: non-numeric"):
        open_dataset(f"yolo:{tmp_path / 'data.yaml'}")
    (tmp_path / "labels" / "train" / "1.txt").write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(DataError, match=r"1\.txt:1: expected"):
        open_dataset(f"yolo:{tmp_path / 'data.yaml'}")


@pytest.mark.parametrize("kpt_shape", [(12, 2), (24, 3), (17, 3)])
def test_yolo_pose_labels_give_the_box_not_a_polygon(tmp_path, kpt_shape):
    """An Ultralytics pose line is 'class cx cy w h' + K·D keypoint values. With an odd count
    (tiger-pose [12, 2], dog-pose [24, 3]) it was read as a polygon whose corners were the centre,
    the size and the keypoints: a silently wrong box."""
    _write_yolo(tmp_path, "names: [a, b, c]")
    k, d = kpt_shape
    kpts = " ".join(["0.9 0.1" + (" 2" if d == 3 else "")] * k)
    (tmp_path / "labels" / "train" / "0.txt").write_text(f"2 0.1 0.1 0.4 0.4 {kpts}\n")
    (tmp_path / "labels" / "train" / "1.txt").write_text(f"1 0.5 0.5 0.2 0.4 {kpts}\n")
    with open(tmp_path / "data.yaml", "a") as f:
        f.write(f"kpt_shape: [{k}, {d}]\n")
    ds = open_dataset(f"yolo:{tmp_path / 'data.yaml'}", "train")
    np.testing.assert_allclose(ds[1]["boxes"], [[40, 15, 60, 35]], atol=1e-4)
    np.testing.assert_array_equal(ds[1]["labels"], [1])
    np.testing.assert_allclose(ds[0]["boxes"], [[0, 0, 30, 15]], atol=1e-4)
    (tmp_path / "labels" / "train" / "1.txt").write_text("1 0.5 0.5 0.2 0.4 0.9 0.1\n")
    with pytest.raises(DataError, match=rf"1\.txt:1: expected 'class cx cy w h' and the keypoints of "
                                        rf"kpt_shape: {5 + k * d} values, got 7"):
        open_dataset(f"yolo:{tmp_path / 'data.yaml'}", "train")


def test_yolo_pose_shape_must_be_valid(tmp_path):
    _write_yolo(tmp_path, "names: [a, b, c]\nkpt_shape: [17]")
    with pytest.raises(DataError, match=r"data.yaml: field 'kpt_shape' must be \[keypoints, 2 or 3\], got \[17\]"):
        open_dataset(f"yolo:{tmp_path / 'data.yaml'}", "train")


def test_yolo_duplicate_lines_are_removed_and_counted(tmp_path, caplog):
    """Repeated lines were kept: each copy a second ground-truth object that evaluation counts as
    missed (Ultralytics removes them)."""
    _write_yolo(tmp_path, "names: [a, b, c]")
    (tmp_path / "labels" / "train" / "1.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n0 0.5 0.50 0.2 0.2\n")
    ds = open_dataset(f"yolo:{tmp_path / 'data.yaml'}", "train")
    np.testing.assert_array_equal(ds[1]["labels"], [0, 1])     # same box, other class: kept
    assert ds.stats["duplicate_boxes_removed"] == 2
    assert "duplicate boxes removed 2" in ds.summary()
    assert any("2 label lines repeat a box" in r.getMessage() for r in caplog.records)


def test_yolo_yaml_variants_ultralytics_accepts(tmp_path, monkeypatch):
    """Quoted ``names`` keys, ``nc`` without ``names``, ``~`` in ``path``; a split folder that does
    not exist is named as such."""
    _write_yolo(tmp_path, "names:\n  '0': a\n  '1': b\n  '2': c")
    assert open_dataset(f"yolo:{tmp_path / 'data.yaml'}", "train").class_names == ("a", "b", "c")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\nnc: 3\n")
    assert open_dataset(f"yolo:{tmp_path / 'data.yaml'}", "train").class_names == (
        "class_0", "class_1", "class_2")
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    (tmp_path / "data.yaml").write_text(f"path: ~/{tmp_path.name}\ntrain: images/train\nnames: [a, b, c]\n")
    assert len(open_dataset(f"yolo:{tmp_path / 'data.yaml'}", "train")) == 3
    (tmp_path / "data.yaml").write_text("train: images/nope\nnames: [a, b, c]\n")
    with pytest.raises(DataError, match=r"split path .*images/nope does not exist \(relative paths are "
                                        r"read from the 'path' folder"):
        open_dataset(f"yolo:{tmp_path / 'data.yaml'}", "train")


# ----------------------------------------------------------------------------------------------- VOC
def _voc_xml(fname, objects, size=(100, 60)):
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, d, b in objects)
    sz = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    return f"<annotation><filename>{fname}</filename>{sz}{objs}</annotation>"


def _write_voc_devkit(root):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem in ("a", "b", "c"):
        Image.fromarray(np.zeros((60, 100, 3), np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
    (root / "Annotations" / "a.xml").write_text(_voc_xml("a.jpg", [("dog", 0, (11, 21, 50, 40)),
                                                                    ("cat", 1, (1, 1, 10, 10))]))
    # <filename> points elsewhere: the pairing uses the stem (b.xml -> b.jpg)
    (root / "Annotations" / "b.xml").write_text(_voc_xml("wrong_name.jpg", [("cat", 0, (1, 1, 100, 60))]))
    (root / "Annotations" / "c.xml").write_text(_voc_xml("c.jpg", [("bird", 0, (5, 5, 20, 20))], size=None))
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("c\n")


def test_voc_devkit_layout_and_difficult_modes(tmp_path):
    _write_voc_devkit(tmp_path)
    ds = open_dataset(f"voc:{tmp_path}", "train")
    assert ds.class_names == ("bird", "cat", "dog")  # from ALL xml files, sorted
    assert len(ds) == 2 and ds.stats["difficult_boxes"] == 1
    np.testing.assert_allclose(ds[0]["boxes"], [[10, 20, 50, 40]])  # 1-based → 0-based
    np.testing.assert_array_equal(ds[0]["labels"], [2])
    np.testing.assert_allclose(ds[1]["boxes"], [[0, 0, 100, 60]])
    gt = ds.to_coco_dict()
    assert sorted(a["iscrowd"] for a in gt["annotations"]) == [0, 0, 1]  # difficult → ignore region
    keep = open_dataset(f"voc:{tmp_path}", "train", difficult="keep")
    assert len(keep[0]["boxes"]) == 2
    drop = open_dataset(f"voc:{tmp_path}", "train", difficult="drop")
    assert len(drop.to_coco_dict()["annotations"]) == 2
    val = open_dataset(f"voc:{tmp_path}", "val")
    assert val.stats["size_from_image"] == 1 and val[0]["orig_size"] == (60, 100)


def test_voc_pairs_layout_given_classes_and_unknown_name(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    Image.fromarray(np.zeros((60, 100, 3), np.uint8)).save(folder / "x1.png")
    (folder / "x1.xml").write_text(_voc_xml("x1.png", [("car", 0, (2, 2, 30, 30))]))
    ds = open_dataset(f"voc:{tmp_path}", "train", class_names=["person", "car"])
    assert ds.class_names == ("person", "car") and ds[0]["labels"].tolist() == [1]
    with pytest.raises(DataError, match=r"x1\.xml.*'car'"):
        open_dataset(f"voc:{tmp_path}", "train", class_names=["person"])
    (folder / "x1.xml").write_text("<annotation><object><name>car</name></object>")
    with pytest.raises(DataError, match=r"x1\.xml: not valid XML"):
        open_dataset(f"voc:{tmp_path}", "train", class_names=["car"])


# ----------------------------------------------------------------------------------------- spec strings
@pytest.mark.parametrize("spec", ["", "nope", "foo:/x", "demo:abc", "demo:100"])
def test_bad_specs_raise_data_error(spec):
    with pytest.raises(DataError):
        open_dataset(spec)
