"""Evaluation never dies on a bad image: unreadable val images are skipped, logged with file and
reason, left out of the COCO ground truth (not counted as images without detections), and the
result says how many images were scored and skipped."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from damo_jax.data_pipelines import DataError, eval_batches, open_dataset
from damo_jax.evaluation.coco import coco_evaluate
from damo_jax.evaluation.evaluator import collect_detections, evaluate
from data_helpers import make_coco_dataset
from eval_fakes import ColorBoxDataset, ColorBoxOracle
from test_eval_cli import oracle_config, write_coco_folder


def _break(path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    else:                                            # not an image at all
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_batches_turn_unreadable_images_into_logged_invalid_rows(tmp_path, caplog, workers):
    ds, _ = make_coco_dataset(tmp_path, n=7)
    _break(tmp_path / "train2017" / "000003.png", "garbage")
    _break(tmp_path / "train2017" / "000005.png", "missing")
    skipped = []
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        batches = list(eval_batches(ds, (64, 64), 4, workers=workers, skipped=skipped))
    assert len(batches) == 2
    ids = np.concatenate([b["image_ids"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert ids[valid].tolist() == [1, 2, 4, 6, 7]
    assert (ids[~valid] == -1).all() and not np.concatenate([b["images"] for b in batches])[~valid].any()
    assert [(s["index"], s["image_id"]) for s in skipped] == [(2, 3), (4, 5)]
    assert skipped[0]["file"].endswith("000003.png") and "cannot identify the image format" in skipped[0]["reason"]
    assert "file not found" in skipped[1]["reason"]
    for name in ("000003.png", "000005.png"):
        assert f"skipping image (not scored): {tmp_path / 'train2017' / name}" in caplog.text


def test_eval_batches_process_slices_cover_the_readable_images_once(tmp_path):
    ds, _ = make_coco_dataset(tmp_path, n=7)
    _break(tmp_path / "train2017" / "000002.png", "truncated")
    per_process = [list(eval_batches(ds, (32, 32), 4, process_index=p, process_count=2)) for p in (0, 1)]
    assert len(per_process[0]) == len(per_process[1]) == 2          # same count: no collective hangs
    seen = [i for batches in per_process for b in batches for i in b["image_ids"][b["valid"]].tolist()]
    assert sorted(seen) == [1, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="split evenly"):
        next(eval_batches(ds, (32, 32), 3, process_index=0, process_count=2))


@pytest.fixture(scope="module")
def oracle():
    model = ColorBoxOracle()
    return model, model.init(jax.random.key(0), jnp.zeros((1, 64, 96, 3)))


def test_evaluate_scores_only_the_images_it_could_read(tmp_path, oracle):
    """The oracle finds every box of the images it sees, so AP50 over the scored images is 1.0;
    counting the unreadable images as 'no detections' would give less (checked independently)."""
    fake = ColorBoxDataset(num_images=5)
    root = write_coco_folder(tmp_path / "coco", fake)
    gt = fake.to_coco_dict()
    broken = gt["images"][2]
    _break(root / "val" / broken["file_name"], "truncated")
    ds = open_dataset(f"coco:{root}", "val")
    cfg = oracle_config()
    stats = evaluate(*oracle, ds, cfg, progress=False)
    assert stats["images_scored"] == 4 and stats["images_skipped"] == 1
    assert stats["AP50"] == pytest.approx(1.0)
    dets = collect_detections(*oracle, ds, cfg, progress=False)
    assert broken["id"] not in {d["image_id"] for d in dets}
    # independent reference: the ground truth of the 4 readable images, built by hand
    kept = {"images": [im for im in gt["images"] if im["id"] != broken["id"]],
            "annotations": [a for a in gt["annotations"] if a["image_id"] != broken["id"]],
            "categories": gt["categories"]}
    ref = coco_evaluate(kept, dets, use_fast=False)
    assert {k: stats[k] for k in ref} == pytest.approx(ref)
    assert coco_evaluate(gt, dets)["AP50"] < 0.95         # what silently counting them would give


def test_evaluate_with_no_readable_image_is_one_data_error(tmp_path, oracle):
    fake = ColorBoxDataset(num_images=2)
    root = write_coco_folder(tmp_path / "coco", fake)
    for im in fake.to_coco_dict()["images"]:
        _break(root / "val" / im["file_name"], "garbage")
    ds = open_dataset(f"coco:{root}", "val")
    with pytest.raises(DataError, match=r"none of the 2 images of .* could be read"):
        evaluate(*oracle, ds, oracle_config(), progress=False)
    for im in fake.to_coco_dict()["images"]:          # none on disk: refused when the data opens
        _break(root / "val" / im["file_name"], "missing")
    with pytest.raises(DataError, match=r"none of its 2 images is in .*wrong image folder"):
        open_dataset(f"coco:{root}", "val")


def test_coco_images_missing_on_disk_are_counted_when_the_data_opens(tmp_path, caplog):
    """The audit: with a listed image deleted the start-up line said "(0 skipped)" and the skip
    came later, sample by sample. Now the open counts it and warns once."""
    from damo_jax.data_pipelines.quality import format_summary
    fake = ColorBoxDataset(num_images=3)
    root = write_coco_folder(tmp_path / "coco", fake)
    _break(root / "val" / fake.to_coco_dict()["images"][1]["file_name"], "missing")
    with caplog.at_level(logging.WARNING):
        ds = open_dataset(f"coco:{root}", "val")
    assert ds.stats["image_files_not_found"] == 1
    assert "1 of 3 listed images not found" in caplog.text
    assert "3 images (0 skipped; 1 listed with no image file, skipped when read)" in format_summary(ds, "val data")


def test_clean_dataset_reports_all_images_scored(oracle):
    stats = evaluate(*oracle, ColorBoxDataset(num_images=3), oracle_config(), progress=False)
    assert stats["images_scored"] == 3 and stats["images_skipped"] == 0


def test_eval_cli_skips_counts_and_reports(tmp_path, capsys, caplog):
    """``damo-jax eval`` on a COCO folder with one truncated image: exit normally, the summary and
    the skip are logged, the printed stats carry images_scored / images_skipped; with every image
    missing: one ``error:`` line and exit code 2."""
    from damo_jax.config import load_config
    from damo_jax.evaluation.evaluator import main
    from eval_fakes import write_random_weights, write_two_class_config

    fake = ColorBoxDataset(num_images=3)
    root = write_coco_folder(tmp_path / "coco", fake)
    images = fake.to_coco_dict()["images"]
    _break(root / "val" / images[1]["file_name"], "truncated")
    config_file = write_two_class_config(tmp_path / "two_class.py")
    weights = write_random_weights(tmp_path / "w.npz", load_config(str(config_file)))
    args = ["--config", str(config_file), "--weights", str(weights), "--data", f"coco:{root}", "--split",
            "val", "--img-size", "64", "64", "--batch-size", "2", "--no-progress"]
    with caplog.at_level(logging.INFO):
        stats = main(args)
    out = capsys.readouterr().out
    assert stats["images_scored"] == 2 and stats["images_skipped"] == 1
    assert '"images_scored": 2' in out and '"images_skipped": 1' in out
    log_text = caplog.text
    assert "eval data coco:" in log_text and "3 images (0 skipped)" in log_text
    assert f"skipping image (not scored): {root / 'val' / images[1]['file_name']}" in log_text
    assert "2 images scored, 1 skipped" in log_text
    for im in images:
        (root / "val" / im["file_name"]).unlink(missing_ok=True)
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "none of its 3 images is in" in errors[0] and "Traceback" not in err


def test_repeated_annotation_ids_do_not_drop_ground_truth_boxes(tmp_path, caplog):
    """COCOeval keys the ground truth by annotation id: two annotations with one id (or an id
    equal to the index number given to an annotation without one) lost a box, and the same
    detections scored AP50 0.821 instead of 0.851 in the audit, silently. Repeats are now
    renumbered (warned, counted) and perfect detections score 1.0."""
    import json
    fake = ColorBoxDataset(num_images=3)
    root = write_coco_folder(tmp_path / "coco", fake)
    ann_file = root / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    assert len(data["annotations"]) >= 3
    data["annotations"][1]["id"] = data["annotations"][0]["id"]          # a repeat
    del data["annotations"][2]["id"]                                     # -> index number 3
    data["annotations"][0]["id"] = 3                                     # ... which collides
    ann_file.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        ds = open_dataset(f"coco:{root}", "val")
    gt = ds.to_coco_dict()
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"]) == len(data["annotations"])
    assert "annotation id(s) repeat" in caplog.text and ds.stats["renumbered_annotation_ids"] > 0
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9} for a in data["annotations"]]
    stats = coco_evaluate(gt, perfect)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("bad_id", [0, -4])
def test_annotation_ids_below_one_are_renumbered(tmp_path, caplog, bad_id):
    """pycocotools' COCOeval stores the matched ground truth's id per detection, 0 meaning
    'unmatched': a ground-truth box with id 0 turned its true positive into a false positive
    (the audit: AP 0.4155 instead of 0.4199, one raw UserWarning). Ids < 1 are now renumbered
    like repeats (warned, counted) and perfect detections score 1.0."""
    import json
    fake = ColorBoxDataset(num_images=3)
    root = write_coco_folder(tmp_path / "coco", fake)
    ann_file = root / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["id"] = bad_id
    ann_file.write_text(json.dumps(data))
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9} for a in data["annotations"]]
    assert coco_evaluate(data, perfect)["AP50"] < 1.0 or bad_id != 0   # what the raw ids do
    with caplog.at_level(logging.WARNING):
        ds = open_dataset(f"coco:{root}", "val")
    gt = ds.to_coco_dict()
    assert min(a["id"] for a in gt["annotations"]) >= 1
    assert "are 0 or negative" in caplog.text and ds.stats["renumbered_annotation_ids"] == len(gt["annotations"])
    stats = coco_evaluate(gt, perfect)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP"] == pytest.approx(1.0)


def test_ground_truth_without_boxes_says_why_the_stats_are_minus_one(tmp_path, oracle, caplog):
    """Every stat is -1 when the scored images hold no boxes (COCO leaves AP undefined); the audit
    found that reported with no word of why. Now a warning says so."""
    import json
    root = write_coco_folder(tmp_path / "coco", ColorBoxDataset(num_images=2))
    ann_file = root / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    data["annotations"] = []
    ann_file.write_text(json.dumps(data))
    ds = open_dataset(f"coco:{root}", "val")
    with caplog.at_level(logging.WARNING):
        stats = evaluate(*oracle, ds, oracle_config(), progress=False)
    assert stats["AP"] == -1 and stats["AP50"] == -1 and stats["images_scored"] == 2
    assert "have no ground-truth boxes: COCO AP and AR are undefined and reported as -1" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):                       # with boxes: no such warning
        evaluate(*oracle, open_dataset(f"coco:{write_coco_folder(tmp_path / 'c2', ColorBoxDataset(num_images=2))}",
                                       "val"), oracle_config(), progress=False)
    assert "no ground-truth boxes" not in caplog.text


def test_images_the_yolo_reader_skips_at_open_count_as_skipped(tmp_path, oracle):
    """A YOLO val image whose header cannot be read is left out when the data opens; the result's
    images_skipped used to count only the images skipped later, when read."""
    from PIL import Image
    fake = ColorBoxDataset(num_images=4)
    for sub in ("images/val", "labels/val"):
        (tmp_path / sub).mkdir(parents=True)
    for i, rec in enumerate(fake.records):
        Image.fromarray(rec["image"]).save(tmp_path / "images" / "val" / f"{i}.png")
        h, w = rec["orig_size"]
        with open(tmp_path / "labels" / "val" / f"{i}.txt", "w") as f:
            for (x1, y1, x2, y2), c in zip(rec["boxes"], rec["labels"]):
                f.write(f"{c} {(x1 + x2) / 2 / w} {(y1 + y2) / 2 / h} {(x2 - x1) / w} {(y2 - y1) / h}\n")
    (tmp_path / "data.yaml").write_text(f"path: {tmp_path}\nval: images/val\nnames: [red, green]\n")
    _break(tmp_path / "images" / "val" / "3.png", "garbage")
    ds = open_dataset(str(tmp_path / "data.yaml"), "val")
    assert len(ds) == 3 and ds.stats["skipped_images"] == 1
    stats = evaluate(*oracle, ds, oracle_config(), progress=False)
    assert stats["images_scored"] == 3 and stats["images_skipped"] == 1
    assert stats["AP50"] == pytest.approx(1.0)
