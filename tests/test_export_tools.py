"""Export tooling that needs no detector: graph passes, FP16 pass, ONNX utilities, CLI parsing,
TensorRT profile/flag logic (TensorRT itself is not installable here; see test at the end)."""
from __future__ import annotations

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from damo_jax.export import common, fp16, graph_passes, onnx_utils, to_onnx, to_tensorrt


def tiny_net_onnx(upsample="repeat", batch=1):
    """A small NHWC conv net with a nearest 2x upsample + concat, exported by jax2onnx."""
    from jax2onnx import to_onnx as j2o
    rng = np.random.default_rng(0)
    w1 = jnp.asarray(rng.normal(0, 0.3, (3, 3, 3, 8)), jnp.float32)
    w2 = jnp.asarray(rng.normal(0, 0.3, (3, 3, 8, 8)), jnp.float32)
    w3 = jnp.asarray(rng.normal(0, 0.3, (1, 1, 16, 4)), jnp.float32)

    def conv(x, w, stride=1):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def up(x):
        if upsample == "repeat":
            return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jnp.repeat(x, 2, axis=2)[:, :, : x.shape[2] * 2 - 1]     # not an upsample

    def fn(images):
        x = jnp.transpose(images, (0, 2, 3, 1))
        a = jax.nn.relu(conv(x, w1))
        b = jax.nn.relu(conv(a, w2, stride=2))
        if upsample != "repeat":
            return (up(b) * 2.0).reshape(x.shape[0], -1)
        y = conv(jnp.concatenate([a, up(b)], -1), w3)
        return y.reshape(x.shape[0], -1, 4)

    model = j2o(fn, [(batch, 3, 16, 16)], opset=17, input_names=["images"], output_names=["out"])
    return fn, onnx_utils.fix_value_info(model)


