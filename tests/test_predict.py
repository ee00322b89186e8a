"""Detector API, backends interface, drawing, and the ``damo_jax.inference.predict`` CLI."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import damo_jax
from damo_jax.errors import ConfigError
from damo_jax.inference.detector import Detector, JaxBackend, stretch_resize, to_rgb_array
from damo_jax.inference.draw import class_color, draw_detections

from eval_fakes import (CLASS_NAMES, ColorBoxDataset, ColorBoxOracle, box_iou_numpy, draw_boxes,
                        write_checkpoint, write_two_class_config,
                        write_two_class_run)

INPUT_HW = (64, 96)


@pytest.fixture(scope="module")
def oracle_detector():
    model = ColorBoxOracle()
    variables = model.init(jax.random.key(0), jnp.zeros((1,) + INPUT_HW + (3,)))
    return Detector(JaxBackend(model, variables), class_names=CLASS_NAMES, image_size=INPUT_HW,
                    conf=0.3, iou=0.7, max_dets=10, batch_size=2)


def test_detector_boxes_in_original_pixels(oracle_detector):
    # a tall image (h=300, w=150): x factor 150/96, y factor 300/64 -- independent axes
    boxes = np.array([[10, 40, 60, 250], [80, 100, 140, 290]], np.float32)
    image = draw_boxes(300, 150, boxes, [0, 1])
    result = oracle_detector(image)
    assert result["class_names"] == ["red", "green"]  # equal scores: lower (anchor, class) first
    assert result["boxes"].dtype == np.float32 and result["labels"].dtype == np.int32
    for box, label in zip(result["boxes"], result["labels"]):
        assert box_iou_numpy(box, boxes[label]) > 0.9, (box, boxes[label])
    np.testing.assert_allclose(result["scores"], [0.9, 0.9], rtol=1e-6)


def test_detector_inputs_path_pil_batch_and_gray(oracle_detector, tmp_path):
    boxes = np.array([[20, 20, 120, 90]], np.float32)
    image = draw_boxes(128, 200, boxes, [1])
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    from_array = oracle_detector(image)
    from_path = oracle_detector(str(path))
    from_pil = oracle_detector(Image.fromarray(image))
    np.testing.assert_array_equal(from_array["boxes"], from_path["boxes"])
    np.testing.assert_array_equal(from_array["boxes"], from_pil["boxes"])
    batch = oracle_detector([image, path, image[:, ::-1]])  # 3 images, batch_size 2: two chunks
    assert len(batch) == 3
    np.testing.assert_array_equal(batch[1]["boxes"], from_array["boxes"])
    mirrored = batch[2]["boxes"][0]
    assert box_iou_numpy(mirrored, [200 - 120, 20, 200 - 20, 90]) > 0.9
    gray = oracle_detector(np.zeros((50, 60), np.uint8))
    assert len(gray["scores"]) == 0 and gray["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match="shape"):
        to_rgb_array(np.zeros((4, 5, 6)))
    with pytest.raises(FileNotFoundError):
        oracle_detector(str(tmp_path / "missing.jpg"))


def test_detector_bgr_arrays(oracle_detector, tmp_path):
    """bgr=True: OpenCV's channel order (BGR, BGRA, batches, lists) detected like the RGB image."""
    boxes = np.array([[10, 10, 60, 50], [70, 20, 110, 70]], np.float32)
    rgb = draw_boxes(90, 120, boxes, [0, 1])                 # red box (class 0), green box (class 1)
    want = oracle_detector(rgb)
    assert want["class_names"] == ["red", "green"]
    bgr = np.ascontiguousarray(rgb[..., ::-1])               # what cv2.imread gives
    assert oracle_detector(bgr)["class_names"] == ["green"]  # red read as blue: no class
    np.testing.assert_array_equal(oracle_detector(bgr, bgr=True)["boxes"], want["boxes"])
    bgra = np.concatenate([bgr, np.full(bgr.shape[:2] + (1,), 255, np.uint8)], -1)
    np.testing.assert_array_equal(oracle_detector(bgra, bgr=True)["boxes"], want["boxes"])
    for out in oracle_detector(np.stack([bgr, bgr]), bgr=True) + oracle_detector([bgr], bgr=True):
        np.testing.assert_array_equal(out["boxes"], want["boxes"])
    gray = rgb[..., 0]
    np.testing.assert_array_equal(oracle_detector(gray, bgr=True)["boxes"], oracle_detector(gray)["boxes"])
    tiled = oracle_detector.tiled(rgb, tile=64)
    np.testing.assert_array_equal(oracle_detector.tiled(bgr, tile=64, bgr=True)["boxes"], tiled["boxes"])
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(ConfigError, match="bgr=True applies to image arrays"):
        oracle_detector(str(path), bgr=True)
    with pytest.raises(ConfigError, match="bgr=True applies to image arrays"):
        oracle_detector(Image.fromarray(rgb), bgr=True)


