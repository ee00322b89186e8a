"""Bad dataset input found by a user audit: each is one clear error naming the file and field (exit
2 on the CLI), never a traceback or a silent run that learns nothing / scores the wrong classes.

Tiny synthetic datasets (32x32 PNGs) written to tmp_path; library functions are called directly,
the CLI only through in-process ``main`` calls of ``show`` (no training runs).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from damo_jax.data_pipelines import DataError, DetectionDataset, TrainLoader, open_dataset


# --------------------------------------------------------------------------------------------------
# tiny datasets
# --------------------------------------------------------------------------------------------------
def _png(path: Path, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(path)


def make_yolo(root: Path, *, names=("a", "b"), labels=True, label_text="0 0.5 0.5 0.4 0.4\n",
              n: int = 2) -> Path:
    for split in ("train", "val"):
        for i in range(n):
            _png(root / "images" / split / f"{i}.png")
            if labels:
                lbl = root / "labels" / split / f"{i}.txt"
                lbl.parent.mkdir(parents=True, exist_ok=True)
                lbl.write_bytes(label_text.encode("utf-8") if isinstance(label_text, str) else label_text)
    yaml = root / "data.yaml"
    yaml.write_text(f"path: {root}\ntrain: images/train\nval: images/val\n"
                    f"names: [{', '.join(names)}]\n")
    return yaml


def make_coco(root: Path, *, split: str = "train", n: int = 2, cats=((1, "a"), (2, "b")),
              crowd: bool = False, annotations: bool = True, images: bool = True) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    imgs, anns = [], []
    for i in range(n if images else 0):
        _png(root / f"{split}2017" / f"{i}.png")
        imgs.append({"id": i + 1, "file_name": f"{i}.png", "width": 32, "height": 32})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": cats[0][0], "bbox": [4, 4, 10, 10],
                     "area": 100, "iscrowd": int(crowd)})
    (root / f"{split}2017").mkdir(exist_ok=True)
    data = {"images": imgs, "categories": [{"id": c, "name": name} for c, name in cats]}
    if annotations:
        data["annotations"] = anns
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(data))
    return path


def make_voc(root: Path, *, difficult: int = 0, n: int = 2) -> Path:
    for split in ("train", "val"):
        for i in range(n):
            _png(root / split / f"{i}.png")
            (root / split / f"{i}.xml").write_text(
                f"<annotation><size><width>32</width><height>32</height></size><object><name>a</name>"
                f"<difficult>{difficult}</difficult><bndbox><xmin>4</xmin><ymin>4</ymin><xmax>20</xmax>"
                f"<ymax>20</ymax></bndbox></object></annotation>")
    return root


def train_cfg(train: str, val: str | None = None):
    from damo_jax.config import load_config
    cfg = load_config("demo")
    cfg.data.train = train
    cfg.data.val = val
    cfg.data.train_split, cfg.data.val_split = "train", "val"
    return cfg


def show_main(argv, capsys) -> str:
    """``damo-jax show`` in-process: the exit code must be 2 and stderr one ``error:`` line."""
    from damo_jax.data_pipelines.show import main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# 1. spec options (?key=value) pass the CLI's path check; unknown options list the known ones
# --------------------------------------------------------------------------------------------------
def test_cli_spec_check_strips_reader_options(tmp_path):
    from damo_jax.cli.common import check_data_spec
    make_coco(tmp_path / "coco")
    make_voc(tmp_path / "voc")
    for spec in (f"coco:{tmp_path / 'coco'}?allow_outside_root=1", f"voc:{tmp_path / 'voc'}?difficult=keep",
                 f"{tmp_path / 'coco/annotations/instances_train2017.json'}?allow_outside_root=1"):
        assert check_data_spec(spec) == spec
        assert len(open_dataset(spec, "train")) == 2          # and the library accepts it
    with pytest.raises(DataError, match=r"unknown option 'bogus' .*known: allow_outside_root, image_dir"):
        check_data_spec(f"coco:{tmp_path / 'coco'}?bogus=1")
    from damo_jax.errors import InputPathError
    with pytest.raises(InputPathError, match="does not exist"):     # the path itself is still checked
        check_data_spec(f"coco:{tmp_path / 'nowhere'}?allow_outside_root=1")


def test_show_accepts_spec_options(tmp_path, capsys):
    from damo_jax.data_pipelines.show import main
    make_voc(tmp_path / "voc", difficult=1)
    out = tmp_path / "s.png"
    main(["--data", f"voc:{tmp_path / 'voc'}?difficult=keep", "--out", str(out), "--num", "1",
          "--img-size", "64"])
    assert out.is_file()


# --------------------------------------------------------------------------------------------------
# 2. yolo:FOLDER instead of yolo:FOLDER/data.yaml
# --------------------------------------------------------------------------------------------------
def test_yolo_folder_instead_of_yaml(tmp_path, capsys):
    make_yolo(tmp_path / "y")
    with pytest.raises(DataError, match=r"is a folder; pass its data YAML \(e\.g\. yolo:.*data\.yaml"):
        open_dataset(f"yolo:{tmp_path / 'y'}", "train")
    line = show_main(["--data", f"yolo:{tmp_path / 'y'}", "--out", str(tmp_path / "s.png")], capsys)
    assert "is a folder" in line


# --------------------------------------------------------------------------------------------------
# 3. an empty COCO split: a clean error (as YOLO / VOC), also in `show`
# --------------------------------------------------------------------------------------------------
def test_empty_coco_split_is_an_error(tmp_path, capsys):
    root = tmp_path / "c"
    make_coco(root, split="train")
    ann = make_coco(root, split="val", images=False)
    with pytest.raises(DataError, match=r"instances_val2017\.json: split 'val' has no images"):
        open_dataset(f"coco:{root}", "val")
    line = show_main(["--data", f"coco:{root}", "--split", "val", "--out", str(tmp_path / "s.png")], capsys)
    assert str(ann) in line and "has no images" in line


def test_loader_on_empty_dataset_is_a_data_error():
    empty = DetectionDataset([], ["a"], [1], name="empty-set")
    with pytest.raises(DataError, match="'empty-set' has no images"):
        TrainLoader(empty, {}, batch_size=1, seed=0, steps_per_epoch=1, total_steps=1, no_aug_start_step=1)


# --------------------------------------------------------------------------------------------------
# 4. a training split without a single usable box is refused (with the reader's hint)
# --------------------------------------------------------------------------------------------------
def _no_boxes_case(case: str, tmp_path: Path) -> tuple[str, str]:
    """(spec, a piece of the reader's hint) of a training split without one usable box."""
    if case == "yolo: no labels folder":
        return f"yolo:{make_yolo(tmp_path, labels=False)}", str(tmp_path / "labels" / "train" / "0.txt")
    if case == "yolo: empty label files":
        return f"yolo:{make_yolo(tmp_path, label_text='')}", "have no usable"
    if case == "voc: all difficult":
        return f"voc:{make_voc(tmp_path, difficult=1)}", "difficult=keep"
    make_coco(tmp_path, split="val")
    if case == "coco: all crowd":
        make_coco(tmp_path, crowd=True)
        return f"coco:{tmp_path}", "have iscrowd=1"
    make_coco(tmp_path, annotations=False)
    return f"coco:{tmp_path}", "has no field 'annotations'"


@pytest.mark.parametrize("case", ["yolo: no labels folder", "yolo: empty label files", "coco: all crowd",
                                  "coco: no annotations", "voc: all difficult"])
def test_training_split_without_boxes_is_refused(case, tmp_path):
    from damo_jax.train.loop import open_datasets
    spec, hint = _no_boxes_case(case, tmp_path)
    with pytest.raises(DataError) as info:
        open_datasets(train_cfg(spec))
    msg = str(info.value)
    assert "training split has no boxes" in msg and spec in msg and hint in msg, msg
    assert "\n" not in msg
    assert len(open_dataset(spec, "train")) == 2      # the reader itself accepts it (eval on negatives)


# --------------------------------------------------------------------------------------------------
# 5. train and val class lists must agree (count, then names and order)
# --------------------------------------------------------------------------------------------------
def test_val_with_another_class_count_is_refused(tmp_path):
    from damo_jax.train.loop import open_datasets
    make_coco(tmp_path / "c")
    make_coco(tmp_path / "c", split="val", cats=((1, "a"), (2, "b"), (3, "c")))
    with pytest.raises(DataError, match=r"validation data .*'val'.* has 3 classes .* training data .* has 2"):
        open_datasets(train_cfg(f"coco:{tmp_path / 'c'}"))


def test_val_with_other_class_names_is_refused(tmp_path):
    from damo_jax.train.loop import open_datasets
    make_coco(tmp_path / "t")
    make_coco(tmp_path / "v", split="val", cats=((1, "b"), (2, "a")))
    cfg = train_cfg(f"coco:{tmp_path / 't'}", f"coco:{tmp_path / 'v'}")
    with pytest.raises(DataError, match=r"class 0 is 'b' in the validation data but 'a' in the training"):
        open_datasets(cfg)
    make_coco(tmp_path / "v", split="val")                   # the same list: fine
    train_ds, val_ds = open_datasets(cfg)
    assert val_ds is not None and cfg.model.class_names == ("a", "b")


def test_bad_validation_data_stops_training_a_missing_split_does_not(tmp_path, caplog):
    """A val annotation file that is there but bad (an unknown category, a missing field) turned
    evaluation off with one warning, and the run went on without it: now an error, as for the
    training data. A dataset without a val split still trains, without evaluation, with a warning."""
    import logging
    from damo_jax.train.loop import open_datasets
    make_coco(tmp_path / "c")
    cfg = train_cfg(f"coco:{tmp_path / 'c'}")
    with caplog.at_level(logging.WARNING):
        train_ds, val_ds = open_datasets(cfg)
    assert val_ds is None and "no annotation file for split 'val'" in caplog.text
    ann = make_coco(tmp_path / "c", split="val")
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_val2017\.json.*99"):
        open_datasets(train_cfg(f"coco:{tmp_path / 'c'}"))
    del data["annotations"][0]["bbox"]
    data["annotations"][0]["category_id"] = 1
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"missing field 'bbox'"):
        open_datasets(train_cfg(f"coco:{tmp_path / 'c'}"))


