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


def pseudo_ground_truth(jax_model, val):
    """``val`` with the JAX model's globally best detections as its ground truth."""
    from damo_jax.data_pipelines import DetectionDataset
    from damo_jax.evaluation.evaluator import run_detections
    dets = run_detections(jax_model.backend, val, jax_model.cfg, progress=False)
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
    return DetectionDataset(pseudo, val.class_names, val.category_ids, name="pseudo labels")


def test_onnx_map_equals_jax_map_on_pseudo_ground_truth(setup):
    from damo_jax.evaluation.evaluator import evaluate_backend
    _, config, onnx_file, val, weights = setup
    jax_model, onnx_model = jax_and_onnx(config, onnx_file, weights)
    cfg = jax_model.cfg
    pseudo_ds = pseudo_ground_truth(jax_model, val)
    ap_jax = evaluate_backend(jax_model.backend, pseudo_ds, cfg, progress=False, use_fast=False)
    ap_onnx = evaluate_backend(onnx_model.backend, pseudo_ds, onnx_model.cfg, progress=False,
                               use_fast=False)
    assert ap_jax["AP50"] > 0.5                                  # the pseudo labels are found
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert abs(ap_onnx[key] - ap_jax[key]) <= 1e-3, (key, ap_onnx[key], ap_jax[key])


# ------------------------------------------------------------------ --end2end files (NMS inside)

E2E_TOPK, E2E_CONF, E2E_IOU = 100, 0.001, 0.7      # the config's conf_thre 0.001: every candidate


@pytest.fixture(scope="module")
def e2e_file(setup):
    """The setup's raw file with the official NMS appended, as ``damo-jax export onnx --end2end
    --topk 100 --conf 0.001 --iou 0.7`` writes it (``to_onnx.finalize``: the export metadata and
    its ``end2end`` entry)."""
    import onnx

    from damo_jax.export import end2end, onnx_utils
    root, _, onnx_file, _, _ = setup
    model = end2end.append_end2end(onnx.load(str(onnx_file)), topk=E2E_TOPK, conf_thre=E2E_CONF,
                                   iou_thre=E2E_IOU)
    model.metadata_props.add(key="end2end",
                             value=f"topk={E2E_TOPK},conf_thre={E2E_CONF},iou_thre={E2E_IOU}")
    return onnx_utils.save(onnx_utils.fix_value_info(model), root / "demo_e2e.onnx")


def raw_params_like_e2e(backend) -> dict:
    """Detector / config settings under which damo_jax's NMS is the file's: its thresholds, K,
    and no pre-NMS cap (A * C candidates; the in-graph NMS takes all)."""
    anchors = backend.session.get_outputs()[backend.output_names.index("scores")].shape[1]
    return dict(conf=E2E_CONF, iou=E2E_IOU, max_dets=E2E_TOPK,
                pre_nms_topk=anchors * backend.num_classes)