def test_custom_backend_with_fixed_batch_and_input_size():
    calls = []

    class FixedBackend:
        input_hw = (32, 32)
        batch_size = 4

        def __call__(self, images):
            calls.append(images.shape)
            b = images.shape[0]
            boxes = np.tile(np.array([[8, 8, 24, 16]], np.float32), (b, 3, 1))
            scores = np.zeros((b, 3, 2), np.float32)
            scores[:, 0, 1] = 0.8
            scores[:, 1, 1] = 0.7  # same box, same class: suppressed
            scores[:, 2, 0] = 0.6  # same box, other class: kept
            return scores, boxes

    det = Detector(FixedBackend(), class_names=("a", "b"), image_size=(32, 32), conf=0.5)
    out = det([np.zeros((64, 32, 3), np.uint8)] * 5)
    assert calls == [(4, 32, 32, 3), (4, 32, 32, 3)]  # padded to the exported static batch
    for r in out:
        assert r["class_names"] == ["b", "a"]
        np.testing.assert_allclose(r["boxes"][0], [8, 16, 24, 32])  # y factor 2, x factor 1
    with pytest.raises(ValueError, match="takes"):
        Detector(FixedBackend(), class_names=("a", "b"), image_size=(64, 64))
    with pytest.raises(ValueError, match="weights="):
        Detector.load("model.pth")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        Detector.load("s")


def test_stretch_resize_is_cv2_bilinear():
    import cv2
    image = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    expected = cv2.resize(image, (96, 64), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(stretch_resize(image, (64, 96)), expected)


def test_lazy_package_export():
    assert damo_jax.Detector is Detector
    with pytest.raises(AttributeError):
        damo_jax.NoSuchThing  # noqa: B018


def test_draw_detections_marks_box_pixels():
    image = np.zeros((100, 120, 3), np.uint8)
    drawn = np.asarray(draw_detections(image, [[10, 30, 60, 90]], [0.9], [1], CLASS_NAMES, line_width=2))
    assert drawn.shape == image.shape
    color = np.array(class_color(1))
    np.testing.assert_array_equal(drawn[60, 10], color)   # left edge
    np.testing.assert_array_equal(drawn[89, 40], color)   # bottom edge
    assert np.all(drawn[60, 35] == 0)                     # interior untouched
    assert np.any(drawn[15:30, 10:60] != 0)               # tag drawn above the box
    below = np.asarray(draw_detections(image, [[10, 30, 60, 90]], [0.2], [1], CLASS_NAMES, score_thr=0.5))
    assert not below.any()
    assert class_color(0) != class_color(1)


# ------------------------------------------------------------------------- CLI with a real model

@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory):
    """ns with 2 classes, golden-recipe random weights, test size 64x64, saved as a training run."""
    return write_two_class_run(tmp_path_factory.mktemp("run"))


def make_image_folder(root: Path, dataset) -> Path:
    (root / "sub").mkdir(parents=True)
    Image.fromarray(dataset[0]["image"]).save(root / "a.png")
    Image.fromarray(dataset[1]["image"]).save(root / "b.jpg", quality=95)
    Image.fromarray(dataset[2]["image"]).save(root / "sub" / "c.png")
    (root / "bad.jpg").write_bytes(b"not an image at all")
    (root / "notes.txt").write_text("ignored")
    (root / "sub" / "gone.png").symlink_to(root / "deleted.png")     # a broken link: skipped, listed
    return root


