"""Distillation demo teacher: the README demo itself (DAMO-YOLO-T, ``configs/demo.py``); the
student is DAMO-YOLO-Ns with the same recipe (``configs/demo_ns.py``). See docs/DISTILL.md and
docs/BENCHMARKS.md ("Distillation")::

    python -m damo_jax.train --config demo_teacher --workdir runs/demo_teacher
    python -m damo_jax.train --config demo_ns --config.train.epochs=8 --workdir runs/student_alone
    python -m damo_jax.train --config demo_ns --config.train.epochs=8 --workdir runs/student_distilled \\
        --teacher-weights runs/demo_teacher

Measured 2026-12-02 (AMD EPYC 2 cores, AVX2): AP50 on the demo val split after epochs 1..7
0.011 / 0.051 / 0.236 / 0.335 / 0.398 / 0.417 / 0.425 (AP 0.292), 18 min 5 s wall (compile 93 s,
in-process; the last 3 min shared the two cores with a test run).
"""
from damo_jax.config import load_config


def get_config():
    return load_config("demo")
