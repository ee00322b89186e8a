"""The INT8 accuracy report: what you ship is what you measured.

For every exported file (``onnx fp32``, ``onnx int8``, ``onnx int8 mixed``, ``openvino fp32``, ...):

* COCO mAP on the report split through the evaluation path of exported files
  (:func:`damo_jax.inference.loading.load_model` with ``onnx=`` / ``openvino=``, then
  :func:`damo_jax.evaluation.evaluator.evaluate_backend`: the same pre-processing, NMS and COCO
  protocol as ``damo-jax eval --onnx/--openvino``);
* batch-1 latency on this CPU at 1 and 2 threads, every file timed INTERLEAVED in one process
  (:func:`time_interleaved`: rounds of ``runs`` calls per file, file after file), so each round's
  ratio INT8 / FP32 is taken under the same machine load; reported as the median and [min, max]
  over rounds. OpenVINO files run with ``INFERENCE_PRECISION_HINT=f32`` (no bf16 on the float parts).

Writes ``int8_report.json`` and ``int8_report.md`` (with the load average and CPU model). An INT8
file that loses more than :data:`AP_DROP_WARN` AP against its FP32 file is logged as a warning and
listed under ``warnings`` in both (a loss to look into — more or other calibration images,
``--mixed K`` — not an error: the files are written).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from damo_jax.runtime import cpu_model

log = logging.getLogger("damo_jax.export")

#: absolute AP loss of an INT8 file against its FP32 file above which the report warns
AP_DROP_WARN = 0.05


def file_runner(path, threads: int) -> Callable:
    """Batch-1 runner ``f(x NCHW float32)`` of an .onnx (onnxruntime) or .xml (OpenVINO) file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()
    compiled = ov.Core().compile_model(str(path), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def time_interleaved(runners: Mapping[str, Callable], x, *, warmup: int = 3, runs: int = 10,
                     rounds: int = 5) -> dict:
    """``{key: {"wall": [round medians ms], "cpu": [round medians ms]}}``; rounds interleave the
    runners (key after key), CPU = process CPU time (all threads)."""
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    out = {k: {"wall": [], "cpu": []} for k in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            wall, cpu = [], []
            for _ in range(runs):
                t0, c0 = time.perf_counter(), time.process_time()
                run(x)
                wall.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
            out[key]["wall"].append(statistics.median(wall))
            out[key]["cpu"].append(statistics.median(cpu))
    return out


def spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def round_ratio(timings: Mapping, key: str, ref: str) -> dict:
    """Per-round wall ratio key / ref -> {median, min, max}."""
    return spread([a / b for a, b in zip(timings[key]["wall"], timings[ref]["wall"])])


def reference_of(label: str) -> str:
    """The FP32 file an INT8 file is compared with (same runtime)."""
    return label.split(" ")[0] + " fp32"


def measure_latency(files: Mapping[str, Path], image_hw, threads: Sequence[int] = (1, 2), *,
                    warmup=3, runs=10, rounds=5) -> dict:
    """``{threads: {label: {"wall": spread, "cpu": spread, "vs_fp32": spread | None}}}``."""
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, *image_hw)).astype(np.float32)
    result = {}
    for t in threads:
        timings = time_interleaved({k: file_runner(p, t) for k, p in files.items()}, x,
                                   warmup=warmup, runs=runs, rounds=rounds)
        result[t] = {}
        for label, tm in timings.items():
            ref = reference_of(label)
            result[t][label] = {"wall": spread(tm["wall"]), "cpu": spread(tm["cpu"]),
                                "vs_fp32": (round_ratio(timings, label, ref)
                                            if ref in timings and ref != label else None)}
    return result


def measure_accuracy(files: Mapping[str, Path], config, dataset, image_hw, *,
                     overrides: Sequence[str] = (), progress=False) -> dict:
    """``{label: COCO stats}`` of every file through the exported-file evaluation path, at the
    files' fixed input size ``image_hw`` (the config's test size is set to it)."""
    from damo_jax.evaluation.evaluator import evaluate_backend
    from damo_jax.inference.loading import load_model
    out = {}
    size = list(overrides) + [f"test.image_size=({int(image_hw[0])}, {int(image_hw[1])})"]
    for label, path in files.items():
        kind = "onnx" if Path(path).suffix == ".onnx" else "openvino"
        loaded = load_model(config, overrides=size, **{kind: str(path)})
        out[label] = evaluate_backend(loaded.backend, dataset, loaded.cfg, progress=progress)
    return out


