"""INT8 vs FP32 batch-1 CPU latency (onnxruntime QDQ, OpenVINO NNCF), with and without the
mixed-precision option; every file timed interleaved in one process at each thread count.

    python benchmarks/int8.py --models t@640 ns@416 --threads 1 2 --mixed 4 --out /tmp/int8_bench.md

Weights: random official init (latency does not depend on the values); calibration images: the
demo set at the model's size (``demo:<size>``). The mixed model's float layers are ranked by the
measured sensitivity (:mod:`damo_jax.export.quant_sensitivity`) over ``--candidates`` Convs
(default: all). For mAP use ``damo-jax export int8 --checkpoint RUN`` (report with mAP).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def bench_model(spec: str, args, workdir: Path) -> dict:
    from damo_jax.export import common, int8, onnx_utils, quant_report, quant_sensitivity, to_onnx
    name, _, size = spec.partition("@")
    size = int(size or 640)
    dm = common.load_deploy_model(name, image_size=(size, size))
    fp32 = onnx_utils.save(to_onnx.export_onnx(dm, batch=1), workdir / f"{name}{size}.onnx")
    images = int8.calibration_images(f"demo:{size}", "train", (size, size), args.calib_images)
    candidates = None
    if args.candidates:
        import onnx
        convs = quant_sensitivity.conv_names(onnx.load(str(fp32)))
        candidates = convs[:args.candidates // 2] + convs[-(args.candidates - args.candidates // 2):]
    t0 = time.time()
    result = int8.export_int8(fp32, workdir / name, images, mixed=args.mixed, candidates=candidates)
    quant_time = time.time() - t0
    latency = quant_report.measure_latency(result["files"], (size, size), args.threads,
                                           runs=args.runs, rounds=args.rounds)
    return {"spec": spec, "latency": latency, "float_layers": result["float_layers"],
            "quant_s": quant_time, "calib": len(images)}


def report(results, args, load_before, load_after, elapsed) -> str:
    from damo_jax.runtime import cpu_model
    lines = ["## INT8 vs FP32 latency (batch 1, CPU)", "",
             f"Command: `python benchmarks/int8.py {' '.join(args.argv)}`", "",
             f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average (1/5/15 min) before "
             f"{load_before}, after {load_after}; total {elapsed:.0f} s. Median of {args.rounds} "
             f"interleaved rounds x {args.runs} runs; [min, max] over rounds. ×FP32 = per-round "
             "ratio to the FP32 file of the same runtime (same round, same load).", ""]
    for r in results:
        lines += [f"### {r['spec']} (calibration {r['calib']} demo images; mixed keeps "
                  f"{len(r['float_layers'])} Convs float: {', '.join(r['float_layers']) or '-'}; "
                  f"quantisation + sensitivity {r['quant_s']:.0f} s)", "",
                  "| file | threads | wall ms [min, max] | CPU ms | ×FP32 [min, max] |",
                  "|---|---|---|---|---|"]
        for t, rows in r["latency"].items():
            for label, v in rows.items():
                w, c, x = v["wall"], v["cpu"], v["vs_fp32"]
                ratio = f"{x['median']:.2f} [{x['min']:.2f}, {x['max']:.2f}]" if x else "-"
                lines.append(f"| {label} | {t} | {w['median']:.1f} [{w['min']:.1f}, "
                             f"{w['max']:.1f}] | {c['median']:.1f} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["t@640", "ns@416"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--calib-images", type=int, default=16)
    p.add_argument("--mixed", type=int, default=4, help="Convs kept float in the mixed model")
    p.add_argument("--candidates", type=int, default=0,
                   help="measure only this many Convs (first/last halves; 0 = all)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="int8_bench.md")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    from damo_jax.export.common import setup_logging
    setup_logging()
    from export_latency import bench_all  # benchmarks/ is on sys.path when run as a script
    bench_all(args.models, lambda spec, workdir: bench_model(spec, args, workdir),
              lambda results, *times: report(results, args, *times), args.out)


if __name__ == "__main__":
    main()
