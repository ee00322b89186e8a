"""INT8 export (export/int8.py, quant_sensitivity.py, quant_report.py) on Ns at 64x64.

One FP32 ONNX of the demo config (DAMO-YOLO-Ns, 6 classes, random official init) is exported per
module; calibration uses 4 demo images through the shared pre-processing. Checked:
* the QDQ ONNX / NNCF IR really are quantised, and their outputs stay close to the FP32 model's
  on held-out images;
* the layer surgery of the sensitivity measurement: every node back in float == the FP32 outputs;
  a layer group is a Conv with its SiLU (Sigmoid + Mul);
* mixed precision keeps exactly the top-ranked Convs in float (ONNX) / fewer quantisers (IR);
* the report: files, mAP rows through the exported-file evaluation path, per-round latency.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")
pytest.importorskip("nncf")

from damo_jax.export import int8, quant_sensitivity as qs  # noqa: E402

SIZE = 64


def demo_config():
    """The demo config (Ns with the COCO head) with the demo data's 6 classes."""
    from damo_jax.config import apply_overrides, load_config
    cfg = load_config("demo_ns")
    return apply_overrides(cfg, ["model.head.num_classes=6", "model.class_names=('circle', "
                                 "'square', 'triangle', 'star', 'ring', 'cross')"])


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    from damo_jax.export import common, onnx_utils, to_onnx
    dm = common.load_deploy_model(demo_config(), image_size=(SIZE, SIZE), seed=3)
    path = tmp_path_factory.mktemp("int8") / "demo.onnx"
    return onnx_utils.save(to_onnx.export_onnx(dm, batch=1), path)


@pytest.fixture(scope="module")
def calib():
    return int8.calibration_images(f"demo:{SIZE}", "train", (SIZE, SIZE), 4)


@pytest.fixture(scope="module")
def held_out():
    return int8.calibration_images(f"demo:{SIZE}", "val", (SIZE, SIZE), 3)


@pytest.fixture(scope="module")
def exported(fp32_onnx, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8_out")
    candidates = qs.conv_names(onnx.load(str(fp32_onnx)))[-4:]  # the head's last Convs: cheap
    return out, int8.export_int8(fp32_onnx, out, calib, mixed=2, candidates=candidates)


def test_calibration_images_are_network_inputs(calib):
    assert len(calib) == 4
    for x in calib:
        assert x.shape == (1, 3, SIZE, SIZE) and x.dtype == np.float32
        assert 0 <= x.min() and x.max() <= 255 and x.std() > 5


def test_calibration_bad_spec_is_a_one_line_error():
    from damo_jax.data_pipelines import DataError
    with pytest.raises((DataError, ValueError, FileNotFoundError), match="nope"):
        int8.calibration_images("coco:/nope/missing", "train", (SIZE, SIZE), 2)


def test_int8_files_are_quantised_and_follow_fp32(exported, fp32_onnx, held_out, calib, tmp_path):
    out, result = exported
    files = result["files"]
    assert set(files) == {"onnx fp32", "onnx int8", "onnx int8 mixed", "openvino fp32",
                          "openvino int8", "openvino int8 mixed"}
    q = onnx.load(str(files["onnx int8"]))
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert all(n.input[1].endswith("DequantizeLinear_Output") for n in convs)
    meta = {p.key: p.value for p in q.metadata_props}
    assert json.loads(meta["class_names"])[:1] and meta["precision"] == "int8-qdq"
    ref = qs.run_onnx(str(fp32_onnx), held_out)
    err = qs.output_error(ref, qs.run_onnx(str(files["onnx int8"]), held_out))
    assert 0 < err < 1e-2  # quantised (not bit-equal), yet close to FP32 on held-out images
    # (a random-init model's outputs hardly depend on the input, so the benefit of calibrating on
    # real images over blank ones cannot be shown here; it needs a trained model)
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()
    ops = [op.get_type_name() for op in ov.Core().read_model(str(files["openvino int8"])).get_ops()]
    assert ops.count("FakeQuantize") > 20


def test_float_layer_surgery_restores_fp32(exported, fp32_onnx, held_out):
    out, result = exported
    fp32 = onnx.load(str(fp32_onnx))
    groups = qs.conv_groups(fp32)
    kinds = {n.name: n.op_type for n in fp32.graph.node}
    assert len(groups) == len(qs.conv_names(fp32))
    assert sum(sorted(kinds[m] for m in g[1:]) == ["Mul", "Sigmoid"] for g in groups.values()) > 40
    qdq = onnx.load(str(result["files"]["onnx int8"]))
    restored = qs.float_layers(qdq, fp32, [n.name for n in fp32.graph.node])
    for (s_f, b_f), (s_r, b_r) in zip(qs.run_onnx(fp32, held_out), qs.run_onnx(restored, held_out)):
        np.testing.assert_allclose(s_r, s_f, atol=1e-5)
        np.testing.assert_allclose(b_r, b_f, atol=1e-3)


def test_mixed_keeps_the_most_sensitive_layers_float(exported):
    out, result = exported
    sens = json.loads((out / "sensitivity.json").read_text())
    ranked = [name for name, _ in sens["layers"]]
    values = [v for _, v in sens["layers"]]
    assert len(ranked) == 4 and values == sorted(values, reverse=True)
    assert result["float_layers"] == ranked[:2] == sens["float_layers"]
    mixed = onnx.load(str(result["files"]["onnx int8 mixed"]))
    float_convs = {n.name for n in mixed.graph.node if n.op_type == "Conv"
                   and not n.input[1].endswith("DequantizeLinear_Output")}
    assert float_convs == set(ranked[:2])
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()

    def activation_quantised(key):  # {conv: its input activation comes through a FakeQuantize}
        ops = {op.get_friendly_name(): op for op in
               ov.Core().read_model(str(result["files"][key])).get_ops()}
        return {name: ops[f"{name}/WithoutBiases"].input_value(0).get_node().get_type_name()
                == "FakeQuantize" for name in ranked}
    full, mixed_ir = activation_quantised("openvino int8"), activation_quantised("openvino int8 mixed")
    assert all(full[name] for name in ranked)
    assert [mixed_ir[name] for name in ranked] == [False, False, True, True]


def test_report_contents(exported):
    from damo_jax.data_pipelines import open_dataset
    from damo_jax.export.quant_report import write_report
    out, result = exported
    dataset = open_dataset(f"demo:{SIZE}", "val")
    report = write_report(out, result["files"], model="demo@64", config=demo_config(),
                          dataset=dataset,
                          calibration="4 demo images", float_layers=result["float_layers"],
                          runs=2, rounds=2)
    saved = json.loads((out / "int8_report.json").read_text())
    assert set(saved["accuracy"]) == set(result["files"])
    for stats in saved["accuracy"].values():
        assert {"AP", "AP50"} <= set(stats) and stats["images_scored"] == len(dataset)
    assert set(saved["latency"]) == {"1", "2"}
    lat = saved["latency"]["1"]
    assert lat["onnx fp32"]["vs_fp32"] is None and lat["onnx int8"]["vs_fp32"]["median"] > 0
    assert lat["openvino int8 mixed"]["vs_fp32"]["min"] <= lat["openvino int8 mixed"]["vs_fp32"]["max"]
    md = (out / "int8_report.md").read_text()
    assert "onnx int8 mixed" in md and "load average" in md and report["cpu"] in md


def _damo_jax(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "damo_jax", *args], capture_output=True, text=True,
                          timeout=1200)