# --------------------------------------------------------------------------------------------------
# 6. UTF-8 BOM in label files; duplicate class names
# --------------------------------------------------------------------------------------------------
def test_yolo_label_file_with_bom(tmp_path):
    yaml = make_yolo(tmp_path / "y", label_text=b"\xef\xbb\xbf1 0.5 0.5 0.4 0.4\r\n0 0.2 0.2 0.1 0.1\r\n")
    ds = open_dataset(f"yolo:{yaml}", "train")
    assert ds[0]["labels"].tolist() == [1, 0]


def test_duplicate_class_names_are_refused(tmp_path):
    yaml = make_yolo(tmp_path / "y", names=("a", "a"))
    with pytest.raises(DataError, match=r"data\.yaml: field 'names': classes 0 and 1 have the same name 'a'"):
        open_dataset(f"yolo:{yaml}", "train")
    make_coco(tmp_path / "c", cats=((1, "a"), (7, "a")))
    with pytest.raises(DataError, match=r"instances_train2017\.json: categories\[1\]: field 'name': 'a' is "
                                        r"also the name of category id 1"):
        open_dataset(f"coco:{tmp_path / 'c'}", "train")
    voc = make_voc(tmp_path / "v")
    (voc / "classes.txt").write_text("a\nb\na\n")
    with pytest.raises(DataError, match=r"classes\.txt: classes 0 and 2 have the same name 'a'"):
        open_dataset(f"voc:{voc}", "train")