def assert_same_results(got, want, any_order=False):
    """Same labels, scores within 1e-4, boxes within 1e-2 px; ``any_order``: rows compared sorted
    by (label, box) — two runtimes' float noise (~1e-7) can swap near-tied scores (the synthetic
    weights' scores lie ~1e-5 apart)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if any_order:
            g, w = ({k: r[k][np.lexsort((*np.round(r["boxes"], 1).T[::-1], r["labels"]))]
                     for k in ("boxes", "scores", "labels")} for r in (g, w))
        np.testing.assert_array_equal(g["labels"], w["labels"])
        np.testing.assert_allclose(g["scores"], w["scores"], rtol=0, atol=1e-4)
        np.testing.assert_allclose(g["boxes"], w["boxes"], rtol=0, atol=1e-2)


def test_end2end_file_through_detector_equals_raw_file_and_our_nms(setup, e2e_file):
    """Detector.load(e2e.onnx) runs the in-graph NMS; its detections (boxes mapped back to the
    original pixels the same way) are the raw file's + damo_jax's NMS with the same thresholds,
    K and no pre-NMS cap; a higher conf / smaller max_dets filter the file's rows as they filter
    damo_jax's NMS."""
    from damo_jax.inference.backends import OnnxBackend
    from damo_jax.inference.detector import Detector
    _, config, onnx_file, val, _ = setup
    images = [val[i]["image"] for i in range(6)]
    assert images[0].shape[:2] != (SIZE, SIZE)           # boxes are mapped back to other sizes
    raw = OnnxBackend(onnx_file)
    settings = raw_params_like_e2e(raw)
    det = Detector.load(e2e_file)                       # config, thresholds from its metadata
    assert det.backend.end2end.topk == E2E_TOPK and det.params.iou == E2E_IOU
    assert (det.params.conf, det.params.max_dets) == (E2E_CONF, E2E_TOPK)
    ref_kwargs = dict(class_names=det.class_names, image_size=(SIZE, SIZE), batch_size=4)
    got = det(images)
    want = Detector(raw, **ref_kwargs, **settings)(images)
    assert sum(len(r["scores"]) for r in want) > 100                # K binds: 100 rows per image
    assert_same_results(got, want)
    middle = float(np.median(np.concatenate([r["scores"] for r in got])))   # a conf that filters
    for conf, max_dets in ((middle, 100), (E2E_CONF, 7)):
        got = Detector.load(e2e_file, conf=conf, max_dets=max_dets)(images)
        want = Detector(raw, **ref_kwargs, **dict(settings, conf=conf, max_dets=max_dets))(images)
        assert 0 < sum(len(r["scores"]) for r in got) < 100 * len(images)
        assert_same_results(got, want)


def test_end2end_openvino_ir_through_detector(setup, e2e_file, tmp_path):
    """The IR of the end2end file (damo-jax export openvino --onnx e2e.onnx) through Detector:
    the same detections as the ONNX file (OpenVINO's NMS suppresses on IoU >= iou, onnxruntime's
    on > iou: equal here, no IoU equals 0.7 exactly), up to the order of near-tied scores."""
    from damo_jax.export import to_openvino
    from damo_jax.inference.detector import Detector
    _, _, _, val, _ = setup
    images = [val[i]["image"] for i in range(3)]
    xml = to_openvino.convert(e2e_file, tmp_path / "e2e.xml")
    det = Detector.load(xml)
    assert det.backend.end2end == Detector.load(e2e_file).backend.end2end
    assert_same_results(det(images), Detector.load(e2e_file)(images), any_order=True)


def test_predict_cli_on_an_end2end_file(setup, e2e_file, tmp_path):
    """damo-jax predict --onnx e2e.onnx == the raw file with the file's thresholds and K."""
    from PIL import Image

    from damo_jax.cli.predict import main
    from damo_jax.inference.backends import OnnxBackend
    _, config, onnx_file, val, _ = setup
    source = tmp_path / "images"
    source.mkdir()
    for i in range(3):
        Image.fromarray(val[i]["image"]).save(source / f"{i}.png")
    cap = raw_params_like_e2e(OnnxBackend(onnx_file))["pre_nms_topk"]
    from damo_jax.inference.detector import Detector
    scores = np.concatenate([r["scores"] for r in Detector.load(e2e_file)(
        [val[i]["image"] for i in range(3)])])
    conf = float(np.quantile(scores, 0.9))      # above the file's 0.001: filters its rows
    common = ["--source", str(source), "--no-progress", "--no-draw", "--conf", repr(conf)]
    got = main(["--onnx", str(e2e_file), "--out", str(tmp_path / "e2e"), *common])
    want = main(["--config", str(config), "--onnx", str(onnx_file), "--out", str(tmp_path / "raw"),
                 "--iou", str(E2E_IOU), "--max-dets", str(E2E_TOPK),
                 f"--config.test.pre_nms_topk={cap}", *common])
    assert got["iou"] == E2E_IOU and 0 < sum(len(e["scores"]) for e in got["images"]) < 100
    for g, w in zip(got["images"], want["images"]):
        assert g["file"] == w["file"] and g["labels"] == w["labels"]
        np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-4)
        np.testing.assert_allclose(g["boxes"], w["boxes"], atol=1e-2)


