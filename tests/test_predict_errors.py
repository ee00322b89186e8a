"""Bad input to predict / Detector / exported-file backends / checkpoint loading (user audit of
``damo-jax predict``): a clear error naming the flag and file, or a logged skip — never data loss,
a traceback or a silently wrong result. Library-level; no model is compiled."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from damo_jax.errors import ConfigError, UserError


# ----------------------------------------------------------------- 1: --out vs --source, overwrite
def test_out_equal_to_or_inside_source_is_refused(tmp_path):
    from damo_jax.cli.predict import check_out_vs_source
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(src / "a.png")
    with pytest.raises(ConfigError, match="--out .*is the --source folder"):
        check_out_vs_source(src, src)
    with pytest.raises(ConfigError, match="--out .*is the --source folder"):
        check_out_vs_source(str(src / "sub" / ".."), src)        # resolved
    with pytest.raises(ConfigError, match="--out .*inside the --source folder"):
        check_out_vs_source(src / "preds", src)
    with pytest.raises(ConfigError, match="would replace the input image"):
        check_out_vs_source(src, src / "a.png")                  # a single image, out = its folder
    check_out_vs_source(tmp_path / "preds", src)                 # outside: fine
    check_out_vs_source(tmp_path / "preds", src / "a.png")


def test_a_url_or_camera_source_is_named_as_such(tmp_path, monkeypatch):
    """--source https://… said "https:/…: no such file or folder" (a mangled URL), --source 0 the
    same; now each says what predict reads."""
    from damo_jax.errors import InputPathError
    from damo_jax.inference.images import list_images_and_videos
    monkeypatch.chdir(tmp_path)
    url = "https://example.com/images/bus.jpg"
    with pytest.raises(InputPathError, match=r"^--source https://example.com/images/bus.jpg: a URL; "
                                             r".*local paths only .*curl -LO https://example"):
        list_images_and_videos(url, flag="--source")
    with pytest.raises(InputPathError, match=r"^--source 0: no such file or folder \(camera indices"):
        list_images_and_videos("0", flag="--source")
    Image.new("RGB", (8, 8)).save(tmp_path / "0", format="PNG")  # a file named 0 is read
    assert list_images_and_videos("0", flag="--source")[0] == [Path("0")]


def test_a_drawing_is_never_written_over_an_input_file(tmp_path):
    from damo_jax.cli.predict import _file_id, _save_drawing

    class Det:
        class_names = ("a",)
    image = np.full((16, 16, 3), 7, np.uint8)
    inp = tmp_path / "in.png"
    Image.fromarray(image).save(inp)
    before = inp.read_bytes()
    link = tmp_path / "link.png"
    link.hardlink_to(inp)                                        # same file under another name
    result = {"boxes": np.array([[1, 1, 10, 10]], np.float32), "scores": np.array([0.9]),
              "labels": np.array([0])}
    inputs = {_file_id(inp)}
    assert _save_drawing(inp, image, result, Det(), inputs) is None
    assert _save_drawing(link, image, result, Det(), inputs) is None
    assert inp.read_bytes() == before
    assert _save_drawing(tmp_path / "out.png", image, result, Det(), inputs) == tmp_path / "out.png"


# ----------------------------------------------------------------- 2/3: option ranges at load time
@pytest.mark.parametrize("kwargs,flag", [
    (dict(batch_size=0), "--batch-size"), (dict(batch_size=-1), "--batch-size"),
    (dict(max_dets=0), "--max-dets"), (dict(max_dets=-5), "--max-dets"),
    (dict(conf=-1.0), "--conf"), (dict(conf=1.5), "--conf"), (dict(conf=math.nan), "--conf"),
    (dict(conf=math.inf), "--conf"), (dict(iou=-0.5), "--iou"), (dict(iou=2.0), "--iou"),
    (dict(iou=math.nan), "--iou")])
def test_detector_load_checks_options_before_loading(kwargs, flag, tmp_path):
    from damo_jax.inference.detector import Detector
    with pytest.raises(ValueError, match=f"Detector.load: {flag} "):   # before the (missing) run
        Detector.load(str(tmp_path / "no_such_run"), **kwargs)


def test_detector_constructor_checks_options():
    from damo_jax.inference.detector import Detector

    def backend(images):  # never called
        raise AssertionError
    Detector(backend, class_names=("a",), image_size=(32, 32), conf=0.0, iou=1.0, max_dets=1,
             batch_size=1)                                       # the bounds are allowed
    for kwargs in (dict(batch_size=0), dict(max_dets=0), dict(pre_nms_topk=0), dict(conf=1.01),
                   dict(iou=float("nan"))):
        with pytest.raises(ConfigError, match="Detector: --"):
            Detector(backend, class_names=("a",), image_size=(32, 32), **kwargs)


# ----------------------------------------------------------------- 4: corrupt exported files
def _handmade_onnx(path):
    from test_predict import write_handmade_onnx
    return write_handmade_onnx(path)


def test_corrupt_onnx_is_a_user_error(tmp_path):
    from damo_jax.inference.backends import OnnxBackend, OpenVinoBackend
    good = _handmade_onnx(tmp_path / "good.onnx")
    rand = tmp_path / "rand.onnx"
    rand.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    for bad in (rand, trunc):
        with pytest.raises(UserError, match=f"--onnx {bad}: cannot be read as an ONNX model"):
            OnnxBackend(bad)
        with pytest.raises(UserError, match=f"--openvino {bad}: cannot be read as an ONNX model"):
            OpenVinoBackend(bad)


def test_corrupt_or_incomplete_openvino_ir_is_a_user_error(tmp_path):
    pytest.importorskip("openvino")
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()

    from damo_jax.inference.backends import OpenVinoBackend
    xml = tmp_path / "m.xml"
    ov.save_model(ov.Core().read_model(str(_handmade_onnx(tmp_path / "m.onnx"))), str(xml))
    OpenVinoBackend(xml)                                          # the good IR loads
    xml.with_suffix(".bin").unlink()
    with pytest.raises(UserError, match=r"--openvino .*m.xml: its weights file m.bin is missing"):
        OpenVinoBackend(xml)
    bad = tmp_path / "bad.xml"
    bad.write_text("<oops")
    bad.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(UserError, match="--openvino .*bad.xml: cannot be read as an OpenVINO IR"):
        OpenVinoBackend(bad)


def test_export_targets_check_the_onnx_file_and_tensorrt(tmp_path, monkeypatch):
    """Each converter reads its --onnx through ``onnx_utils.check_readable`` (so the CLI and the
    scripts under export/ both give one line), and a missing TensorRT is a user error."""
    from damo_jax.export import int8, onnx_utils, to_openvino, to_tensorrt
    jpg = tmp_path / "notamodel.jpg"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(jpg)
    with pytest.raises(UserError, match=f"--onnx {jpg}: cannot be read as an ONNX model"):
        onnx_utils.check_readable(jpg)
    out = tmp_path / "x"
    for run in (lambda: to_openvino.convert(jpg, out.with_suffix(".xml")),
                lambda: to_tensorrt.run(to_tensorrt.build_parser().parse_args(
                    ["--onnx", str(jpg), "--output", str(out), "--print-trtexec"])),
                lambda: int8.run(int8.build_parser().parse_args(
                    ["--config", "ns", "--onnx", str(jpg), "--calib-data", "demo",
                     "--output-dir", str(out)]))):
        with pytest.raises(UserError, match="cannot be read as an ONNX model"):
            run()
    good = _handmade_onnx(tmp_path / "m.onnx")
    onnx_utils.check_readable(good)                                  # a real ONNX file passes
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)   # import fails
    with pytest.raises(to_tensorrt.TensorRTMissing, match="TensorRT's Python package is not installed"):
        to_tensorrt.build_engine(good, tmp_path / "m.engine")


# ----------------------------------------------------------------- 5: partial / corrupt checkpoints
@pytest.fixture()
def tiny_run(tmp_path):
    import jax.numpy as jnp

    from damo_jax.config import load_config
    from damo_jax.train import checkpoint
    cfg = load_config("demo")
    variables = {"params": {"w": jnp.arange(1000, dtype=jnp.float32)},
                 "batch_stats": {"m": jnp.ones(3)}}
    state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
             "opt_state": {"count": jnp.zeros((), jnp.int32)}, "step": jnp.asarray(1, jnp.int32),
             "rng": jnp.zeros((2,), jnp.uint32), "ema_params": variables["params"],
             "ema_batch_stats": variables["batch_stats"]}
    meta = {"config": checkpoint.config_to_json(cfg), "class_names": list(cfg.model.class_names)}
    run = tmp_path / "run"
    with checkpoint.Checkpoints(run / "checkpoints", async_save=False) as ck:
        ck.save(100, state, meta, metrics={"AP": 0.0})
    return run


def _load(run):
    from damo_jax.train.checkpoint import load_for_inference
    from damo_jax.inference.loading import _run_dir_call
    return _run_dir_call(load_for_inference, run)


def test_checkpoint_without_ema_is_one_clear_error(tiny_run):
    _, variables, _ = _load(tiny_run)                            # the intact run loads
    assert variables["params"]["w"].shape == (1000,)
    shutil.rmtree(tiny_run / "checkpoints" / "100" / "ema")
    with pytest.raises(UserError, match=rf"--checkpoint {tiny_run}: step 100 .*is incomplete or "
                       r"corrupt \(missing ema\)"):
        _load(tiny_run)


def test_empty_step_folder_is_one_clear_error(tiny_run):
    step = tiny_run / "checkpoints" / "100"
    shutil.rmtree(step)
    step.mkdir()
    with pytest.raises(UserError, match="step 100 .*is incomplete or corrupt"):
        _load(tiny_run)


def test_truncated_array_files_are_one_clear_error(tiny_run):
    ema = tiny_run / "checkpoints" / "100" / "ema"
    data = [p for p in ema.rglob("*") if p.is_file() and p.stat().st_size > 1000]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(UserError, match="step 100 .*is incomplete or corrupt"):
        _load(tiny_run)


def test_newer_complete_step_is_preferred_over_an_older_broken_one(tiny_run):
    from damo_jax.train.checkpoint import resolve
    older = tiny_run / "checkpoints" / "50"
    shutil.copytree(tiny_run / "checkpoints" / "100", older)
    shutil.rmtree(older / "ema")
    assert resolve(tiny_run, "latest")[1] == 100
    _load(tiny_run)


# ----------------------------------------------------------------- 6: suffixes PIL cannot write
def test_drawing_of_an_unwritable_suffix_is_saved_as_png(tmp_path, caplog):
    from damo_jax.cli.predict import _save_drawing

    class Det:
        class_names = ("a",)
    image = np.zeros((16, 16, 3), np.uint8)
    result = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}
    with caplog.at_level("INFO", logger="damo_jax.cli.predict"):
        written = _save_drawing(tmp_path / "raw.dng", image, result, Det(), set())
    assert written == tmp_path / "raw.dng.png" and written.is_file()
    assert "raw.dng.png" in caplog.text
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert _save_drawing(blocked / "x.png", image, result, Det(), set()) is None  # no crash


# ----------------------------------------------------------------- 7: arrays and PIL input
def test_small_int_arrays_are_8bit_and_pil_exif_is_applied(tmp_path):
    from damo_jax.inference.detector import to_rgb_array
    rgb = np.random.default_rng(0).integers(0, 256, (6, 10, 3), np.uint8)
    np.testing.assert_array_equal(to_rgb_array(rgb.astype(np.int64)), rgb)
    np.testing.assert_array_equal(to_rgb_array(rgb.astype(np.uint16)), rgb)
    wide = (rgb.astype(np.uint16) * 257)                          # real 16-bit values
    np.testing.assert_array_equal(to_rgb_array(wide), rgb)
    # EXIF orientation 6 (rotate 90 cw): a PIL image comes out like the path does
    path = tmp_path / "exif6.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(path, exif=exif, quality=100)
    from_path = to_rgb_array(path)
    from_pil = to_rgb_array(Image.open(path))
    assert from_path.shape == (10, 6, 3)
    np.testing.assert_array_equal(from_pil, from_path)


def test_a_resized_0_to_1_float_image_stays_0_to_1(caplog):
    """A 0..1 float image resized with cubic interpolation overshoots 1 (1.13 in the audit); it was
    read as 0..255, i.e. black: 6 detections became 0 without a word."""
    import logging
    from damo_jax.inference.detector import to_rgb_array
    rgb = np.random.default_rng(1).integers(0, 256, (6, 10, 3), np.uint8)
    unit = rgb.astype(np.float32) / 255.0
    overshoot = unit.copy()
    overshoot[0, 0, 0] = 1.13
    expected = rgb.copy()
    expected[0, 0, 0] = 255                                          # clipped
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(to_rgb_array(overshoot), expected)
    assert "values up to 1.13 is read as a 0..1 image" in caplog.text
    np.testing.assert_array_equal(to_rgb_array(unit), rgb)           # plain 0..1: no warning needed
    np.testing.assert_array_equal(to_rgb_array(rgb.astype(np.float32)), rgb)    # 0..255 floats


# ----------------------------------------------------------------- 7: exported files that do not fit
def _exported_variant(path, *, class_names=None, metadata=None, input_dims=None, outputs=None):
    """The handmade raw-output file (1,3,32,64) -> scores (1,3,2), boxes (1,3,4), edited:
    ``input_dims`` replace the input's dimensions (a str: a symbolic one), ``outputs`` rename the
    two outputs (scores, boxes)."""
    import onnx
    from test_predict import write_handmade_onnx
    write_handmade_onnx(path, class_names=class_names, metadata=metadata)
    model = onnx.load(str(path))
    if input_dims is not None:
        for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, input_dims):
            dim.Clear()
            setattr(dim, "dim_param" if isinstance(value, str) else "dim_value", value)
    if outputs is not None:
        renamed = dict(zip(("scores", "boxes"), outputs))
        for node in model.graph.node:
            node.output[:] = [renamed.get(o, o) for o in node.output]
        for out in model.graph.output:
            out.name = renamed[out.name]
    onnx.save(model, str(path))
    return path


METADATA = {"model": "ns", "image_size": "[32, 64]", "conf_thre": "0.05", "iou_thre": "0.7"}


def _as_ir(onnx_path):
    """The IR of an ONNX file, its metadata in rt_info damo_jax/<key> (as export/to_openvino.py)."""
    import onnx

    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()
    model = ov.Core().read_model(str(onnx_path))
    for prop in onnx.load(str(onnx_path)).metadata_props:
        model.set_rt_info(prop.value, ["damo_jax", prop.key])
    xml = onnx_path.with_suffix(".xml")
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


@pytest.mark.parametrize("kind", ["onnx", "openvino"])
def test_a_config_with_another_class_count_than_the_file_is_refused(kind, tmp_path):
    """A file without metadata (6 classes) with ``--config ns`` (80) wrote COCO names for its
    labels, exit 0; the scores output's class dimension is checked against the config."""
    from damo_jax.inference.loading import load_model
    if kind == "openvino":
        pytest.importorskip("openvino")
    path = _exported_variant(tmp_path / "m.onnx")                       # 2 classes, no metadata
    if kind == "openvino":
        path = _as_ir(path)
    with pytest.raises(ConfigError, match=rf"^--{kind} {path} predicts 2 classes \(its scores output\), "
                                          r"--config ns has 80"):
        load_model("ns", **{kind: path})
    cfg = load_config_with_classes(("a", "b"))
    assert load_model(cfg, **{kind: path}).class_names == ("a", "b")    # 2 names: fine


