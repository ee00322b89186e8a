"""Batch-1 CPU latency of the exported models vs JAX, plus ONNX graph statistics.

    python benchmarks/export_latency.py --models t@640 ns@416 --threads 2 --out docs/bench_export.md

For every model: random official-init weights (latency does not depend on the values), fused
deploy graph, then
* JAX ``jit`` of the library's deploy model (XLA CPU; XLA's own thread pool over all cores in
  every row; the config's default depthwise formulation; 3x3 convs in oneDNN on a one-device CPU),
* onnxruntime on the jax2onnx file as converted (literal), on the cleaned jax2onnx file (the
  default export) and on the TFLite-route file (``--skip-tf`` to leave it out),
* OpenVINO on the IR with FP32 weights and with FP16 weights (both compiled with
  ``INFERENCE_PRECISION_HINT=f32``) and on the FP32 IR with the CPU's default precision (bf16 on
  AMX/AVX512-BF16 CPUs),
* the OFFICIAL exports of ``--official-dir`` (``T_640_post.onnx``, ``Ns_416_post.onnx``: official
  converter, NMS off, onnxsim) in onnxruntime and in OpenVINO (f32), in the same process.
Timing: ``--warmup`` runs, then ``--rounds`` interleaved rounds of ``--runs`` runs per runtime; the
reported value is the median of the round medians. Because every round times ours and the official
file back to back, the ratio ours / official is computed PER ROUND (same load) and reported as the
median and [min, max] over rounds; a goal counts as met only when the worst round meets it.
Writes a markdown report (``--out``).
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

from damo_jax.runtime import cpu_model  # noqa: E402

# ANCHORS.md: official ONNX (simplified, raw outputs) in onnxruntime, per thread count
OFFICIAL_ORT_MS = {2: {"t@640": 117.0, "s@640": 224.0, "ns@416": 25.0, "nm@416": 42.0},
                   1: {"t@640": 232.0, "s@640": 497.0, "ns@416": 39.0, "nm@416": 74.0}}
OFFICIAL_FILES = {"t@640": "T_640_post.onnx", "ns@416": "Ns_416_post.onnx"}
OFFICIAL_ORT = "official ONNX, onnxruntime"
OFFICIAL_OV = "official ONNX, OpenVINO f32"
# goals (issue / ANCHORS): ours / official at most this, per runtime row
GOALS = {"onnxruntime, jax2onnx (default)": (OFFICIAL_ORT, 0.9),
         "OpenVINO IR FP32, f32": (OFFICIAL_ORT, 0.8)}


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
    from damo_jax.inference.backends import import_openvino
    ov = import_openvino()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def jax_runner(dm, name):
    """The library's own JAX path: the deploy model built from the unmodified config (its default
    depthwise / 1x1 formulations and, on a one-device CPU, its 3x3 convs in oneDNN
    (``model.dense_impl``), unlike the export trace, which forces XLA's grouped / plain convs)."""
    import dataclasses

    import jax

    from damo_jax.models import build_model
    from damo_jax.export import common
    library_dm = dataclasses.replace(dm, model=build_model(name, deploy=True))
    fn = jax.jit(common.raw_fn(library_dm))
    return lambda x: jax.block_until_ready(fn(x))


def time_runners(runners: dict, x, *, warmup, runs, rounds, per_round=None) -> dict:
    """{key: (wall median, wall min, wall max, cpu median)} over round medians, in ms, from the
    library's interleaved timer (:func:`damo_jax.export.quant_report.time_interleaved`).

    CPU time (``time.process_time``, all threads of this process) is reported next to wall time:
    on a shared machine wall time mostly measures the other jobs, CPU time much less so.
    ``per_round`` (optional dict) receives ``{key: [round medians of wall ms]}`` and
    ``{("cpu", key): [...]}`` for per-round ratios."""
    from damo_jax.export.quant_report import time_interleaved
    timings = time_interleaved(runners, x, warmup=warmup, runs=runs, rounds=rounds)
    if per_round is not None:
        per_round.update({k: v["wall"] for k, v in timings.items()})
        per_round.update({("cpu", k): v["cpu"] for k, v in timings.items()})
    return {k: (statistics.median(v["wall"]), min(v["wall"]), max(v["wall"]),
                statistics.median(v["cpu"])) for k, v in timings.items()}