def ort_out(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


def test_upsample_fold_removes_layout_transposes_exactly():
    fn, raw = tiny_net_onnx()
    x = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
    want = np.asarray(fn(x))
    basic = onnx_utils.optimize_ort(raw)
    folded, n = graph_passes.fold_upsample_chains(basic)
    assert n == 1
    clean = onnx_utils.optimize_ort(onnx_utils.fix_value_info(folded))
    onnx_utils.check(clean)
    assert onnx_utils.op_counts(clean)["Resize"] == 1
    assert onnx_utils.count_transposes(clean) < onnx_utils.count_transposes(basic)
    np.testing.assert_array_equal(ort_out(clean, x), ort_out(raw, x))
    np.testing.assert_allclose(ort_out(clean, x), want, atol=1e-5)


def test_upsample_fold_leaves_other_layout_chains_alone():
    _, raw = tiny_net_onnx(upsample="other")
    basic = onnx_utils.optimize_ort(raw)
    _, n = graph_passes.fold_upsample_chains(basic)
    assert n == 0


def test_fix_value_info_makes_full_checker_pass_on_stale_shapes():
    _, model = tiny_net_onnx()
    stale = onnx.ModelProto.FromString(model.SerializeToString())
    vi = stale.graph.value_info[0]
    dims = vi.type.tensor_type.shape.dim
    dims[-1].dim_value = dims[-1].dim_value + 5           # a wrong (stale) shape
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx.checker.check_model(stale, full_check=True)
    onnx_utils.check(onnx_utils.fix_value_info(stale))


def test_rename_prune_and_io_names():
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["dead"]),
         helper.make_node("Identity", ["a"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "unused")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx_utils.prune_dead_nodes(m)
    assert [n.op_type for n in m.graph.node] == ["Relu", "Identity"] and not m.graph.initializer
    onnx_utils.set_io_names(m, inputs=["images"], outputs=["scores"])
    assert onnx_utils.io_shapes(m) == {"images": [2], "scores": [2]}
    x = np.array([-1.0, 2.0], np.float32)
    out = ort.InferenceSession(m.SerializeToString()).run(None, {"images": x})[0]
    np.testing.assert_array_equal(out, [0.0, 2.0])
    with pytest.raises(ValueError, match="already exists"):
        onnx_utils.rename_value(m, "images", "scores")
    with pytest.raises(KeyError):
        onnx_utils.rename_value(m, "nope", "other")


def test_fp16_pass_keeps_io_float32_and_head_in_float32():
    _, model = tiny_net_onnx()
    model = onnx_utils.optimize_ort(model)
    half = fp16.to_fp16(model)
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    conv_weights = {n.input[1] for n in half.graph.node if n.op_type == "Conv"}
    types = {t.name: t.data_type for t in half.graph.initializer}
    assert conv_weights and all(types[w] == TensorProto.FLOAT16 for w in conv_weights)
    # the op after the last Conv (the output reshape) is not part of the conv trunk: FP32 again
    to_f32 = [n for n in half.graph.node if n.op_type == "Cast"
              and n.attribute[0].i == TensorProto.FLOAT]
    assert to_f32 and half.graph.node[-1].op_type != "Cast"
    x = np.random.default_rng(2).normal(size=(1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(ort_out(half, x), ort_out(model, x), atol=2e-2, rtol=2e-2)


def test_cli_argument_helpers():
    assert common.parse_img_size([640], (416, 416)) == (640, 640)
    assert common.parse_img_size([96, 160], None) == (96, 160)
    assert common.parse_img_size(None, (416, 416)) == (416, 416)
    for bad in ([100], [64, 64, 64], [0]):
        with pytest.raises(ValueError):
            common.parse_img_size(bad, None)
    assert common.parse_batch("dynamic") == common.DYNAMIC_BATCH and common.parse_batch("4") == 4
    with pytest.raises(ValueError):
        common.parse_batch("0")
    args = to_onnx.build_parser().parse_args(
        ["--config", "t", "--end2end", "--topk", "50", "--img-size", "96", "160", "--via", "tf",
         "--output", "x.onnx"])
    assert args.end2end and args.topk == 50 and args.img_size == [96, 160] and args.via == "tf"
    assert "STATIC BATCH ONLY" in to_onnx.build_parser().format_help()
    with pytest.raises(SystemExit):
        to_onnx.build_parser().parse_args(["--weights", "a.pth", "--checkpoint", "d", "--output",
                                           "x.onnx"])


def test_export_rejects_bad_route_options():
    dm = types.SimpleNamespace(image_size=(64, 64))
    with pytest.raises(ValueError, match="static --batch"):
        to_onnx.export_onnx(dm, via="tf", batch=common.DYNAMIC_BATCH, tf_dir=None)
    with pytest.raises(ValueError, match="opset"):
        to_onnx.export_onnx(dm, via="jax2onnx", opset=13)
    with pytest.raises(ValueError, match="--via"):
        to_onnx.export_onnx(dm, via="torch")


# ------------------------------------------------------------------------------- TensorRT logic
def test_tensorrt_profile_shapes():
    assert to_tensorrt.profile_shapes((1, 3, 640, 640)) is None
    assert to_tensorrt.profile_shapes((4, 3, 640, 640), 4, 4, 4) is None
    with pytest.raises(ValueError, match="static batch of 1"):
        to_tensorrt.profile_shapes((1, 3, 640, 640), 1, 8, 32)
    assert to_tensorrt.profile_shapes(("N", 3, 416, 416)) == (
        (1, 3, 416, 416), (8, 3, 416, 416), (32, 3, 416, 416))
    assert to_tensorrt.profile_shapes(("N", 3, 96, 160), 2, 4, 6)[1] == (4, 3, 96, 160)
    assert to_tensorrt.profile_shapes(("N", 3, 64, 64), None, 64, None)[2][0] == 64
    with pytest.raises(ValueError, match="min <= opt <= max"):
        to_tensorrt.profile_shapes(("N", 3, 64, 64), 8, 4, 16)
    with pytest.raises(ValueError, match="only the batch"):
        to_tensorrt.profile_shapes(("N", 3, "H", 64))


def test_tensorrt_fp16_api_detection_and_trtexec_line():
    trt10 = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(FP16=1, TF32=2))
    trt11 = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(TF32=2))
    assert to_tensorrt.has_fp16_flag(trt10) and not to_tensorrt.has_fp16_flag(trt11)
    line = to_tensorrt.trtexec_command("m.onnx", "m.engine", to_tensorrt.profile_shapes(
        ("N", 3, 640, 640), 1, 8, 32))
    assert "--minShapes=images:1x3x640x640" in line and "--maxShapes=images:32x3x640x640" in line
    assert "--saveEngine=m.engine" in line


def test_tensorrt_cli_on_a_dynamic_onnx_prints_trtexec(tmp_path, capsys):
    _, model = tiny_net_onnx(batch="N")
    path = onnx_utils.save(model, tmp_path / "dyn.onnx")
    assert to_tensorrt.onnx_input_shape(path) == ("N", 3, 16, 16)
    line = to_tensorrt.main(["--onnx", str(path), "--output", str(tmp_path / "e.plan"),
                             "--opt-batch", "4", "--max-batch", "8", "--print-trtexec"])
    assert "--optShapes=images:4x3x16x16" in capsys.readouterr().out and line.startswith("trtexec")
    with pytest.raises(SystemExit):
        to_tensorrt.main(["--onnx", str(path), "--output", "e.plan", "--min-batch", "0"])


def test_tensorrt_engine_build(tmp_path):
    trt = pytest.importorskip(
        "tensorrt", reason="TensorRT is not installable here: PyPI's tensorrt packages are stubs "
                           "that download wheels from NVIDIA's index (TOOLCHAIN.md §2e)")
    _, model = tiny_net_onnx(batch="N")
    path = onnx_utils.save(model, tmp_path / "dyn.onnx")
    engine = to_tensorrt.build_engine(path, tmp_path / "m.engine", min_batch=1, opt_batch=2,
                                      max_batch=4, trt=trt)
    assert engine.stat().st_size > 0


def test_export_size_defaults_to_the_test_size(caplog):
    """A run trained and evaluated at 96 px (``--img-size 96`` sets data/test sizes, not
    model.image_size) exports at 96 unless --img-size says otherwise. Without weights the export
    says so in ONE loud log line (it also went out as a Python warning: the user read it twice)."""
    import warnings
    from damo_jax.export.common import load_deploy_model
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        dm = load_deploy_model("ns", overrides=["--config.test.image_size=(96, 96)"])
    assert dm.cfg.model.image_size == (416, 416) and dm.image_size == (96, 96)
    assert [r.getMessage().count("NO WEIGHTS GIVEN") for r in caplog.records].count(1) == 1
    assert not [w for w in caught if "NO WEIGHTS" in str(w.message)]
    assert load_deploy_model("ns", image_size=(64, 128)).image_size == (64, 128)


@pytest.mark.parametrize("flags,message", [
    (["--opset", "12"], "--opset must be in [17, "),
    (["--opset", "99"], "--opset must be in [17, "),
    (["--end2end", "--topk", "0"], "--topk 0: the end2end detection cap must be an integer >= 1"),
    (["--end2end", "--conf", "2"], "--conf 2.0: the end2end score threshold must be a number in [0, 1]"),
    (["--end2end", "--iou", "-1"], "--iou -1.0: the end2end IoU threshold must be a number in [0, 1]"),
    (["--conf", "0.5"], "--conf: NMS options of --end2end only"),
    (["--topk", "10", "--iou", "0.5"], "--topk, --iou: NMS options of --end2end only"),
    (["--output", "m.onnx.bak"], "m.onnx.bak: expected a .onnx file name"),
    (["--via", "tf", "--batch", "dynamic"], "static --batch only"),
    (["--weights", "w.pth", "--seed", "3"], "--seed: the seed of a random-weight export")])
def test_export_options_are_checked_before_the_model_loads(flags, message, monkeypatch, tmp_path):
    """A bad --opset / --topk / --conf / --iou failed only after the model was built (seconds)."""
    from damo_jax.errors import ConfigError
    from damo_jax.export import common, to_onnx

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(common, "load_deploy_model", no_model)
    args = to_onnx.build_parser().parse_args(["--config", "t", "--output", str(tmp_path / "m.onnx"),
                                              *flags])
    with pytest.raises(ConfigError, match=re.escape(message)):
        to_onnx.run(args)


def test_export_never_overwrites_its_input(tmp_path):
    """``--output`` naming the ``--weights`` file (same path, or a symlink to it) is refused and
    the weights stay as they were; the same for TensorRT's ``--onnx``."""
    import hashlib

    from damo_jax.export import to_onnx, to_tensorrt
    weights = tmp_path / "w.onnx"                    # any name: only the path matters here
    weights.write_bytes(b"weights")
    (tmp_path / "link.onnx").symlink_to(weights)
    before = hashlib.md5(weights.read_bytes()).hexdigest()
    for out in (weights, tmp_path / "link.onnx", tmp_path / "sub" / ".." / "w.onnx"):
        code, err = _cli_error(to_onnx.main, ["--config", "ns", "--weights", str(weights),
                                              "--output", str(out)])
        assert code == 2 and "is the --weights file" in err, err
    code, err = _cli_error(to_tensorrt.main, ["--onnx", str(weights), "--output", str(weights),
                                              "--print-trtexec"])
    assert code == 2 and "is the --onnx file" in err, err
    assert hashlib.md5(weights.read_bytes()).hexdigest() == before


def _cli_error(main, argv):
    """(exit code, stderr text) of a CLI main that must stop with a user error."""
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, buf.getvalue()


def test_every_accepted_opset_gives_a_file_onnxruntime_runs(tmp_path):
    """``--opset`` accepted up to the newest opset a one-Relu probe loaded (26 with onnxruntime
    1.31), but from 24 on jax2onnx writes SiLU as ``Swish``, which that onnxruntime cannot run:
    opsets 25/26 died in a traceback, or (``--no-optimize``) wrote a file nothing could load. The
    probe now holds the activations an export uses, and the highest accepted opset exports."""
    from damo_jax.export.common import load_deploy_model
    top = to_onnx.max_runtime_opset()
    dm = load_deploy_model("ns", image_size=(64, 64))
    model = to_onnx.export_onnx(dm, opset=top, optimize=False)      # checks it loads in onnxruntime
    path = onnx_utils.save(model, tmp_path / "top.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores = sess.run(["scores"], {"images": np.zeros((1, 3, 64, 64), np.float32)})[0]
    assert scores.shape == (1, 84, 80) and np.isfinite(scores).all()


def test_onnxruntime_refusals_are_one_line_errors_and_saves_are_atomic(tmp_path, monkeypatch):
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(onnx_utils.OnnxRuntimeRefused, match=r"^--opset 17: the graph: onnxruntime "
                       r"\S+ cannot run it \(.*NoSuchOp.*\); lower$"):
        onnx_utils.check_runs(bad, "--opset 17: the graph", "; lower")
    good = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx_utils.check_runs(good, "unused")
    path = onnx_utils.save(good, tmp_path / "m.onnx")
    before = path.read_bytes()

    def interrupted(model, name, **kwargs):          # a save that dies half-way
        with open(name, "wb") as f:
            f.write(before[:10])
        raise KeyboardInterrupt
    monkeypatch.setattr(onnx, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        onnx_utils.save(bad, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_failed_write_is_one_error_naming_the_file(tmp_path, monkeypatch):
    """A full disk or an unwritable place gave a traceback (exit 1) from onnx / OpenVINO; now one
    ``error:`` line naming the output and the reason, the old file intact, no temporary left."""
    import errno

    from damo_jax.errors import OutputWriteError
    from damo_jax.export import to_openvino
    from damo_jax.inference.backends import import_openvino
    good = helper.make_model(helper.make_graph(       # an export's input and output names
        [helper.make_node("Relu", ["images"], [name]) for name in ("scores", "boxes")], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 8, 8])
         for name in ("scores", "boxes")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = onnx_utils.save(good, tmp_path / "m.onnx")
    before = path.read_bytes()

    def disk_full(model, name, **kwargs):
        with open(name, "wb") as f:
            f.write(before[:10])
        raise OSError(errno.ENOSPC, "No space left on device", str(name))
    with monkeypatch.context() as m:
        m.setattr(onnx, "save_model", disk_full)
        with pytest.raises(OutputWriteError, match=rf"^cannot write {re.escape(str(path))}: No space "
                                                   rf"left on device \(errno 28\)$"):
            onnx_utils.save(good, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]

    ov = import_openvino()

    def cannot_open(model, name, **kwargs):
        raise RuntimeError("Check 'bin_file' failed at src/core/src/pass/serialize.cpp:124:\n"
                           f"Can't open bin file: \"{name}\"")
    monkeypatch.setattr(ov, "save_model", cannot_open)
    with pytest.raises(OutputWriteError, match=rf"^cannot write {re.escape(str(tmp_path / 'm.xml'))}: "
                                               r"Can't open bin file: "):
        to_openvino.convert(path, tmp_path / "m.xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_openvino_conversion_refuses_what_predict_would_refuse(tmp_path):
    """``export openvino --onnx`` of an official DAMO-YOLO export (outputs ``output`` and an
    auto-generated name) or of an input of symbolic height / width wrote an IR (exit 0) that
    predict / eval then refused: now refused before anything is written."""
    from damo_jax.errors import UserError
    from damo_jax.export import to_openvino

    def model(outputs, hw=(8, 8)):
        nodes = [helper.make_node("Relu", ["images"], [name]) for name in outputs]
        return helper.make_model(helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *hw])],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]),
            opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    official = onnx_utils.save(model(["output", "791"]), tmp_path / "official.onnx")
    with pytest.raises(UserError, match=r"^--onnx .*official\.onnx: outputs \['output', '791'\], "
                                        r"expected \['scores', 'boxes'\]; not a damo_jax export"):
        to_openvino.convert(official, tmp_path / "a.xml")
    symbolic = onnx_utils.save(model(["scores", "boxes"], ("H", "W")), tmp_path / "sym.onnx")
    with pytest.raises(UserError, match=r"^--onnx .*sym\.onnx: the input height / width are not fixed"):
        to_openvino.convert(symbolic, tmp_path / "b.xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.onnx", "sym.onnx"]