def load_config_with_classes(names):
    from damo_jax.config import load_config
    cfg = load_config("ns")
    cfg.model.class_names = tuple(names)
    cfg.model.head.num_classes = len(names)
    return cfg


def test_exported_metadata_that_disagrees_with_the_scores_output_is_refused(tmp_path):
    from damo_jax.inference.loading import load_model
    path = _exported_variant(tmp_path / "m.onnx", class_names=("a", "b", "c"), metadata=METADATA)
    with pytest.raises(ConfigError, match=r"predicts 2 classes \(its scores output\), its export "
                                          r"metadata names 3"):
        load_model(onnx=path)


def test_an_input_of_symbolic_height_and_width_is_one_clear_error(tmp_path):
    """Another tool's dynamic-axes export (input (1, 3, 'H', 'W')): ``int('H')`` ValueError
    traceback (onnxruntime), "Cannot get length of dynamic dimension" (OpenVINO)."""
    from damo_jax.inference.backends import OnnxBackend, OpenVinoBackend
    from damo_jax.inference.loading import load_model
    path = _exported_variant(tmp_path / "sym.onnx", class_names=("a", "b"), metadata=METADATA,
                             input_dims=(1, 3, "H", "W"))
    message = r": the input height / width are not fixed \(input shape \(1, 3, {}, {}\)\)"
    with pytest.raises(UserError, match=rf"^--onnx {path}" + message.format("H", "W")):
        OnnxBackend(path)
    with pytest.raises(UserError, match=rf"^--onnx {path}" + message.format("H", "W")):
        load_model(onnx=path)                                           # the metadata route too
    pytest.importorskip("openvino")
    with pytest.raises(UserError, match=rf"^--openvino {path}" + message.format(r"\?", r"\?")):
        OpenVinoBackend(path)
    xml = _as_ir(path)
    with pytest.raises(UserError, match=rf"^--openvino {xml}" + message.format(r"\?", r"\?")):
        load_model(openvino=xml)
    two_channels = _exported_variant(tmp_path / "c2.onnx", input_dims=(1, 2, 32, 64))
    with pytest.raises(UserError, match=r"input shape \(1, 2, 32, 64\), expected \(N, 3, H, W\)"):
        OnnxBackend(two_channels)