def export_files(name, size, workdir: Path, skip_tf: bool, skip_literal=False, skip_fp16=False):
    """Export the model every way; returns (DeployModel, {label: (path, graph summary)})."""
    from damo_jax.export import common, onnx_utils, to_onnx, to_openvino
    dm = common.load_deploy_model(name, image_size=(size, size))
    files = {}
    routes = (("jax2onnx literal", False), ("jax2onnx (default)", True))
    for label, optimize in routes[1:] if skip_literal else routes:
        model = to_onnx.export_onnx(dm, batch=1, optimize=optimize)
        path = onnx_utils.save(model, workdir / f"{name}_{'opt' if optimize else 'raw'}.onnx")
        files[label] = (path, onnx_utils.graph_summary(model))
    if not skip_tf:
        model = to_onnx.export_onnx(dm, via="tf", batch=1, tf_dir=workdir / f"{name}_tf")
        files["TFLite route"] = (onnx_utils.save(model, workdir / f"{name}_tf.onnx"),
                                 onnx_utils.graph_summary(model))
    default = files["jax2onnx (default)"][0]
    files["IR FP32"] = (to_openvino.convert(default, workdir / f"{name}.xml"), None)
    if not skip_fp16:
        files["IR FP16"] = (to_openvino.convert(default, workdir / f"{name}_fp16.xml", fp16=True),
                            None)
    return dm, files


def official_file(spec: str, directory):
    """Path of the official export for ``spec`` (e.g. t@640) in ``directory``, or None."""
    if not directory or spec not in OFFICIAL_FILES:
        return None
    path = Path(directory) / OFFICIAL_FILES[spec]
    return path if path.is_file() else None


def make_runners(dm, name, files, threads, args, official=None):
    """Runners in interleaving order; the official file's rows sit next to ours."""
    runners = {} if args.skip_jax else {"JAX jit (XLA CPU)": jax_runner(dm, name)}
    if official is not None:
        runners[OFFICIAL_ORT] = ort_runner(official, threads)
    for label in ("jax2onnx literal", "jax2onnx (default)", "TFLite route"):
        if label in files:
            runners[f"onnxruntime, {label}"] = ort_runner(files[label][0], threads)
    if official is not None:
        runners[OFFICIAL_OV] = ov_runner(official, threads, "f32")
    runners["OpenVINO IR FP32, f32"] = ov_runner(files["IR FP32"][0], threads, "f32")
    if "IR FP16" in files:
        runners["OpenVINO IR FP16, f32"] = ov_runner(files["IR FP16"][0], threads, "f32")
    if not args.skip_bf16:
        runners["OpenVINO IR FP32, CPU default (bf16)"] = ov_runner(files["IR FP32"][0], threads,
                                                                    None)
    return runners


def round_ratios(per_round: dict, key: str, ref: str):
    """(median, min, max) over rounds of ours / reference, each round's medians side by side."""
    if key not in per_round or ref not in per_round:
        return None
    ratios = [a / b for a, b in zip(per_round[key], per_round[ref])]
    return statistics.median(ratios), min(ratios), max(ratios)


def bench_model(spec, args, workdir):
    """[(threads, rows)] for one model; rows = (runtime, wall, lo, hi, cpu, graph summary,
    per-round ratio vs the official ORT file, per-round ratio vs the official file in OpenVINO)."""
    name, size = parse_model(spec)
    key_name = f"{name}@{size}"
    official = official_file(key_name, args.official_dir)
    if official is None:
        print(f"no official export for {key_name} in {args.official_dir}: no side-by-side rows")
    dm, files = export_files(name, size, workdir, args.skip_tf, args.skip_literal, args.skip_fp16)
    x = np.random.default_rng(0).uniform(0, 255, (1, 3, size, size)).astype(np.float32)
    out = []
    for threads in args.threads:
        per_round = {}
        timings = time_runners(make_runners(dm, name, files, threads, args, official), x,
                               warmup=args.warmup, runs=args.runs, rounds=args.rounds,
                               per_round=per_round)
        rows = []
        for key, (med, lo, hi, cpu) in timings.items():
            label = key.split(", ", 1)[1] if key.startswith("onnxruntime, ") else None
            rows.append((key, med, lo, hi, cpu, files[label][1] if label in files else None,
                         round_ratios(per_round, key, OFFICIAL_ORT),
                         round_ratios(per_round, key, OFFICIAL_OV),
                         round_ratios(per_round, ("cpu", key), ("cpu", OFFICIAL_ORT))))
        out.append((threads, rows))
    return key_name, out