def test_eval_of_an_end2end_file_equals_the_raw_file(setup, e2e_file, monkeypatch, caplog):
    """damo-jax eval --onnx e2e.onnx scores the in-graph NMS: the same COCO stats as the raw file
    with the file's thresholds, K as --max-dets and no pre-NMS cap (tolerance 1e-3 AP, as for the
    raw file vs JAX: the two NMS implementations compute IoU in float32 each their own way, so an
    IoU within ~1e-7 of 0.7 could go either way; measured: equal). On pseudo ground truth (the
    JAX model's best detections), so the AP is ~1 and not trivially equal; the run logs that the
    mAP is that of the file's NMS with its K."""
    import logging

    from damo_jax.cli.eval import main
    from damo_jax.inference.backends import OnnxBackend
    from damo_jax.inference.loading import load_model
    root, config, onnx_file, val, weights = setup
    pseudo = pseudo_ground_truth(load_model(str(config), weights=weights), val)
    monkeypatch.setattr("damo_jax.data_pipelines.open_dataset", lambda spec, split: pseudo)
    cap = raw_params_like_e2e(OnnxBackend(onnx_file))["pre_nms_topk"]
    base = ["--config", str(config), "--data", "demo", "--split", "val", "--no-progress",
            "--pycocotools"]
    with caplog.at_level(logging.INFO, logger="damo_jax.cli.eval"):
        got = main(base + ["--onnx", str(e2e_file)])
    want = main(base + ["--onnx", str(onnx_file), "--max-dets", str(E2E_TOPK),
                        "--pre-nms-topk", str(cap)])
    assert want["AP50"] > 0.5
    for key in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert abs(got[key] - want[key]) <= 1e-3, (key, got[key], want[key])
    lines = [r.getMessage() for r in caplog.records if "--end2end export" in r.getMessage()]
    assert len(lines) == 1 and "the mAP is that of its in-graph NMS (topk 100, conf_thre 0.001, " \
        "iou_thre 0.7), which keeps at most 100 detections per image" in lines[0], lines


@pytest.mark.parametrize("command,flags,message", [
    ("predict", ["--iou", "0.5"], "--iou 0.5: {f} is an --end2end export (NMS inside the graph: "
                                  "topk 100, conf_thre 0.001, iou_thre 0.7); its IoU threshold is 0.7"),
    ("predict", ["--max-dets", "101"], "--max-dets 101: {f} is an --end2end export"),
    ("predict", ["--conf", "0.0005"], "it keeps scores above 0.001 only, a lower --conf"),
    ("eval", ["--iou", "0.65"], "its IoU threshold is 0.7 and --iou cannot change it"),
    ("eval", ["--max-dets", "500"], "it returns at most 100 detections per image (its topk)"),
    ("eval", ["--pre-nms-topk", "50"], "--pre-nms-topk 50: {f} is an --end2end export"),
    ("eval", ["--config.test.iou_thre=0.5"], "--config.test.iou_thre 0.5: {f} is an --end2end"),
])
def test_flags_that_cannot_act_on_an_end2end_file_are_one_error(setup, e2e_file, tmp_path, capsys,
                                                                command, flags, message):
    from damo_jax.cli import eval as eval_cli, predict as predict_cli
    _, config, _, val, _ = setup
    from PIL import Image
    Image.fromarray(val[0]["image"]).save(tmp_path / "x.png")
    args = (["--source", str(tmp_path / "x.png"), "--out", str(tmp_path / "out"), "--no-progress"]
            if command == "predict" else ["--data", "demo", "--split", "val", "--no-progress"])
    main = predict_cli.main if command == "predict" else eval_cli.main
    with pytest.raises(SystemExit) as info:
        main(["--config", str(config), "--onnx", str(e2e_file), *args, *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message.format(f=e2e_file) in lines[0], err
    assert "Traceback" not in err