def test_predict_cli_folder_checkpoint_matches_eval_and_detector(two_class_run, tmp_path, capsys):
    from damo_jax.evaluation.evaluator import collect_detections
    from damo_jax.inference.predict import main
    run_dir, _, _ = two_class_run
    dataset = ColorBoxDataset(num_images=3)
    folder = make_image_folder(tmp_path / "images", dataset)
    out = tmp_path / "out"
    summary = main(["--checkpoint", str(run_dir), "--source", str(folder), "--out", str(out),
                    "--conf", "0.001", "--batch-size", "2", "--no-progress"])
    assert "3 image(s)" in capsys.readouterr().out
    saved = json.loads((out / "detections.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert [Path(e["file"]).name for e in saved["images"]] == ["a.png", "b.jpg", "c.png"]
    assert [Path(s).name for s in saved["skipped"]] == ["bad.jpg", "gone.png"]
    assert saved["image_size"] == [64, 64] and saved["conf"] == 0.001
    for entry, record in zip(saved["images"], dataset.records):
        assert (entry["height"], entry["width"]) == record["orig_size"]
        assert len(entry["boxes"]) == len(entry["scores"]) == len(entry["labels"]) > 0
        assert set(entry["class_names"]) <= set(CLASS_NAMES)
        assert entry["scores"] == sorted(entry["scores"], reverse=True)
    for name, record in zip(("a.png", "b.jpg", "sub/c.png"), dataset.records):
        assert np.asarray(Image.open(out / name)).shape == record["image"].shape
    assert not np.array_equal(np.asarray(Image.open(out / "a.png")), dataset[0]["image"])

    # the same model through evaluation (eval_batches pre-processing) gives the same detections
    from damo_jax.inference.loading import load_model
    loaded = load_model(checkpoint=run_dir)
    cfg, model, variables = loaded.cfg, loaded.model, loaded.variables
    cfg.test.conf_thre, cfg.test.batch_size = 0.001, 2
    coco = collect_detections(model, variables, dataset, cfg, progress=False)
    first = [d for d in coco if d["image_id"] == 1000]
    a_png = saved["images"][0]
    assert len(first) == len(a_png["scores"])
    np.testing.assert_allclose(sorted(d["score"] for d in first)[::-1], a_png["scores"], atol=2e-5)
    predicted = np.asarray(a_png["boxes"])
    h_img, w_img = a_png["height"], a_png["width"]       # detections.json: clipped to the image
    assert (predicted >= 0).all() and (predicted[:, 0::2] <= w_img).all() and (predicted[:, 1::2] <= h_img).all()
    for x, y, w, h in (d["bbox"] for d in first):       # eval: the official unclipped decode
        expected = [min(max(x, 0), w_img), min(max(y, 0), h_img),
                    min(max(x + w, 0), w_img), min(max(y + h, 0), h_img)]
        assert np.abs(predicted - expected).max(axis=1).min() < 0.02

    # the package-level API on the same checkpoint
    detector = damo_jax.Detector.load(run_dir, conf=0.001, batch_size=2)
    result = detector([dataset[0]["image"]], pad_to_batch=True)[0]  # batch 2: compiled shape reused
    np.testing.assert_allclose(result["scores"], a_png["scores"], atol=2e-5)


def test_predict_cli_official_weights_single_image_and_errors(two_class_run, tmp_path):
    from damo_jax.inference.predict import main
    _, weights, config_file = two_class_run
    image = ColorBoxDataset(num_images=1)[0]["image"]
    Image.fromarray(image).save(tmp_path / "one.png")
    summary = main(["--config", str(config_file), "--weights", str(weights), "--source",
                    str(tmp_path / "one.png"), "--out", str(tmp_path / "o"), "--img-size", "64", "64",
                    "--conf", "0.001", "--no-draw", "--no-progress"])
    assert len(summary["images"]) == 1 and not (tmp_path / "o" / "one.png").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        main(["--config", str(config_file), "--weights", str(weights), "--source", str(tmp_path / "empty")])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(SystemExit, match="broken.png"):
        main(["--config", str(config_file), "--weights", str(weights), "--source", str(tmp_path / "broken.png")])
    with pytest.raises(SystemExit, match="--config is needed"):
        main(["--weights", str(weights), "--source", str(tmp_path / "one.png")])
    with pytest.raises(SystemExit, match="not found"):
        main(["--config", "ns", "--onnx", str(tmp_path / "missing.onnx"), "--source", str(tmp_path / "one.png")])


def write_handmade_onnx(path: Path, class_names=None, metadata=None) -> Path:
    """A raw-output ONNX file (input NCHW (1,3,32,64); outputs scores (1,3,2), boxes (1,3,4)) whose
    outputs are constants plus 0 * mean(images): the exported-model layout, no export needed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    scores = np.array([[[0.9, 0.1], [0.8, 0.0], [0.0, 0.7]]], np.float32)
    boxes = np.array([[[4, 2, 20, 18], [5, 2, 20, 18], [30, 10, 60, 30]]], np.float32)
    nodes = [helper.make_node("ReduceMean", ["images"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
             helper.make_node("Add", ["scores_c", "nothing"], ["scores"]),
             helper.make_node("Add", ["boxes_c", "nothing"], ["boxes"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(scores, "scores_c"), numpy_helper.from_array(boxes, "boxes_c")]
    graph = helper.make_graph(
        nodes, "handmade", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 64])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3, 2]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 3, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if class_names:
        model.metadata_props.add(key="class_names", value=json.dumps(list(class_names)))
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_exported_backends_plug_into_detector(tmp_path, backend):
    config = write_two_class_config(tmp_path / "two_class.py")
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx", class_names=("cat", "dog"))
    det = Detector.load(str(config), backend=backend, model_path=onnx_file, conf=0.3, iou=0.7)
    assert det.image_size == (32, 64) and det.class_names == ("cat", "dog")
    out = det([np.zeros((64, 64, 3), np.uint8)] * 3)  # 3 images through a batch-1 file
    for r in out:
        assert r["class_names"] == ["cat", "dog"]   # anchor 1 (IoU 0.94 with anchor 0) suppressed
        np.testing.assert_allclose(r["scores"], [0.9, 0.7], rtol=1e-6)
        np.testing.assert_allclose(r["boxes"], [[4, 4, 20, 36], [30, 20, 60, 60]])  # y factor 2
    with pytest.raises(ValueError, match="takes"):
        Detector.load(str(config), backend=backend, model_path=onnx_file, img_size=(64, 64))
    wrong = write_handmade_onnx(tmp_path / "w.onnx", class_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="3 classes"):
        Detector.load(str(config), backend=backend, model_path=wrong)


def test_predict_cli_onnx(tmp_path):
    from damo_jax.inference.predict import main
    config = write_two_class_config(tmp_path / "two_class.py")
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx")
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "x.png")
    summary = main(["--config", str(config), "--onnx", str(onnx_file), "--source", str(tmp_path / "x.png"),
                    "--out", str(tmp_path / "out"), "--conf", "0.5", "--no-progress"])
    entry = summary["images"][0]
    assert entry["class_names"] == ["red", "green"]  # config names (the file has no metadata)
    assert entry["boxes"] == [[4.0, 2.0, 20.0, 18.0], [30.0, 10.0, 60.0, 30.0]]
    assert (tmp_path / "out" / "x.png").is_file()
    top = main(["--config", str(config), "--onnx", str(onnx_file), "--source", str(tmp_path / "x.png"),
                "--out", str(tmp_path / "out1"), "--conf", "0.5", "--max-dets", "1", "--no-progress"])
    assert top["images"][0]["boxes"] == [[4.0, 2.0, 20.0, 18.0]]    # the highest score only


def test_predict_cli_classes_filter_before_nms_and_yolo_txt(tmp_path):
    """--classes keeps only those classes before NMS (so a dropped class takes no --max-dets
    place); --save-txt / --save-conf write YOLO lines normalised by the image size (the
    Ultralytics route for pseudo-labels); unknown classes and --save-conf alone are refused."""
    from damo_jax.inference.predict import main
    config = write_two_class_config(tmp_path / "two_class.py")
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx")
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "x.png")
    base = ["--config", str(config), "--onnx", str(onnx_file), "--source", str(tmp_path / "x.png"),
            "--conf", "0.5", "--no-progress", "--no-draw"]
    out = main(base + ["--out", str(tmp_path / "a"), "--classes", "green", "--max-dets", "1",
                       "--save-txt", "--save-conf"])
    assert out["images"][0]["boxes"] == [[30.0, 10.0, 60.0, 30.0]]      # not the red top score
    assert out["images"][0]["class_names"] == ["green"]
    line = (tmp_path / "a" / "labels" / "x.txt").read_text().split()
    assert line[0] == "1"
    np.testing.assert_allclose([float(v) for v in line[1:]], [45 / 64, 20 / 32, 30 / 64, 20 / 32, 0.7],
                               atol=1e-5)
    both = main(base + ["--out", str(tmp_path / "b"), "--classes", "0", "green", "--save-txt"])
    rows = [r.split() for r in (tmp_path / "b" / "labels" / "x.txt").read_text().splitlines()]
    assert [r[0] for r in rows] == ["0", "1"] and all(len(r) == 5 for r in rows)
    assert both["images"][0]["class_names"] == ["red", "green"]
    main(base + ["--out", str(tmp_path / "c"), "--classes", "red", "--conf", "0.95", "--save-txt"])
    assert (tmp_path / "c" / "labels" / "x.txt").read_text() == ""       # none: an empty file
    with pytest.raises(SystemExit, match=r"--classes blue: not a class of this model \(its classes: "
                                         r"0 red, 1 green\)"):
        main(base + ["--out", str(tmp_path / "d"), "--classes", "blue"])
    with pytest.raises(SystemExit, match="--save-conf appends scores to the --save-txt files"):
        main(base + ["--out", str(tmp_path / "e"), "--save-conf"])


def test_detector_classes_keyword_in_the_jit(oracle_detector):
    """The JAX backend filters inside the jitted forward + NMS (a static ``classes`` tuple)."""
    image = np.zeros(INPUT_HW + (3,), np.uint8)
    image[5:30, 5:40] = (255, 0, 0)
    image[35:60, 50:90] = (0, 255, 0)
    assert oracle_detector(image)["class_names"] == ["red", "green"]
    only = Detector(oracle_detector.backend, class_names=CLASS_NAMES, image_size=INPUT_HW,
                    conf=0.3, classes=["green"])
    r = only(image)
    assert r["class_names"] == ["green"]
    np.testing.assert_allclose(r["boxes"], [[50, 35, 90, 60]], atol=0.5)


def test_detector_classes_keyword(tmp_path):
    config = write_two_class_config(tmp_path / "two_class.py")
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx")
    det = Detector.load(str(config), backend="onnx", model_path=onnx_file, conf=0.05, classes=["red"])
    r = det(np.zeros((32, 64, 3), np.uint8))
    assert r["class_names"] == ["red"] and len(r["scores"]) == 1     # class 1's 0.1 / 0.7 gone
    with pytest.raises(ValueError, match=r"classes=7: not a class"):
        Detector.load(str(config), backend="onnx", model_path=onnx_file, classes=[7])


def test_predict_folder_with_no_readable_image_is_an_error_with_reasons(tmp_path):
    """Every image unreadable: exit 2 (it printed "0 image(s) ... 2 skipped" and exited 0, so a batch
    job took it for a run that worked); detections.json still says which files and why. Images in a
    linked folder are read; a link loop ends."""
    from damo_jax.inference.predict import main
    config = write_two_class_config(tmp_path / "two_class.py")
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx")
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.png").write_text("not an image")
    args = ["--config", str(config), "--onnx", str(onnx_file), "--source", str(src), "--conf", "0.5",
            "--no-progress", "--no-draw"]
    with pytest.raises(SystemExit, match=r"none of its 2 image\(s\) could be read"):
        main(args + ["--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert saved["images"] == [] and sorted(Path(p).name for p in saved["skipped"]) == ["empty.jpg", "text.png"]
    assert set(saved["skipped_reasons"]) == set(saved["skipped"])
    assert all(saved["skipped_reasons"].values())
    elsewhere = tmp_path / "elsewhere"                    # a linked folder of images, and a loop
    elsewhere.mkdir()
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(elsewhere / "x.png")
    (src / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(src, target_is_directory=True)
    summary = main(args + ["--out", str(tmp_path / "out2")])
    assert [Path(e["file"]).name for e in summary["images"]] == ["x.png"]
    assert len(summary["skipped"]) == 2                   # each real folder once despite the loop


def test_detector_pads_lists_to_powers_of_two():
    """A list of 2..8 images compiled a new shape per length (a service grouping requests stalled
    ~1.7 s per new length); now 1, 2, 4, ... batch_size."""
    calls = []

    class AnyBatch:
        def __call__(self, images):
            calls.append(images.shape[0])
            b = images.shape[0]
            return np.zeros((b, 3, 2), np.float32), np.zeros((b, 3, 4), np.float32)

    det = Detector(AnyBatch(), class_names=("a", "b"), image_size=(32, 32), conf=0.5, batch_size=8)
    image = np.zeros((40, 30, 3), np.uint8)
    for n in range(1, 9):
        assert len(det([image] * n)) == n
    assert calls == [1, 2, 4, 4, 8, 8, 8, 8]
    calls.clear()
    assert len(det([image] * 11)) == 11                  # two chunks: both at batch_size
    assert calls == [8, 8]
    calls.clear()
    det([image] * 3, pad_to_batch=False), det([image] * 3, pad_to_batch=True)
    assert calls == [3, 8]


def test_predict_with_nothing_above_conf_says_the_highest_score(tmp_path, capsys):
    """0 detections after a decent eval confused the audit (scores ~0.1 under predict's default
    --conf 0.3): the summary line now gives the highest score and the way out."""
    from damo_jax.inference.predict import main
    config = write_two_class_config(tmp_path / "two_class.py")
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx")       # top score 0.9
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "x.png")
    summary = main(["--config", str(config), "--onnx", str(onnx_file), "--source", str(tmp_path / "x.png"),
                    "--out", str(tmp_path / "out"), "--conf", "0.95", "--no-draw", "--no-progress"])
    assert summary["images"][0]["boxes"] == []
    out = capsys.readouterr().out
    assert "0 detection(s)" in out and "highest score in the first 1 image(s) is 0.9 < --conf 0.95" in out
    main(["--config", str(config), "--onnx", str(onnx_file), "--source", str(tmp_path / "x.png"),
          "--out", str(tmp_path / "out2"), "--conf", "0.5", "--no-draw", "--no-progress"])
    assert "highest score" not in capsys.readouterr().out      # detections found: no hint


def test_predict_exported_file_without_config_uses_its_metadata(tmp_path):
    """An exported file carries model, class names, size and thresholds: predict needs no
    --config; a file without that metadata asks for one."""
    from damo_jax.inference.predict import main
    meta = {"model": "ns", "image_size": "[32, 64]", "conf_thre": "0.75", "iou_thre": "0.5"}
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx", class_names=("cat", "dog"), metadata=meta)
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "x.png")
    summary = main(["--onnx", str(onnx_file), "--source", str(tmp_path / "x.png"),
                    "--out", str(tmp_path / "out"), "--no-draw", "--no-progress"])
    entry = summary["images"][0]
    assert entry["class_names"] == ["cat", "dog"]      # the file's names, not COCO's
    assert entry["boxes"] == [[4.0, 2.0, 20.0, 18.0], [30.0, 10.0, 60.0, 30.0]]   # predict's conf 0.3
    assert summary["iou"] == 0.5                       # the file's (config ns: 0.65)
    variant = write_handmade_onnx(tmp_path / "v.onnx", class_names=("cat", "dog"),   # a model of the
                                  metadata=dict(meta, model="t_wide"))            # user's own config
    summary = main(["--onnx", str(variant), "--source", str(tmp_path / "x.png"),
                    "--out", str(tmp_path / "out_v"), "--no-draw", "--no-progress"])
    assert summary["images"][0]["class_names"] == ["cat", "dog"] and summary["iou"] == 0.5
    bare = write_handmade_onnx(tmp_path / "bare.onnx", class_names=("cat", "dog"))
    with pytest.raises(SystemExit, match="no damo_jax export metadata.*give --config"):
        main(["--onnx", str(bare), "--source", str(tmp_path / "x.png"), "--out", str(tmp_path / "o2")])


def test_load_model_class_names_override(tmp_path):
    """--config.model.class_names=... beats the config's names; a count that does not fit the
    head is a clear ConfigError naming num_classes."""
    from damo_jax.errors import ConfigError
    from damo_jax.inference.loading import load_model
    names = "('cat', 'dog')"
    loaded = load_model("ns", random_init=True, fuse=False,
                        overrides=["--config.model.head.num_classes=2", f"--config.model.class_names={names}"])
    assert loaded.class_names == ("cat", "dog")
    with pytest.raises(ConfigError, match="num_classes"):
        load_model("ns", random_init=True, fuse=False, overrides=[f"--config.model.class_names={names}"])


def test_predict_checkpoint_beside_an_exported_file_gives_its_names(two_class_run, tmp_path):
    """``--checkpoint RUN --onnx F``: the run gives the config and class names of a file without
    metadata, as in ``eval`` (predict refused the pair: its flags were one exclusive group)."""
    from damo_jax.inference.predict import main
    run_dir = two_class_run[0]
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx")         # no metadata: names must come from the run
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "x.png")
    summary = main(["--checkpoint", str(run_dir), "--onnx", str(onnx_file), "--source", str(tmp_path / "x.png"),
                    "--out", str(tmp_path / "out"), "--conf", "0.5", "--no-draw", "--no-progress"])
    entry = summary["images"][0]
    assert entry["class_names"] == [CLASS_NAMES[0], CLASS_NAMES[1]]
    assert entry["boxes"] == [[4.0, 2.0, 20.0, 18.0], [30.0, 10.0, 60.0, 30.0]]
    for extra, message in ((["--config", "ns"], "drop --config"),
                           (["--weights", str(two_class_run[1])], "--weights: not allowed with argument --onnx")):
        with pytest.raises(SystemExit, match=message):
            main(["--checkpoint", str(run_dir), "--onnx", str(onnx_file), *extra,
                  "--source", str(tmp_path / "x.png"), "--out", str(tmp_path / "o2")])


def test_predict_cli_save_txt_stem_collisions(tmp_path):
    """photo.jpg and photo.png in one folder would both write labels/photo.txt (the first one's
    boxes lost): colliding stems keep their suffix (labels/photo.jpg.txt, labels/photo.png.txt),
    the others stay <stem>.txt; names that still collide are refused before the model loads."""
    from damo_jax.inference.predict import main
    config = write_two_class_config(tmp_path / "two_class.py")
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    image = np.zeros((32, 64, 3), np.uint8)
    for name in ("photo.jpg", "photo.png", "other.png", "sub/photo.png"):
        Image.fromarray(image).save(src / name)
    base = ["--config", str(config), "--onnx", str(onnx_file), "--conf", "0.5", "--no-progress",
            "--no-draw", "--save-txt"]
    out = main(base + ["--source", str(src), "--out", str(tmp_path / "a")])
    labels = tmp_path / "a" / "labels"
    written = sorted(str(p.relative_to(labels)) for p in labels.rglob("*.txt"))
    assert written == ["other.txt", "photo.jpg.txt", "photo.png.txt", "sub/photo.txt"]
    assert len(out["images"]) == 4
    for name in written:                      # every image's two boxes, none lost
        assert len((labels / name).read_text().splitlines()) == 2
    Image.fromarray(image).save(src / "photo.jpg.png")          # stem "photo.jpg" = photo.jpg.txt
    with pytest.raises(SystemExit, match="would write the same label file"):
        main(base + ["--source", str(src), "--out", str(tmp_path / "b")])


@pytest.mark.parametrize("train_spec, category_ids, expected", [
    ("yolo:/data/pets/data.yaml", [1, 2], ["1", "2"]),     # data.yaml names {1: red, 2: green}
    ("/data/pets/data.yaml", [4, 0], ["4", "0"]),          # a bare .yaml spec, ids in any order
    ("yolo:/data/pets/data.yaml", [0, 1], ["0", "1"]),     # 0..K-1 already
    ("coco:/data/coco", [1, 2], ["0", "1"]),               # COCO-trained: 0-based (Ultralytics)
])
def test_predict_cli_save_txt_writes_the_yolo_runs_class_ids(tmp_path, train_spec, category_ids,
                                                              expected):
    """A --checkpoint run trained on a YOLO data.yaml whose class ids are not 0..K-1 writes those
    ids in --save-txt (the lines read back with that data.yaml as the same classes: 0-based labels
    would read "green" as class 1 = "red"); other runs write the 0-based labels. detections.json
    keeps the 0-based labels either way."""
    from damo_jax.config import load_config
    from damo_jax.inference.predict import main
    config = write_two_class_config(tmp_path / "two_class.py")
    cfg = load_config(str(config))
    cfg.data.train = train_spec
    tiny = {"params": {"w": jnp.zeros((1,))}, "batch_stats": {"m": jnp.zeros((1,))}}
    run = write_checkpoint(tmp_path / "run", cfg, tiny, CLASS_NAMES, category_ids=category_ids)
    onnx_file = write_handmade_onnx(tmp_path / "m.onnx")      # boxes: red (0.9), green (0.7)
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(tmp_path / "x.png")
    out = main(["--checkpoint", str(run), "--onnx", str(onnx_file), "--source",
                str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--conf", "0.5",
                "--no-progress", "--no-draw", "--save-txt"])
    rows = [r.split() for r in (tmp_path / "o" / "labels" / "x.txt").read_text().splitlines()]
    assert [r[0] for r in rows] == expected
    assert out["images"][0]["labels"] == [0, 1]
    assert out["images"][0]["class_names"] == ["red", "green"]