def _ratio_text(r):
    return "-" if r is None else f"{r[0]:.2f}x [{r[1]:.2f}, {r[2]:.2f}]"


def goal_lines(results) -> list[str]:
    """The goal verdicts: met only when the WORST round's side-by-side ratio meets the goal."""
    lines = ["## Goals, side by side with the official export (per-round ratios)", "",
             "| model | threads | ours | vs | wall ratio, median [min, max] over rounds | "
             "CPU-time ratio | goal | met? (wall, worst round) |",
             "|---|---|---|---|---|---|---|---|"]
    for model, per_threads in results:
        for threads, rows in per_threads:
            by_key = {row[0]: row for row in rows}
            for key, (ref, goal) in GOALS.items():
                if key not in by_key:
                    continue
                r = by_key[key][6]
                if r is None:
                    continue
                verdict = ("yes" if r[2] <= goal else
                           "no" if r[1] > goal else "not beyond the noise")
                lines.append(f"| {model} | {threads} | {key} | {ref} | {_ratio_text(r)} | "
                             f"{_ratio_text(by_key[key][8])} | <= {goal}x | {verdict} |")
    return lines + [""]


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
             "over-states the work. JAX always uses XLA's own thread pool. The side-by-side ratios "
             "divide each round's median by the official file's median of the SAME round.",
             f"CPU: {cpu_model()}.", ""]
    lines += goal_lines(results)
    for model, per_threads in results:
        for threads, rows in per_threads:
            anchor = OFFICIAL_ORT_MS.get(threads, {}).get(model)
            lines += [f"## {model}, {threads} thread(s)", "",
                      "| runtime / graph | wall ms | [min, max] | CPU ms | vs official ORT, "
                      "per round | vs official OpenVINO f32, per round | nodes | Transpose | Conv |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for key, med, lo, hi, cpu, summary, r_ort, r_ov, _ in rows:
                stats = (f"{summary['nodes']} | {summary['transposes']} | {summary['convs']}"
                         if summary else "- | - | -")
                lines.append(f"| {key} | {med:.1f} | [{lo:.1f}, {hi:.1f}] | {cpu:.1f} | "
                             f"{_ratio_text(r_ort)} | {_ratio_text(r_ov)} | {stats} |")
            if anchor:
                lines.append(f"\n(ANCHORS.md, official ONNX in onnxruntime, {threads} thread(s), "
                             f"other day: {anchor} ms; not used for the verdicts.)")
            lines.append("")
    return "\n".join(lines)


def load_text() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def bench_all(specs, bench, render, out):
    """``bench(spec, workdir)`` for every spec in one temporary folder; after each, the markdown
    ``render(results, load_before, load_after, elapsed_s)`` is (re)written to ``out`` and printed,
    so a long run that is cut short keeps what it measured."""
    t0, load_before = time.time(), load_text()
    results = []
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            results.append(bench(spec, Path(tmp)))
            text = render(results, load_before, load_text(), time.time() - t0)
            Path(out).write_text(text + "\n")
            print(text, flush=True)
    return results


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
    p.add_argument("--skip-jax", action="store_true", help="leave out the JAX jit row")
    p.add_argument("--skip-literal", action="store_true", help="leave out the literal jax2onnx row")
    p.add_argument("--skip-fp16", action="store_true", help="leave out the FP16-weight IR row")
    p.add_argument("--skip-bf16", action="store_true", help="leave out the OpenVINO bf16 row")
    p.add_argument("--official-dir", default=str(Path(__file__).resolve().parents[2] / "shared"
                                                 / "reference" / "official_onnx"),
                   help="folder with the official exports (T_640_post.onnx, Ns_416_post.onnx)")
    p.add_argument("--out", default="docs/bench_export.md")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    from damo_jax.export.common import setup_logging
    setup_logging()
    bench_all(args.models, lambda spec, workdir: bench_model(spec, args, workdir),
              lambda results, *times: report(results, args, *times), args.out)


if __name__ == "__main__":
    main()