# --------------------------------------------------------------------------------------------------
# 7. an unknown format prefix
# --------------------------------------------------------------------------------------------------
def test_unknown_format_prefix(tmp_path, monkeypatch, capsys):
    from damo_jax.cli.common import check_data_spec
    from damo_jax.errors import ConfigError
    with pytest.raises(ConfigError, match=r"unknown dataset format 'foo' \(known: demo, coco, yolo, voc, tfds\)"):
        check_data_spec("foo:bar")
    with pytest.raises(Exception) as info:                     # a drive letter is a path, not a format
        check_data_spec("C:/data/x.json")
    assert "unknown dataset format" not in str(info.value)
    monkeypatch.chdir(tmp_path)                                # a path with ':' that exists as given
    (tmp_path / "my:set.json").write_text("{}")
    assert check_data_spec("my:set.json") == "my:set.json"
    line = show_main(["--data", "foo:bar", "--out", str(tmp_path / "s.png")], capsys)
    assert "unknown dataset format 'foo'" in line


def test_coco_summary_says_dropped_boxes_stay_in_the_evaluation_ground_truth(tmp_path):
    """COCO evaluation scores the annotation file as it is (pycocotools, the official code), so a
    box the reader drops for training still counts as ground truth there: the start-up summary
    says so (the audit found 'dropped 1' beside 2 scored instances, unexplained). A YOLO split,
    whose ground truth is built from the kept boxes, does not say it."""
    ann = make_coco(tmp_path / "coco")
    data = json.loads(ann.read_text())
    data["annotations"][1]["bbox"] = [20, 20, -5, 6]                 # inverted: dropped
    ann.write_text(json.dumps(data))
    ds = open_dataset(f"coco:{tmp_path / 'coco'}", "train")
    summary = ds.summary("eval data")
    assert "dropped 1" in summary and "stay in the COCO evaluation's ground truth" in summary
    assert len(ds.to_coco_dict()["annotations"]) == 2
    clean = open_dataset(f"coco:{make_coco(tmp_path / 'clean')}", "train").summary("eval data")
    assert "ground truth" not in clean
    two_lines = "0 0.5 0.5 0.4 0.4\n0 2 2 0.1 0.1\n"                  # the second box is outside
    yolo = open_dataset(f"yolo:{make_yolo(tmp_path / 'y', label_text=two_lines)}", "train")
    assert "dropped" in yolo.summary() and "ground truth" not in yolo.summary()
