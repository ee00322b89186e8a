"""damo_jax.evaluation.evaluator: the evaluation protocol end to end, and the ``python -m damo_jax.evaluation.evaluator`` CLI."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from damo_jax.config import load_config
from damo_jax.evaluation.evaluator import collect_detections, evaluate, main

from eval_fakes import (CATEGORY_IDS, CLASS_NAMES, ColorBoxDataset, ColorBoxOracle, box_iou_numpy,
                        write_checkpoint, write_random_weights, write_two_class_config)

ROOT = Path(__file__).resolve().parent.parent


def oracle_config(image_size=(64, 96), batch_size=2) -> ml_collections.ConfigDict:
    cfg = load_config("s")
    cfg.model.head.num_classes = len(CLASS_NAMES)
    cfg.model.class_names = CLASS_NAMES
    cfg.test.image_size = image_size
    cfg.test.batch_size = batch_size
    cfg.test.max_dets = 20
    return cfg


@pytest.fixture(scope="module")
def oracle():
    model = ColorBoxOracle()
    return model, model.init(jax.random.key(0), jnp.zeros((1, 64, 96, 3)))


def test_protocol_maps_boxes_back_per_axis(oracle):
    dataset = ColorBoxDataset(num_images=5)
    cfg = oracle_config()
    dets = collect_detections(*oracle, dataset, cfg, progress=False)
    gt = dataset.to_coco_dict()["annotations"]
    assert len(dets) == len(gt)  # one detection per drawn box; the padded 6th image is dropped
    for ann in gt:
        det = [d for d in dets if d["image_id"] == ann["image_id"] and d["category_id"] == ann["category_id"]]
        assert len(det) == 1 and det[0]["score"] == pytest.approx(0.9)
        x, y, w, h = det[0]["bbox"]
        gx, gy, gw, gh = ann["bbox"]
        assert box_iou_numpy([x, y, x + w, y + h], [gx, gy, gx + gw, gy + gh]) > 0.85
    stats = evaluate(*oracle, dataset, cfg, progress=False)
    assert stats["AP50"] == pytest.approx(1.0) and stats["AP"] > 0.6
    assert stats == evaluate(*oracle, dataset, cfg, progress=False, use_fast=False)


def test_conf_threshold_from_config_and_class_mismatch(oracle):
    dataset = ColorBoxDataset(num_images=3)
    cfg = oracle_config()
    cfg.test.conf_thre = 0.9  # oracle scores are 0.9: strict '>' keeps nothing
    assert collect_detections(*oracle, dataset, cfg, progress=False) == []
    assert evaluate(*oracle, dataset, cfg, progress=False)["AP"] == 0.0
    cfg = oracle_config()
    cfg.model.head.num_classes = 80
    with pytest.raises(ValueError, match="80 classes.*2 classes"):
        evaluate(*oracle, dataset, cfg, progress=False)


def test_multi_device_sharded_eval_matches_single_device(oracle, tmp_path):
    """Batch sharded over 2 fake CPU devices (subprocess: XLA flags must precede jax import)."""
    script = (
        "import json, jax, jax.numpy as jnp, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from eval_fakes import ColorBoxDataset, ColorBoxOracle\n"
        "from test_eval_cli import oracle_config\n"
        "from damo_jax.evaluation.evaluator import evaluate\n"
        "assert jax.device_count() == 2\n"
        "m = ColorBoxOracle(); v = m.init(jax.random.key(0), jnp.zeros((1, 64, 96, 3)))\n"
        "print(json.dumps(evaluate(m, v, ColorBoxDataset(num_images=5), oracle_config(batch_size=4), progress=False)))\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    single = evaluate(*oracle, ColorBoxDataset(num_images=5), oracle_config(batch_size=4), progress=False)
    assert sharded == pytest.approx(single)


# ------------------------------------------------------------------------------------------ CLI

def write_coco_folder(root: Path, dataset: ColorBoxDataset) -> Path:
    """The colour-box dataset as a COCO folder (annotations/instances_val.json + images)."""
    coco = dataset.to_coco_dict()
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    for record, image in zip(dataset.records, coco["images"]):
        Image.fromarray(record["image"]).save(root / "val" / image["file_name"])
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return root


def test_cli_official_weights_on_coco_folder(tmp_path, capsys):
    dataset = ColorBoxDataset(num_images=3)
    coco_dir = write_coco_folder(tmp_path / "coco", dataset)
    config_file = write_two_class_config(tmp_path / "two_class.py")
    weights = write_random_weights(tmp_path / "w.npz", load_config(str(config_file)))
    out_json, stats_json = tmp_path / "dets.json", tmp_path / "stats.json"
    stats = main(["--config", str(config_file), "--weights", str(weights), "--data", f"coco:{coco_dir}",
                  "--split", "val", "--img-size", "64", "64", "--batch-size", "2", "--conf", "0.001",
                  "--max-dets", "50", "--json-out", str(out_json), "--stats-out", str(stats_json),
                  "--no-progress", "--pycocotools"])
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    assert json.loads(stats_json.read_text()) == stats
    dets = json.loads(out_json.read_text())
    assert dets and {d["category_id"] for d in dets} <= set(CATEGORY_IDS)
    per_image = {}
    for d in dets:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
        assert 0.001 < d["score"] <= 1.0
    assert set(per_image) <= {1000, 1001, 1002} and max(per_image.values()) <= 50
    # the same weights as a training checkpoint (config and class names from its meta)
    from damo_jax.interop.convert import from_torch_state_dict, read_state_dict_file
    cfg = load_config(str(config_file))
    run = write_checkpoint(tmp_path / "run", cfg, from_torch_state_dict(read_state_dict_file(weights), cfg),
                           CLASS_NAMES)
    again = main(["--checkpoint", str(run), "--data", f"coco:{coco_dir}", "--split", "val", "--img-size",
                  "64", "64", "--batch-size", "2", "--conf", "0.001", "--max-dets", "50", "--no-progress"])
    assert again == pytest.approx(stats, abs=1e-6)


def test_cli_class_count_mismatch_is_a_clear_error(tmp_path):
    coco_dir = write_coco_folder(tmp_path / "coco", ColorBoxDataset(num_images=2))
    weights = write_random_weights(tmp_path / "w80.npz", load_config("ns"))
    with pytest.raises(SystemExit, match="80 classes.*2 classes"):
        main(["--config", "ns", "--weights", str(weights), "--data", f"coco:{coco_dir}", "--split", "val",
              "--img-size", "64", "64", "--no-progress"])
    with pytest.raises(SystemExit, match="config is needed"):
        main(["--weights", str(weights), "--data", f"coco:{coco_dir}"])


def test_cli_outputs_never_overwrite_what_eval_reads(tmp_path):
    """--json-out / --stats-out naming the model file, a file of the dataset, or each other were
    written over them after the evaluation (the audit lost an ONNX model and a COCO annotation
    file); bad confusion-matrix thresholds gave an all-background matrix. All refused up front."""
    coco_dir = write_coco_folder(tmp_path / "coco", ColorBoxDataset(num_images=2))
    ann = coco_dir / "annotations" / "instances_val.json"
    weights = write_random_weights(tmp_path / "w.npz", load_config("ns"))
    before = {p: p.read_bytes() for p in (ann, weights)}
    base = ["--config", "ns", "--weights", str(weights), "--data", f"coco:{coco_dir}", "--split", "val",
            "--img-size", "64", "64", "--no-progress"]
    for extra, message in (
            (["--json-out", str(weights)], "--json-out .*is the --weights file"),
            (["--stats-out", str(ann)], "--stats-out .*an existing file of the dataset"),
            (["--json-out", str(tmp_path / "a.json"), "--stats-out", str(tmp_path / "a.json")],
             "--json-out and --stats-out both name"),
            (["--cm-conf", "3"], "--cm-conf 3.0: the confusion matrix's score threshold"),
            (["--cm-iou", "0"], "--cm-iou 0.0: the confusion matrix's IoU")):
        with pytest.raises(SystemExit, match=message):
            main(base + extra)
    assert all(p.read_bytes() == b for p, b in before.items())
    from damo_jax.cli import common
    old_report = tmp_path / "stats_from_last_time.json"     # an existing file elsewhere: replaced, fine
    old_report.write_text("{}")
    common.check_not_in_data(old_report, "--stats-out", f"coco:{coco_dir}")
    common.check_not_in_data(coco_dir / "new.json", "--stats-out", f"coco:{coco_dir}")   # a new file


def test_cli_output_that_fails_to_write_after_the_evaluation_is_one_error_line(tmp_path, capsys, monkeypatch):
    """--json-out / --stats-out are checked before the evaluation, but a disk can still fill up
    when they are written: that was a traceback after the whole run. Now the stats stay printed,
    the other output is still written, and one error line names the flag and the reason (exit 2)."""
    import builtins
    coco_dir = write_coco_folder(tmp_path / "coco", ColorBoxDataset(num_images=2))
    config_file = write_two_class_config(tmp_path / "two_class.py")
    weights = write_random_weights(tmp_path / "w.npz", load_config(str(config_file)))
    full, ok = tmp_path / "dets.json", tmp_path / "stats.json"
    real_open = builtins.open

    def disk_full(path, *args, **kwargs):
        if str(path) == str(full) and args[:1] == ("w",):
            raise OSError(28, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", disk_full)
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config_file), "--weights", str(weights), "--data", f"coco:{coco_dir}",
              "--split", "val", "--img-size", "64", "64", "--no-progress", "--json-out", str(full),
              "--stats-out", str(ok)])
    captured = capsys.readouterr()
    assert exc.value.code == 2
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --json-out {full}: cannot write (No space left on device) "
                      f"(the stats are printed above)"], captured.err
    assert '"AP50"' in captured.out and json.loads(ok.read_text())["images_scored"] == 2


def test_cli_model_classes_in_another_order_are_matched_by_name(tmp_path, monkeypatch, caplog, oracle):
    """The dataset lists the model's classes in another order (COCO categories green 9, red 5; the
    model's label 0 is red): the detections of label 0 were written as category 9 (green), matched
    by index behind a warning. Now the labels are mapped by name (one info line), the oracle scores
    AP50 1, and the reports name each row by its category id (red 5 first)."""
    from damo_jax.cli import common as cli_common
    from damo_jax.cli import eval as eval_cli
    from damo_jax.inference.loading import LoadedModel
    from damo_jax.inference.pipeline import JaxBackend
    dataset = ColorBoxDataset(num_images=3)
    coco_dir = write_coco_folder(tmp_path / "coco", dataset)
    ann_file = coco_dir / "annotations" / "instances_val.json"
    coco = json.loads(ann_file.read_text())
    coco["categories"] = [{"id": 9, "name": "green"}, {"id": 5, "name": "red"}]
    ann_file.write_text(json.dumps(coco))

    def fake_load(args, overrides, **kwargs):
        cfg = cli_common.load_cli_config("s", list(overrides) + [
            "model.head.num_classes=2", "model.class_names=('red', 'green')"])
        return LoadedModel(cfg=cfg, class_names=("red", "green"), backend=JaxBackend(*oracle),
                           kind="jax", source="oracle")
    monkeypatch.setattr(cli_common, "load_model_from_args", fake_load)
    out, dets_file = tmp_path / "report", tmp_path / "dets.json"
    with caplog.at_level(logging.INFO):
        stats = eval_cli.main(["--config", "s", "--data", f"coco:{coco_dir}", "--split", "val",
                               "--img-size", "64", "96", "--conf", "0.05", "--no-progress",
                               "--json-out", str(dets_file), "--out", str(out)])
    assert stats["AP50"] == pytest.approx(1.0)
    # red boxes (id 5) are drawn in the left half of each image, green (id 9) in the right half
    widths = {r["image_id"]: r["orig_size"][1] for r in dataset.records}
    dets = json.loads(dets_file.read_text())
    assert dets and all((d["bbox"][0] < widths[d["image_id"]] / 2) == (d["category_id"] == 5)
                        for d in dets)
    reds = sum(int(c == 0) for r in dataset.records for c in r["labels"])
    greens = sum(int(c == 1) for r in dataset.records for c in r["labels"])
    rows = json.loads((out / "per_class.json").read_text())["classes"]
    assert [(r["category_id"], r["name"], r["instances"]) for r in rows] == [
        (5, "red", reds), (9, "green", greens)]
    cm = json.loads((out / "confusion_matrix.json").read_text())
    assert cm["labels"] == ["red", "green", "background"]
    assert cm["matrix"] == [[reds, 0, 0], [0, greens, 0], [0, 0, 0]]
    assert "labels are mapped to the dataset's classes by name" in caplog.text
    assert "matched by index" not in caplog.text


def test_api_model_classes_in_another_order_are_matched_by_name(tmp_path, caplog, oracle):
    """The Python API (``evaluate`` / ``evaluate_backend``) wrote label k as the dataset's k-th
    category whatever the model's class names (AP 0.03 where the CLI and the official evaluation
    gave 0.17 on a COCO file listing its categories in another order): it now maps by name too."""
    from damo_jax.config import apply_overrides, load_config
    from damo_jax.data_pipelines import open_dataset
    from damo_jax.evaluation.evaluator import evaluate_backend
    from damo_jax.inference.pipeline import JaxBackend
    coco_dir = write_coco_folder(tmp_path / "coco", ColorBoxDataset(num_images=3))
    ann_file = coco_dir / "annotations" / "instances_val.json"
    coco = json.loads(ann_file.read_text())
    coco["categories"] = [{"id": 9, "name": "green"}, {"id": 5, "name": "red"}]
    ann_file.write_text(json.dumps(coco))
    cfg = apply_overrides(load_config("s"), [
        "model.head.num_classes=2", "model.class_names=('red', 'green')", "test.conf_thre=0.05",
        "test.image_size=(64, 96)"])
    dataset = open_dataset(f"coco:{coco_dir}", "val")
    with caplog.at_level(logging.INFO):
        stats = evaluate_backend(JaxBackend(*oracle), dataset, cfg, progress=False)
    assert stats["AP50"] == pytest.approx(1.0)
    assert "labels are mapped to the dataset's classes by name" in caplog.text
    same = apply_overrides(load_config("s"), [          # the dataset's own order: nothing mapped
        "model.head.num_classes=2", "model.class_names=('green', 'red')", "test.conf_thre=0.05",
        "test.image_size=(64, 96)"])
    caplog.clear()
    with caplog.at_level(logging.INFO):
        evaluate_backend(JaxBackend(*oracle), dataset, same, progress=False)
    assert "by name" not in caplog.text


def test_category_remap_by_name():
    from damo_jax.evaluation.evaluator import category_remap
    assert category_remap(("a", "b"), ("a", "b"), (5, 9)) == {}                 # same list
    assert category_remap(("a", "b", "c"), ("c", "a", "b"), (10, 20, 30)) == {  # model label k
        10: 20, 20: 30, 30: 10}       # written as ids[k] -> id of the data class named names[k]
    assert category_remap(("a", "b"), ("a", "x"), (5, 9)) is None              # other names
    assert category_remap(("a", "a", "b"), ("a", "b", "b"), (1, 2, 3)) is None  # not distinct
