"""The Python API's answers to a notebook user's mistakes (a user audit, session 28): a clear
exception naming the argument or key, raised before anything runs or is written — never a deep
JAX / numpy traceback, never a silent wrong result — and the documented conveniences that failed
(a run directory given to ``load_model`` positionally, a JAX batch array to ``Detector``)."""
from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from damo_jax.config import apply_overrides, load_config, validate_config
from damo_jax.errors import ConfigError, InputPathError
from damo_jax.inference.detector import Detector, JaxBackend
from eval_fakes import (CLASS_NAMES, ColorBoxDataset, ColorBoxOracle, write_random_weights,
                        write_two_class_run)
from test_eval_cli import oracle_config

INPUT_HW = (64, 96)


@pytest.fixture(scope="module")
def oracle():
    model = ColorBoxOracle()
    return model, model.init(jax.random.key(0), jnp.zeros((1,) + INPUT_HW + (3,)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """ns with 2 classes and random official-recipe weights, saved as a training run."""
    return write_two_class_run(tmp_path_factory.mktemp("api_run"))[0]


def test_validate_config_wants_integer_counts_not_bools():
    for key, value in (("train.batch_size", True), ("test.batch_size", True), ("train.epochs", True),
                       ("test.max_dets", False)):    # a typed ConfigDict lets bools into int fields
        cfg = load_config("demo")
        section, name = key.split(".")
        cfg[section][name] = value
        with pytest.raises(ConfigError, match=f"{key} = {value!r} must be an integer >= 1"):
            validate_config(cfg)
    for name in ("t", "s", "m", "l", "ns", "nm", "nl", "demo", "demo_ns"):
        validate_config(load_config(name))          # every bundled config passes


def test_apply_overrides_takes_one_string_too():
    cfg = apply_overrides(load_config("demo"), "train.epochs=3")
    assert cfg.train.epochs == 3
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides(load_config("demo"), [3])


def test_evaluate_checks_its_config_and_batch_size(oracle):
    from damo_jax.evaluation.evaluator import evaluate
    data = ColorBoxDataset(num_images=2)
    cfg = oracle_config(INPUT_HW)
    cfg.test.conf_thre = 2.0               # used to give 0 detections and AP 0 without a word
    with pytest.raises(ConfigError, match="test.conf_thre = 2.0 must be a number in"):
        evaluate(*oracle, data, cfg, progress=False)
    for bad in (0, -1, 2.0, True):         # 0 was replaced by the config's, -1 said "unreadable"
        with pytest.raises(ConfigError, match=r"batch_size=.* must be an integer >= 1"):
            evaluate(*oracle, data, oracle_config(INPUT_HW), batch_size=bad, progress=False)
    stats = evaluate(*oracle, data, oracle_config(INPUT_HW), batch_size=1, progress=False)
    assert stats["images_scored"] == 2 and stats["AP50"] == pytest.approx(1.0)


def test_train_checks_the_config_before_writing_anything(tmp_path):
    from damo_jax.train.loop import train
    cfg = apply_overrides(load_config("demo"), ["test.conf_thre=2.0"])
    with pytest.raises(ConfigError, match="test.conf_thre"):
        train(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="data.image_size 100x100"):
        train(apply_overrides(load_config("demo"), ["data.image_size=(100, 100)"]), tmp_path / "run")
    with pytest.raises(InputPathError, match="'demo_nss': not a known config name"):
        train("demo_nss", tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="workdir gs://bucket/run: a URL"):
        train("demo", "gs://bucket/run")          # not a local folder named 'gs:'
    assert not Path("gs:").exists()


def test_detector_takes_a_jax_batch_and_decides_the_value_range_per_batch(oracle):
    model, variables = oracle
    det = Detector(JaxBackend(model, variables), class_names=CLASS_NAMES, image_size=INPUT_HW,
                   conf=0.3, iou=0.7, max_dets=10, batch_size=2)
    data = ColorBoxDataset(num_images=2)
    images = np.stack([data[0]["image"], data[0]["image"]]).astype(np.float32)   # 0..255 floats
    dark = images.copy()
    dark[1] = dark[1] / 255.0 * 0.9        # a dark image inside a 0..255 batch: max 0.9
    as_jax = det(jnp.asarray(images))
    assert len(as_jax) == 2
    np.testing.assert_allclose(as_jax[0]["boxes"], det(images[0].astype(np.uint8))["boxes"])
    out = det(dark)
    reference = det(np.round(dark[1]).clip(0, 255).astype(np.uint8))      # read as 0..255: near black
    assert len(out[1]["scores"]) == len(reference["scores"])
    assert len(out[1]["scores"]) < len(as_jax[1]["scores"])    # rescaled ×255 it would find boxes


def test_detector_names_what_it_cannot_read(oracle, tmp_path):
    model, variables = oracle
    det = Detector(JaxBackend(model, variables), class_names=CLASS_NAMES, image_size=INPUT_HW)
    for bad, name in ((None, "NoneType"), (5, "int"), (b"\x89PNG", "bytes")):
        with pytest.raises(TypeError, match=f"got {name}"):
            det(bad)
    with pytest.raises(InputPathError, match="is a folder"):
        det(str(tmp_path))


def test_detector_load_names_the_mistake(run_dir, tmp_path):
    with pytest.raises(InputPathError, match="'nss': not a known config name"):
        Detector.load("nss")
    with pytest.raises(InputPathError, match="no such run directory or config file"):
        Detector.load(str(tmp_path / "nope" / "run"))
    with pytest.raises(ConfigError, match="a run directory brings its own weights"):
        Detector.load(run_dir, weights=str(tmp_path / "w.pth"))
    with pytest.raises(ConfigError, match="model_path= is read by backend='onnx' or 'openvino'"):
        Detector.load(run_dir, model_path=str(tmp_path / "m.onnx"))
    for bad in (0, "64", 100):
        with pytest.raises(ConfigError, match="img_size"):
            Detector.load(run_dir, img_size=bad)
    assert Detector.load(run_dir, img_size=(32, 64)).image_size == (32, 64)


def test_load_model_takes_a_run_directory_positionally(run_dir):
    from damo_jax.inference.loading import load_model
    by_position, by_keyword = load_model(run_dir), load_model(checkpoint=run_dir)
    assert by_position.class_names == by_keyword.class_names == tuple(CLASS_NAMES)
    for a, b in zip(jax.tree_util.tree_leaves(by_position.variables),
                    jax.tree_util.tree_leaves(by_keyword.variables)):
        np.testing.assert_array_equal(a, b)


def test_bad_override_errors_name_the_source_the_user_gave(run_dir):
    """A bad override on a run's stored config names the run (it named the model: "config 'ns'",
    which the user never typed)."""
    from damo_jax.inference.loading import load_model
    bad = ["--config.test.conf_thre=2"]
    with pytest.raises(ConfigError, match=rf"^--checkpoint {re.escape(str(run_dir))} \(its stored config\) "
                                          r"with the --config.KEY overrides: test.conf_thre = 2.0 must"):
        load_model(checkpoint=run_dir, overrides=bad)
    with pytest.raises(ConfigError, match=rf"^--config {re.escape(str(run_dir))} \(its stored config\)"):
        load_model(run_dir, overrides=bad)
    with pytest.raises(ConfigError, match=r"^--config ns with the --config.KEY overrides: test.conf_thre"):
        load_model("ns", random_init=True, overrides=bad)


def test_checkpoint_resolve_errors_are_user_errors(run_dir, tmp_path):
    from damo_jax.train.checkpoint import load_for_inference, resolve
    with pytest.raises(ConfigError, match="checkpoint step 'x'"):
        resolve(run_dir, step="x")
    with pytest.raises(InputPathError, match="does not exist"):
        load_for_inference(tmp_path / "missing")
    with pytest.raises(InputPathError, match=r"checkpoint step 7 not in .*have \[1\]"):
        resolve(run_dir, step=7)


def test_export_onnx_checks_the_batch_before_tracing():
    from damo_jax.export.to_onnx import export_onnx
    for bad in (0, -2, "foo", 1.5, True):
        with pytest.raises(ConfigError, match="--batch"):
            export_onnx(None, batch=bad)


def test_fuse_without_batch_stats_says_so():
    from damo_jax.models import build_model, init_variables
    from damo_jax.models.reparam import fuse
    variables = init_variables(build_model("ns"), jax.random.PRNGKey(0), (1, 64, 64, 3))
    with pytest.raises(ValueError, match="'batch_stats' collection"):
        fuse({"params": variables["params"]}, "ns")


def test_weights_of_another_model_with_other_classes_name_that_model(tmp_path):
    """An Ns state dict with 6 classes given with config s (80): the class count used to be the
    only diagnosis; the model the file holds is named too."""
    from damo_jax.inference.loading import load_model
    cfg = load_config("ns")
    cfg.model.head.num_classes = 6
    weights = write_random_weights(tmp_path / "ns6.npz", cfg)
    with pytest.raises(ConfigError, match=r"predict 6 classes but config 's'.*holds DAMO-YOLO-NS"
                                          r".*use --config ns"):
        load_model("s", weights=str(weights))


def test_a_detector_with_too_few_class_names_says_so_once(oracle, caplog):
    import logging
    model, variables = oracle
    det = Detector(JaxBackend(model, variables), class_names=CLASS_NAMES[:1], image_size=INPUT_HW,
                   conf=0.3)
    data = ColorBoxDataset(num_images=2)
    with caplog.at_level(logging.WARNING, logger="damo_jax.inference.detector"):
        results = det([data[0]["image"], data[1]["image"]])
    labels = [int(c) for r in results for c in r["labels"]]
    assert 1 in labels and 0 in labels                     # both classes found
    names = [n for r in results for n in r["class_names"]]
    assert set(names) == {CLASS_NAMES[0], "1"}
    warnings = [r for r in caplog.records if "has no class name" in r.getMessage()]
    assert len(warnings) == 1 and "label 1" in warnings[0].getMessage()


@pytest.mark.parametrize("key, hint", [
    ("train.lr", "did you mean --config.train.base_lr_per_img? (the learning rate per image"),
    ("train.learning_rate", "did you mean --config.train.base_lr_per_img?"),
    ("test.nms_iou", "did you mean --config.test.iou_thre? (the NMS IoU threshold)"),
    ("test.score_thresh", "did you mean --config.test.conf_thre?"),
    ("test.imgsz", "did you mean --config.test.image_size?"),       # the same section's key first
    ("data.imgsz", "did you mean --config.data.image_size?"),
    ("data.num_workers", "did you mean --config.data.workers?"),
    ("train.bach_size", "did you mean --config.train.batch_size?"),    # no alias: the closest key
])
def test_unknown_override_key_hints_at_the_setting_meant(key, hint):
    """The audit: --config.train.lr=0.1 suggested train.ema, --config.test.nms_iou suggested
    pre_nms_topk. Names other frameworks use now point at our key."""
    from damo_jax.errors import ConfigKeyError
    with pytest.raises(ConfigKeyError) as info:
        apply_overrides(load_config("demo"), [f"{key}=1"])
    assert hint in str(info.value), str(info.value)


# ------------------------------------------------------------------- exported files (docs/EXPORT.md)
EXPORT_META = {"model": "ns", "image_size": "[32, 64]", "conf_thre": "0.05", "iou_thre": "0.7",
               "max_dets": "2", "pre_nms_topk": "50"}


def _handmade(path, **metadata):
    """Raw-output ONNX (1,3,32,64): anchor scores cat/dog [[.9,.1],[.8,0],[0,.7]] (anchors 0 and 1
    overlap), with export metadata."""
    from test_predict import write_handmade_onnx
    return write_handmade_onnx(path, class_names=("cat", "dog"), metadata=dict(EXPORT_META, **metadata))


def test_detector_load_takes_an_exported_file(tmp_path):
    """``Detector.load("m.onnx")`` was refused ("pass a config and the file as model_path="), and
    the documented ``Detector.load("s", backend="onnx", model_path=...)`` fails for a file with its
    own classes: a path to an exported file loads it through its metadata."""
    path = _handmade(tmp_path / "m.onnx")
    image = np.zeros((64, 64, 3), np.uint8)
    for args, kwargs, kind in (((str(path),), {}, "OnnxBackend"), ((path,), {}, "OnnxBackend"),
                               ((str(path),), {"backend": "openvino"}, "OpenVinoBackend")):
        if kind == "OpenVinoBackend":
            pytest.importorskip("openvino")
        det = Detector.load(*args, **kwargs)
        assert type(det.backend).__name__ == kind
        assert det.class_names == ("cat", "dog") and det.image_size == (32, 64)
        assert (det.params.max_dets, det.params.pre_nms_topk, det.conf) == (2, 50, 0.05)
        result = det(image)
        assert result["class_names"] == ["cat", "dog"]       # max_dets 2 of the 3 kept by NMS
        np.testing.assert_allclose(result["scores"], [0.9, 0.7], rtol=1e-6)
    from test_predict_errors import _as_ir
    xml = _as_ir(path)
    det = Detector.load(str(xml))
    assert type(det.backend).__name__ == "OpenVinoBackend" and det.class_names == ("cat", "dog")
    assert Detector.load(str(path), max_dets=3)(image)["class_names"] == ["cat", "dog", "dog"]
    with pytest.raises(ConfigError, match="an exported file brings its own weights"):
        Detector.load(str(path), model_path=str(path))
    with pytest.raises(ConfigError, match=r"pass the model's config and the file as weights="):
        Detector.load(str(tmp_path / "w.pth"))
    with pytest.raises(InputPathError, match="--onnx .*missing.onnx"):
        Detector.load(str(tmp_path / "missing.onnx"))


def test_export_metadata_records_the_step_and_the_test_settings_the_loader_uses(run_dir, tmp_path):
    """The export metadata lacked the resize, the checkpoint step, the damo_jax version and the
    run's test.max_dets / pre_nms_topk: ``eval --onnx`` without --config used the bundled config's
    (AP 0.406 against 0.397 of ``eval --checkpoint`` for a run with max_dets 10)."""
    import damo_jax
    from damo_jax.export import common
    from damo_jax.inference.loading import load_model
    dm = common.load_deploy_model(checkpoint=run_dir,
                                  overrides=["test.max_dets=7", "test.pre_nms_topk=60"])
    meta = dm.metadata()
    assert meta["weights"] == f"{run_dir} (step 1)"
    assert meta["damo_jax_version"] == damo_jax.__version__
    assert "no letterbox" in meta["resize"] and "INTER_LINEAR" in meta["resize"]
    assert (meta["max_dets"], meta["pre_nms_topk"]) == ("7", "60")
    assert (meta["conf_thre"], meta["iou_thre"]) == (str(dm.cfg.test.conf_thre),
                                                     str(dm.cfg.test.iou_thre))
    doc = (Path(__file__).resolve().parents[1] / "docs" / "EXPORT.md").read_text()
    table = doc.split("### Export metadata", 1)[1].split("\n## ", 1)[0]
    for key in meta:
        assert f"`{key}`" in table, f"docs/EXPORT.md's metadata table misses {key}"
    path = _handmade(tmp_path / "m.onnx", **{k: meta[k] for k in ("max_dets", "pre_nms_topk")})
    loaded = load_model(onnx=path)
    assert (loaded.cfg.test.max_dets, loaded.cfg.test.pre_nms_topk) == (7, 60)


def test_export_md_python_examples_run(tmp_path, capsys):
    """The two Python blocks of docs/EXPORT.md "Running exported models": the damo_jax one, and the
    raw onnxruntime decode, whose detections must equal ``Detector.load(file)``'s."""
    import re

    from PIL import Image
    doc = (Path(__file__).resolve().parents[1] / "docs" / "EXPORT.md").read_text()
    section = doc.split("## Running exported models", 1)[1].split("\n## ", 1)[0]
    api, raw = re.findall(r"```python\n(.*?)```", section, re.S)
    path = _handmade(tmp_path / "m.onnx", max_dets="500")
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.full((64, 96, 3), 90, np.uint8)).save(photo, quality=95)

    def run(code):
        scope = {"images_nhwc_float32": np.zeros((3, 32, 64, 3), np.float32)}
        code = code.replace('"s.onnx"', repr(str(path))).replace('"photo.jpg"', repr(str(photo)))
        exec(compile(code, "docs/EXPORT.md", "exec"), scope)
        return scope
    scope = run(api)
    assert scope["scores"].shape == (3, 3, 2) and scope["boxes"].shape == (3, 3, 4)
    want = scope["result"]
    assert want["class_names"] == ["cat", "dog", "dog"]      # anchor 1 suppressed by anchor 0
    got = run(raw)["detections"]
    assert [name for name, _, _ in got] == want["class_names"]
    np.testing.assert_allclose([s for _, s, _ in got], want["scores"], rtol=1e-6)
    np.testing.assert_allclose(np.array([b for _, _, b in got]), want["boxes"], atol=1e-4)
    assert "cat 0.90 6 4 30 36" in capsys.readouterr().out      # x factor 1.5, y factor 2
