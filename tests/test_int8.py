"""INT8 export (export/int8.py, quant_sensitivity.py, quant_report.py) on Ns at 64x64.

One FP32 ONNX of the demo config (DAMO-YOLO-Ns, 6 classes, random official init) is exported per
module; calibration uses 4 demo images through the shared pre-processing. Checked:
* the QDQ ONNX / NNCF IR really are quantised, and their outputs stay close to the FP32 model's
  on held-out images;
* the layer surgery of the sensitivity measurement: every node back in float == the FP32 outputs;
  a layer group is a Conv with its SiLU (Sigmoid + Mul);
* mixed precision keeps exactly the top-ranked Convs in float (ONNX) / fewer quantisers (IR);
* the report: files, mAP rows through the exported-file evaluation path, per-round latency, the
  warning on a large AP loss;
* the head's post-processing stays float: class logits spanning hundreds (as a trained model's)
  keep their scores, not a handful of UINT8 steps through the sigmoid;
* ``--onnx``: an end2end / foreign file or a class-count mismatch is refused before anything is
  written; without ``--config`` the file's export metadata gives the config.
"""
from __future__ import annotations

import json
from pathlib import Path

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
def deploy_model():
    from damo_jax.export import common
    return common.load_deploy_model(demo_config(), image_size=(SIZE, SIZE), seed=3)


@pytest.fixture(scope="module")
def fp32_onnx(deploy_model, tmp_path_factory):
    from damo_jax.export import onnx_utils, to_onnx
    path = tmp_path_factory.mktemp("int8") / "demo.onnx"
    return onnx_utils.save(to_onnx.export_onnx(deploy_model, batch=1), path)


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


# ------------------------------------------------------- post-processing float, --onnx checks

def _wide_logits(fp32_onnx, dst):
    """A copy of the FP32 model whose class logits span about -300..+1, as a trained model's do
    (demo T: -316..2.5): the class Convs' weights x20 (input-dependent scores around 0.5), and
    class 0's bias -300 (a class never seen)."""
    from onnx import numpy_helper
    m = onnx.load(str(fp32_onnx))
    producer = {o: n for n in m.graph.node for o in n.output}
    inits = {t.name: t for t in m.graph.initializer}
    convs, stack, seen = [], ["scores"], set()
    while stack:                                     # the Convs the scores output reads
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        (convs.append(node) if node.op_type == "Conv" else stack.extend(node.input))
    assert len(convs) == 3                           # one per level
    for conv in convs:
        w, b = (numpy_helper.to_array(inits[name]) for name in conv.input[1:3])
        b = np.zeros_like(b)
        b[0] = -300.0
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(w * 20, conv.input[1]))
        inits[conv.input[2]].CopyFrom(numpy_helper.from_array(b, conv.input[2]))
    onnx.save(m, str(dst))
    return dst


def test_int8_keeps_the_head_post_processing_float(fp32_onnx, calib, held_out, tmp_path):
    """One per-tensor UINT8 scale over logits spanning -300..+1 (step ~1.2) left the sigmoid two
    or three output values (demo T @ 256: AP 0.406 -> 0.271); the head's post-processing (and
    the class Convs' outputs) now stay float and the INT8 scores follow FP32."""
    wide = _wide_logits(fp32_onnx, tmp_path / "wide.onnx")
    q = int8.quantize_onnx(wide, tmp_path / "wide_int8.onnx", calib, quiet=True)
    for (s_f, b_f), (s_q, b_q) in zip(qs.run_onnx(str(wide), held_out), qs.run_onnx(str(q), held_out)):
        assert np.ptp(s_f[..., 1:]) > 0.02                    # scores that depend on the image
        assert len(np.unique(s_q.round(6))) > 0.5 * len(np.unique(s_f.round(6))) > 50
        assert np.abs(s_q - s_f).max() < 0.01                 # (all INT8: 0.02-0.03)
    model = onnx.load(str(q))
    producer = {o: n for n in model.graph.node for o in n.output}
    tail = set(int8.post_processing_nodes(onnx.load(str(fp32_onnx))))
    assert {n.op_type for n in model.graph.node if n.name in tail} >= {"Sigmoid", "Concat",
                                                                       "Reshape", "Softmax"}
    path, stack = [], ["scores"]            # from the scores back to the class Convs: all float
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.op_type != "Conv":
            path.append(node)
            stack.extend(node.input)
    assert path and all(n.name in tail for n in path), [(n.op_type, n.name) for n in path]
    assert json.loads({p.key: p.value for p in model.metadata_props}["float_post_processing"])


def _cli(capsys, *args):
    """``damo-jax export int8 ARGS`` in this process: (exit code, stderr)."""
    try:
        int8.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def e2e_onnx(deploy_model, fp32_onnx):
    from damo_jax.export import onnx_utils, to_onnx
    model = to_onnx.export_onnx(deploy_model, batch=1,
                                end2end_cfg=dict(topk=100, conf_thre=0.05, iou_thre=0.65))
    return onnx_utils.save(model, fp32_onnx.with_name("demo_e2e.onnx"))


def _variant(fp32_onnx, dst, *, outputs=None, metadata=True):
    m = onnx.load(str(fp32_onnx))
    for old, new in (outputs or {}).items():
        from damo_jax.export import onnx_utils
        onnx_utils.rename_value(m, old, new)
    if not metadata:
        del m.metadata_props[:]
    onnx.save(m, str(dst))
    return dst