def accuracy_warnings(accuracy: Mapping, threshold: float = AP_DROP_WARN) -> list[str]:
    """One message per INT8 file whose AP is more than ``threshold`` below its FP32 file's."""
    out = []
    for label, stats in accuracy.items():
        ref = accuracy.get(reference_of(label))
        if label == reference_of(label) or not ref or "AP" not in stats or "AP" not in ref:
            continue
        drop = ref["AP"] - stats["AP"]
        if drop > threshold:
            out.append(f"{label}: AP {stats['AP']:.4f} vs {ref['AP']:.4f} for "
                       f"{reference_of(label)} (-{drop:.4f}, more than {threshold:g} lost); check "
                       f"the calibration data (images like the deployment's, --calib-images) or "
                       f"keep sensitive layers float (--mixed K)")
    return out


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _fmt(s: Mapping | None, unit: str = "") -> str:
    if not s:
        return "-"
    return f"{s['median']:.2f}{unit} [{s['min']:.2f}, {s['max']:.2f}]"


def format_markdown(report: Mapping) -> str:
    threads = sorted(report["latency"], key=int)
    head = ("| file | AP | AP50 | ΔAP vs FP32 | " +
            " | ".join(f"{t} thr ms [min, max] | {t} thr ×FP32 (per round)" for t in threads) + " |")
    lines = [f"# INT8 accuracy report: {report['model']}", "",
             f"Calibration: {report['calibration']}. Evaluation: {report['evaluation']}. "
             f"Float layers (mixed): {report['float_layers'] or 'none'}.", "",
             f"CPU: {report['cpu']}, {os.cpu_count()} cores; load average before "
             f"{report['load_before']}, after {report['load_after']}. Latency: batch 1, median of "
             f"{report['rounds']} interleaved rounds (all files, one process).", "",
             head, "|---|---|---|---|" + "---|---|" * len(threads)]
    warnings = [f"**Warning**: {w}" for w in report.get("warnings", ())]
    if warnings:
        lines[-2:-2] = [*warnings, ""]
    for label in report["files"]:
        acc = report["accuracy"].get(label, {})
        ref = report["accuracy"].get(reference_of(label), {})
        delta = (f"{acc['AP'] - ref['AP']:+.4f}" if acc and ref and label != reference_of(label)
                 else "-")
        cells = []
        for t in threads:
            lat = report["latency"][t].get(label)
            cells += [_fmt(lat and lat["wall"]), _fmt(lat and lat["vs_fp32"], "×")]
        ap = f"{acc['AP']:.4f} | {acc['AP50']:.4f}" if acc else "- | -"
        lines.append(f"| {label} | {ap} | {delta} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir, files: Mapping[str, Path], *, model: str, config, dataset=None,
                 calibration: str, float_layers=(), threads=(1, 2), runs=10, rounds=5,
                 image_hw=None, overrides: Sequence[str] = ()) -> dict:
    """Measure and write ``int8_report.json`` / ``.md`` into ``out_dir``; returns the report.
    ``dataset=None`` skips the mAP part (recorded as such); ``config`` (+ ``overrides``): the
    config / run directory giving class names and test thresholds to the evaluation."""
    load_before = _load()
    if image_hw is None:
        from damo_jax.export.int8 import _input_hw
        image_hw = _input_hw(files["onnx fp32"])
    accuracy = (measure_accuracy(files, config, dataset, image_hw, overrides=overrides)
                if dataset is not None else {})
    latency = measure_latency(files, image_hw, threads, runs=runs, rounds=rounds)
    report = {"model": model, "files": {k: str(v) for k, v in files.items()},
              "calibration": calibration,
              "evaluation": (f"{getattr(dataset, 'name', 'dataset')}, {len(dataset)} images"
                             if dataset is not None else "not run (no report data)"),
              "float_layers": list(float_layers), "accuracy": accuracy,
              "latency": {str(t): v for t, v in latency.items()}, "rounds": rounds,
              "cpu": cpu_model(), "load_before": load_before, "load_after": _load(),
              "warnings": accuracy_warnings(accuracy)}
    for message in report["warnings"]:
        log.warning("INT8 accuracy: %s", message)
    out = Path(out_dir)
    (out / "int8_report.json").write_text(json.dumps(report, indent=1))
    (out / "int8_report.md").write_text(format_markdown(report))
    return report
