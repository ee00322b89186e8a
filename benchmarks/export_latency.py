"""Batch-1 CPU latency of the exported models vs JAX, plus ONNX graph statistics.

    python benchmarks/export_latency.py --models t@640 ns@416 --threads 2 --out docs/bench_export.md

For every model: random official-init weights (latency does not depend on the values), fused
deploy graph, then
* JAX ``jit`` of the library's deploy model (XLA CPU; XLA's own thread pool over all cores in
  every row; the config's default depthwise formulation),
* onnxruntime on the jax2onnx file as converted (literal), on the cleaned jax2onnx file (the
  default export) and on the TFLite-route file (``--skip-tf`` to leave it out),
* OpenVINO on the IR with FP32 weights and with FP16 weights (both compiled with
  ``INFERENCE_PRECISION_HINT=f32``) and on the FP32 IR with the CPU's default precision (bf16 on
  AMX/AVX512-BF16 CPUs).
Timing: ``--warmup`` runs, then ``--rounds`` interleaved rounds of ``--runs`` runs per runtime; the
reported value is the median of the round medians. Writes a markdown report (``--out``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

# ANCHORS.md: official ONNX (simplified, raw outputs) in onnxruntime, per thread count
OFFICIAL_ORT_MS = {2: {"t@640": 117.0, "s@640": 224.0, "ns@416": 25.0, "nm@416": 42.0},
                   1: {"t@640": 232.0, "s@640": 497.0, "ns@416": 39.0, "nm@416": 74.0}}


def parse_model(text):
    name, _, size = text.partition("@")
    return name.lower(), int(size or 640)


def ort_runner(path, threads):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x})


def ov_runner(path, threads, precision):
    import openvino as ov
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def jax_runner(dm, name):
    """The library's own JAX path: the deploy model built from the unmodified config (its default
    depthwise formulation, unlike the export trace which forces grouped convs)."""
    import dataclasses

    import jax

    from damo_jax.models import build_model
    from damo_jax.export import common
    library_dm = dataclasses.replace(dm, model=build_model(name, deploy=True))
    fn = jax.jit(common.raw_fn(library_dm))
    return lambda x: jax.block_until_ready(fn(x))


def time_runners(runners: dict, x, *, warmup, runs, rounds) -> dict:
    """{key: (wall median, wall min, wall max, cpu median)} over round medians, in ms.

    CPU time (``time.process_time``, all threads of this process) is reported next to wall time:
    on a shared machine wall time mostly measures the other jobs, CPU time much less so."""
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    wall = {k: [] for k in runners}
    cpu = {k: [] for k in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            w, c = [], []
            for _ in range(runs):
                t0, c0 = time.perf_counter(), time.process_time()
                run(x)
                w.append((time.perf_counter() - t0) * 1e3)
                c.append((time.process_time() - c0) * 1e3)
            wall[key].append(statistics.median(w))
            cpu[key].append(statistics.median(c))
    return {k: (statistics.median(wall[k]), min(wall[k]), max(wall[k]), statistics.median(cpu[k]))
            for k in runners}


def export_files(name, size, workdir: Path, skip_tf: bool):
    """Export the model every way; returns (DeployModel, {label: (path, graph summary)})."""
    from damo_jax.export import common, onnx_utils, to_onnx, to_openvino
    dm = common.load_deploy_model(name, image_size=(size, size))
    files = {}
    for label, optimize in (("jax2onnx literal", False), ("jax2onnx (default)", True)):
        model = to_onnx.export_onnx(dm, batch=1, optimize=optimize)
        path = onnx_utils.save(model, workdir / f"{name}_{'opt' if optimize else 'raw'}.onnx")
        files[label] = (path, onnx_utils.graph_summary(model))
    if not skip_tf:
        model = to_onnx.export_onnx(dm, via="tf", batch=1, tf_dir=workdir / f"{name}_tf")
        files["TFLite route"] = (onnx_utils.save(model, workdir / f"{name}_tf.onnx"),
                                 onnx_utils.graph_summary(model))
    default = files["jax2onnx (default)"][0]
    files["IR FP32"] = (to_openvino.convert(default, workdir / f"{name}.xml"), None)
    files["IR FP16"] = (to_openvino.convert(default, workdir / f"{name}_fp16.xml", fp16=True), None)
    return dm, files


def make_runners(dm, name, files, threads):
    runners = {"JAX jit (XLA CPU)": jax_runner(dm, name)}
    for label in ("jax2onnx literal", "jax2onnx (default)", "TFLite route"):
        if label in files:
            runners[f"onnxruntime, {label}"] = ort_runner(files[label][0], threads)
    runners["OpenVINO IR FP32, f32"] = ov_runner(files["IR FP32"][0], threads, "f32")
    runners["OpenVINO IR FP16, f32"] = ov_runner(files["IR FP16"][0], threads, "f32")
    runners["OpenVINO IR FP32, CPU default (bf16)"] = ov_runner(files["IR FP32"][0], threads, None)
    return runners


def bench_model(spec, args, workdir):
    """[(threads, rows)] for one model; rows = (runtime, wall, lo, hi, cpu, graph summary)."""
    name, size = parse_model(spec)
    dm, files = export_files(name, size, workdir, args.skip_tf)
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, size, size)).astype(np.float32)
    out = []
    for threads in args.threads:
        timings = time_runners(make_runners(dm, name, files, threads), x, warmup=args.warmup,
                               runs=args.runs, rounds=args.rounds)
        rows = []
        for key, (med, lo, hi, cpu) in timings.items():
            label = key.split(", ", 1)[1] if key.startswith("onnxruntime, ") else None
            rows.append((key, med, lo, hi, cpu, files[label][1] if label else None))
        out.append((threads, rows))
    return f"{name}@{size}", out


def report(results, args, load_before, load_after, elapsed) -> str:
    lines = ["# Export latency (batch 1, CPU)", "",
             f"Command: `python benchmarks/export_latency.py {' '.join(args.argv)}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
             f"load average (1/5/15 min) before {load_before}, after {load_after}. "
             f"Median of {args.rounds} interleaved rounds x {args.runs} runs after {args.warmup} "
             f"warm-up runs; [min, max] of the round medians. CPU = process CPU time per inference "
             f"(all threads), less sensitive to other jobs than wall time. Total {elapsed:.0f} s.",
             "",
             "How to read: the official numbers were taken on an idle machine of this kind. On a "
             "shared machine wall time measures the other jobs as much as the model; with 1 thread "
             "the process CPU time per inference is the better estimate of idle wall time. With 2 "
             "threads CPU time also counts onnxruntime/OpenVINO worker threads spin-waiting, so it "
             "over-states the work. JAX always uses XLA's own thread pool.", ""]
    for model, per_threads in results:
        for threads, rows in per_threads:
            official = OFFICIAL_ORT_MS.get(threads, {}).get(model)
            lines += [f"## {model}, {threads} thread(s)", "",
                      "| runtime / graph | wall ms | [min, max] | CPU ms | wall vs official ORT | "
                      "nodes | Transpose | Conv |", "|---|---|---|---|---|---|---|---|"]
            for key, med, lo, hi, cpu, summary in rows:
                ratio = f"{med / official:.2f}x" if official else "-"
                stats = (f"{summary['nodes']} | {summary['transposes']} | {summary['convs']}"
                         if summary else "- | - | -")
                lines.append(f"| {key} | {med:.1f} | [{lo:.1f}, {hi:.1f}] | {cpu:.1f} | {ratio} | "
                             f"{stats} |")
            if official:
                lines.append(f"\nOfficial ONNX in onnxruntime, {threads} thread(s), idle machine "
                             f"(ANCHORS.md): {official} ms; goal ORT <= {0.9 * official:.1f} ms, "
                             f"OpenVINO FP32 <= {0.8 * official:.1f} ms.")
            lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["t@640", "ns@416"],
                   help="model@size entries (default: t@640 ns@416)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts to measure (default 1 2)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-tf", action="store_true", help="leave out the TFLite route")
    p.add_argument("--out", default="docs/bench_export.md")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    from damo_jax.export.common import setup_logging
    setup_logging()
    t0 = time.time()
    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            results.append(bench_model(spec, args, Path(tmp)))
    load_after = " ".join(f"{v:.1f}" for v in os.getloadavg())
    text = report(results, args, load_before, load_after, time.time() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