def test_cli_int8_refuses_unusable_onnx_before_writing(fp32_onnx, e2e_onnx, tmp_path, capsys):
    """An end2end export, a foreign file (the official DAMO-YOLO ONNX: outputs output / 791) or a
    class count other than the config's: one error line naming --onnx, exit 2, nothing written
    (INT8 files of them were written and then refused by predict / eval / the report)."""
    foreign = _variant(fp32_onnx, tmp_path / "foreign.onnx", outputs={"scores": "output",
                                                                     "boxes": "791"}, metadata=False)
    bare = _variant(fp32_onnx, tmp_path / "bare.onnx", metadata=False)     # 6 classes, no names
    cases = [(e2e_onnx, ["--config", "demo_ns"], ["end2end"]),
             (foreign, ["--config", "demo_ns"], ["'output', '791'"]),
             (bare, ["--config", "t"], ["6 classes", "80"]),          # t: the 80 COCO classes
             (fp32_onnx, ["--config", "t"], ["6 classes", "80"]),     # its metadata: 6 names
             (e2e_onnx, [], ["end2end"])]                             # (no --config either)
    for k, (path, config, reason) in enumerate(cases):
        out = tmp_path / f"out{k}"
        code, err = _cli(capsys, "--onnx", path, *config, "--calib-data", f"demo:{SIZE}",
                         "--calib-images", 2, "--format", "onnx", "--no-report", "--output-dir", out)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1, err
        assert f"--onnx {path}" in lines[0] and all(r in lines[0] for r in reason), lines[0]
        assert "Traceback" not in err and "calibration:" not in err
        assert not out.exists()


def test_cli_int8_config_from_onnx_metadata(fp32_onnx, tmp_path, capsys):
    """``export int8 --onnx FILE`` without --config: the file's export metadata gives the class
    names and thresholds (as ``predict`` / ``eval --onnx``); the report scores every file."""
    out = tmp_path / "meta"
    result = int8.main(["--onnx", str(fp32_onnx), "--calib-data", f"demo:{SIZE}",
                        "--calib-images", "2", "--format", "onnx", "--report-rounds", "1",
                        "--output-dir", str(out)])
    assert set(result["files"]) == {"onnx fp32", "onnx int8"}
    assert (out / f"{fp32_onnx.stem}_int8.onnx").is_file()
    saved = json.loads((out / "int8_report.json").read_text())
    assert all(stats["images_scored"] == 100 for stats in saved["accuracy"].values())
    assert "warnings" in saved


def test_report_warns_on_a_large_ap_loss(caplog):
    from damo_jax.export import quant_report
    accuracy = {"onnx fp32": {"AP": 0.406, "AP50": 0.56}, "onnx int8": {"AP": 0.271, "AP50": 0.42},
                "openvino fp32": {"AP": 0.406, "AP50": 0.56},
                "openvino int8": {"AP": 0.399, "AP50": 0.56}}
    warnings = quant_report.accuracy_warnings(accuracy)
    assert len(warnings) == 1 and warnings[0].startswith("onnx int8: AP 0.2710 vs 0.4060")
    assert quant_report.AP_DROP_WARN == 0.05
    assert quant_report.accuracy_warnings(accuracy, threshold=0.2) == []
    md = quant_report.format_markdown({
        "model": "m", "calibration": "c", "evaluation": "e", "float_layers": [], "cpu": "cpu",
        "load_before": "0", "load_after": "0", "rounds": 1, "files": {k: k for k in accuracy},
        "accuracy": accuracy, "latency": {"1": {}}, "warnings": warnings})
    assert "**Warning**: onnx int8: AP 0.2710" in md


def test_a_failed_int8_write_is_one_error_and_leaves_nothing(fp32_onnx, calib, tmp_path, monkeypatch):
    """A full disk during ``export int8`` gave a traceback from onnx / OpenVINO (the QDQ file was
    saved with a plain ``onnx.save`` over the file onnxruntime had written, the IR straight to its
    name): now one :class:`OutputWriteError` naming the output and the reason, and no partial or
    temporary file left in the folder."""
    import errno
    import re

    from damo_jax.errors import OutputWriteError
    from damo_jax.inference.backends import import_openvino

    def disk_full(model, name, *args, **kwargs):
        with open(name, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(name))
    out = tmp_path / "q.onnx"
    with monkeypatch.context() as m:
        m.setattr(onnx, "save_model", disk_full)
        with pytest.raises(OutputWriteError, match=rf"^cannot write {re.escape(str(out))}: No space "
                                                   rf"left on device \(errno 28\)$"):
            int8.quantize_onnx(fp32_onnx, out, calib[:2], quiet=True)
    assert not list(tmp_path.iterdir())

    from damo_jax.export import to_openvino
    xml = to_openvino.convert(fp32_onnx, tmp_path / "fp32" / "m.xml")
    ov = import_openvino()

    def cannot_write(model, name, **kwargs):
        Path(name).write_text("<partial")
        raise RuntimeError(f"Can't open bin file: \"{Path(name).with_suffix('.bin')}\"")
    monkeypatch.setattr(ov, "save_model", cannot_write)
    q = tmp_path / "q" / "m_int8.xml"
    with pytest.raises(OutputWriteError, match=rf"^cannot write {re.escape(str(q))}: Can't open bin "):
        int8.quantize_openvino(xml, q, calib[:2])
    assert not list((tmp_path / "q").iterdir())