def test_a_broken_ir_without_config_names_the_read_error(tmp_path):
    """A truncated .bin (or the .bin of another IR) without --config said "the file holds no
    damo_jax export metadata; give --config": the read error was swallowed."""
    pytest.importorskip("openvino")
    from damo_jax.inference.loading import load_model
    xml = _as_ir(_exported_variant(tmp_path / "m.onnx", class_names=("a", "b"), metadata=METADATA))
    assert load_model(openvino=xml).class_names == ("a", "b")           # the intact IR loads
    weights = xml.with_suffix(".bin")
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(UserError, match=rf"^--openvino {xml}: cannot be read as an OpenVINO IR "
                                        r"model \(.*weights"):
        load_model(openvino=xml)
    xml.write_text(xml.read_text()[:300])                                # a truncated .xml
    with pytest.raises(UserError, match=rf"^--openvino {xml}: cannot be read as an OpenVINO IR"):
        load_model(openvino=xml)


def test_a_file_exported_with_random_weights_warns_when_loaded(tmp_path, caplog):
    from damo_jax.inference.loading import load_model
    path = _exported_variant(tmp_path / "m.onnx", class_names=("a", "b"),
                             metadata=dict(METADATA, weights="random-init(seed=0)"))
    with caplog.at_level("WARNING", logger="damo_jax.inference.loading"):
        load_model(onnx=path)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "exported with random weights" in warned[0], warned
    caplog.clear()
    trained = _exported_variant(tmp_path / "t.onnx", class_names=("a", "b"),
                                metadata=dict(METADATA, weights="runs/demo (step 900)"))
    with caplog.at_level("WARNING", logger="damo_jax.inference.loading"):
        load_model(onnx=trained)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_an_official_onnx_export_is_named_as_not_a_damo_jax_export(tmp_path):
    """Official DAMO-YOLO ONNX files (outputs 'output' and '791') were refused with
    "T_640_post.onnx: outputs [...], expected [...]": no flag, no way forward."""
    from damo_jax.inference.loading import load_model
    path = _exported_variant(tmp_path / "T_640_post.onnx", outputs=("output", "791"))
    expected = (rf"^--onnx {path}: outputs \['output', '791'\], expected \['scores', 'boxes'\]; "
                r"not a damo_jax export \(official DAMO-YOLO ONNX exports are not read: export the "
                r"official .pth with damo_jax instead: damo-jax export onnx --config NAME --weights")
    with pytest.raises(UserError, match=expected):
        load_model("ns", onnx=path)
    with pytest.raises(UserError, match=expected):                      # not "give --config"
        load_model(onnx=path)
