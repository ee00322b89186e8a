"""``damo-jax eval --onnx`` scores the deployed file with the same pre/post-processing as the Flax
model: its COCO mAP equals the JAX mAP on the demo val split within 0.001 AP.

A demo-config Ns with synthetic weights (a converted-state_dict .npz, ``eval_fakes.write_random_weights``)
is exported at 128x128 with ``--weights`` and scored as ``damo-jax eval --weights`` would load it
(the CPU training-time graph, not the export trace): no training needed. On the real demo val
labels a random model scores ~0 AP, which would make "equal" trivial, so the second half scores
both backends against *pseudo ground truth*: the JAX model's own confident detections on the same
images (the globally best ones, cut at a clear score gap, so each class's ranked list starts with its
ground truth). There
the JAX AP is ~1 by construction and any pre/post-processing difference in the
ONNX path (resize, channel order, NCHW, thresholds, box mapping) would lower the ONNX AP.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

SIZE = 128
NUM_IMAGES = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from damo_jax.data_pipelines import DetectionDataset, open_dataset
    from damo_jax.export import to_onnx

    root = tmp_path_factory.mktemp("eval_onnx")
    val = open_dataset("demo", "val")
    config = root / "demo6.py"
    config.write_text(
        "from damo_jax.config import load_config\n"
        "def get_config():\n"
        "    c = load_config('demo_ns')\n"
        f"    c.model.head.num_classes = {len(val.class_names)}\n"
        f"    c.model.class_names = {tuple(val.class_names)!r}\n"
        f"    c.test.image_size = ({SIZE}, {SIZE})\n"
        "    c.test.conf_thre = 0.001\n"
        "    c.test.batch_size = 4\n"
        "    c.data.workers = 0\n"
        "    return c\n")
    from damo_jax.config import load_config
    from eval_fakes import write_random_weights
    weights = write_random_weights(root / "w.npz", load_config(str(config)))  # scores spread ~1e-5
    onnx_file = to_onnx.main(["--config", str(config), "--weights", str(weights), "--img-size",
                              str(SIZE), "--output", str(root / "demo.onnx")])
    subset = DetectionDataset(val.records[:NUM_IMAGES], val.class_names, val.category_ids,
                              name=f"demo val, first {NUM_IMAGES}")   # ground truth = these records
    return root, config, onnx_file, subset, weights


def jax_and_onnx(config, onnx_file, weights):
    from damo_jax.inference.loading import load_model
    jax_model = load_model(str(config), weights=weights)
    onnx_model = load_model(str(config), onnx=onnx_file)
    return jax_model, onnx_model


def test_onnx_map_equals_jax_map_on_demo_val(setup, monkeypatch, capsys):
    from damo_jax.cli.eval import main
    from damo_jax.evaluation.evaluator import evaluate_backend
    root, config, onnx_file, val, weights = setup
    jax_model, onnx_model = jax_and_onnx(config, onnx_file, weights)
    cfg = jax_model.cfg
    ap_jax = evaluate_backend(jax_model.backend, val, cfg, progress=False, use_fast=False)
    ap_onnx = evaluate_backend(onnx_model.backend, val, onnx_model.cfg, progress=False, use_fast=False)
    for key in ("AP", "AP50", "AR100"):
        assert abs(ap_onnx[key] - ap_jax[key]) <= 1e-3, (key, ap_onnx[key], ap_jax[key])
    # the command line on the same file and images (demo val, subset via the dataset cache)
    monkeypatch.setattr("damo_jax.data_pipelines.open_dataset", lambda spec, split: val)
    from damo_jax.evaluation import coco
    runs = []
    real_run = coco.run_cocoeval
    monkeypatch.setattr(coco, "run_cocoeval", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    stats = main(["--config", str(config), "--onnx", str(onnx_file), "--data", "demo", "--split", "val",
                  "--no-progress", "--pycocotools", "--stats-out", str(root / "stats.json"),
                  "--per-class"])
    assert json.loads((root / "stats.json").read_text()) == stats
    assert len(runs) == 1, f"--per-class ran COCOeval {len(runs)} times (the stats' run serves it)"
    # --per-class: one row per class with its GT count (the records' boxes), without --out
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| class")]
    assert [r[0].strip() for r in rows] == list(val.class_names)
    counts = np.bincount(np.concatenate([r.labels for r in val.records]), minlength=len(rows))
    assert [int(r[1]) for r in rows] == counts.tolist()
    assert abs(stats["AP"] - ap_jax["AP"]) <= 1e-3


def test_onnx_map_equals_jax_map_on_pseudo_ground_truth(setup):
    from damo_jax.data_pipelines import DetectionDataset
    from damo_jax.evaluation.evaluator import evaluate_backend, run_detections
    _, config, onnx_file, val, weights = setup
    jax_model, onnx_model = jax_and_onnx(config, onnx_file, weights)
    cfg = jax_model.cfg
    dets = run_detections(jax_model.backend, val, cfg, progress=False)
    ranked = sorted(dets, key=lambda d: -d["score"])
    # The globally best JAX detections, cut at the widest score gap between ranks N and 8N: synthetic
    # weights give close scores (~1e-5 apart), and a cut inside a near-tie would make the test
    # measure float noise (~1e-7) between XLA and onnxruntime instead of the pre/post-processing.
    scores = np.array([d["score"] for d in ranked[:8 * NUM_IMAGES + 1]])
    gaps = scores[NUM_IMAGES - 1:-1] - scores[NUM_IMAGES:]
    cut = NUM_IMAGES + int(np.argmax(gaps))
    assert gaps.max() > 5e-6, "no score gap to cut the pseudo ground truth at"
    top = ranked[:cut]
    ids = list(val.category_ids)
    pseudo = []
    for rec in val.records:
        mine = [d for d in top if d["image_id"] == rec.image_id]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)],
                         np.float32).reshape(-1, 4)
        labels = np.array([ids.index(d["category_id"]) for d in mine], np.int32)
        pseudo.append(dataclasses.replace(rec, boxes=boxes, labels=labels, ignore_boxes=None,
                                          ignore_labels=None))
    assert sum(len(r.labels) for r in pseudo) >= NUM_IMAGES   # a real test: there are detections
    pseudo_ds = DetectionDataset(pseudo, val.class_names, val.category_ids, name="pseudo labels")
    ap_jax = evaluate_backend(jax_model.backend, pseudo_ds, cfg, progress=False, use_fast=False)
    ap_onnx = evaluate_backend(onnx_model.backend, pseudo_ds, onnx_model.cfg, progress=False,
                               use_fast=False)
    assert ap_jax["AP50"] > 0.5                                  # the pseudo labels are found
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert abs(ap_onnx[key] - ap_jax[key]) <= 1e-3, (key, ap_onnx[key], ap_jax[key])