def test_cli_export_int8_end_to_end(fp32_onnx, tmp_path):
    """``damo-jax export onnx --int8 ...`` as a user types it: files, report, exit code 0."""
    out = tmp_path / "cli_int8"
    r = _damo_jax("export", "onnx", "--int8", "--config", "demo_ns", "--onnx", str(fp32_onnx),
                  "--config.model.head.num_classes=6", "--config.model.class_names=('circle', 'square', "
                  "'triangle', 'star', 'ring', 'cross')", f"--calib-data=demo:{SIZE}", "--calib-images", "4",
                  "--mixed", "1", "--report-rounds", "1", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((out / "int8_report.json").read_text())
    assert set(saved["accuracy"]) == {"onnx fp32", "onnx int8", "onnx int8 mixed"}
    assert all(stats["images_scored"] == 100 for stats in saved["accuracy"].values())
    assert len(saved["float_layers"]) == 1
    q = onnx.load(str(next(out.glob("*_int8.onnx"))))
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) > 10
    assert "onnx int8 mixed" in r.stdout                     # the report is printed


def test_cli_export_int8_user_mistakes_exit_2(fp32_onnx, tmp_path):
    r = _damo_jax("export", "int8", "--config", "demo_ns", "--onnx", str(tmp_path / "missing.onnx"),
                  "--calib-data", f"demo:{SIZE}", "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "missing.onnx" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _damo_jax("export", "int8", "--config", "demo_ns", "--onnx", str(fp32_onnx),
                  "--calib-data", "coco:/nope/missing", "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "/nope/missing" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_openvino_only_writes_no_onnx_int8(fp32_onnx, calib, tmp_path, caplog):
    """``--format openvino`` writes (and logs) only what it keeps: no QDQ ONNX file appears,
    not even for a moment in the output folder, and an existing one there is left alone."""
    out = tmp_path / "ov"
    out.mkdir()
    keep = out / f"{fp32_onnx.stem}_int8.onnx"
    keep.write_bytes(b"the user's own file")
    with caplog.at_level("INFO", logger="damo_jax.export"):
        result = int8.export_int8(fp32_onnx, out, calib, formats=("openvino",))
    assert set(result["files"]) == {"onnx fp32", "openvino fp32", "openvino int8"}
    assert keep.read_bytes() == b"the user's own file"
    assert "QDQ INT8" not in caplog.text
    assert sorted(p.name for p in out.glob("*int8*")) == sorted(
        [keep.name, f"{fp32_onnx.stem}_int8.xml", f"{fp32_onnx.stem}_int8.bin"])


def test_cli_export_int8_output_named_like_a_file(fp32_onnx, tmp_path):
    r = _damo_jax("export", "openvino", "--int8", "--config", "demo_ns", "--onnx", str(fp32_onnx),
                  "--calib-data", f"demo:{SIZE}", "--output", str(tmp_path / "q.xml"))
    assert r.returncode == 2 and "give a folder name" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "q.xml").exists()


def test_quantize_onnx_drops_only_the_pre_processing_hint(fp32_onnx, calib, tmp_path, caplog):
    """onnxruntime's "consider to run pre-processing" warning came with every INT8 export (the
    graph it would pre-process is already static-shaped with BatchNorm folded); other root-logger
    warnings still pass, and the filter is gone afterwards."""
    import logging
    with caplog.at_level(logging.INFO):
        int8.quantize_onnx(fp32_onnx, tmp_path / "q.onnx", calib[:2], quiet=True)
        logging.warning("an unrelated warning")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("pre-processing" in m for m in messages), messages
    assert "an unrelated warning" in messages
    assert not logging.getLogger().filters
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / "q.onnx")).graph.node)
