"""Distillation demo teacher: the README demo itself (DAMO-YOLO-T, ``configs/demo.py``); the
student is DAMO-YOLO-Ns with the same recipe (``configs/demo_ns.py``). See docs/DISTILL.md and
docs/BENCHMARKS.md ("Distillation")::

    python -m damo_jax.train --config demo_teacher --workdir runs/demo_teacher
    python -m damo_jax.train --config demo_ns --config.train.epochs=8 --workdir runs/student_alone
    python -m damo_jax.train --config demo_ns --config.train.epochs=8 --workdir runs/student_distilled \\
        --teacher-weights runs/demo_teacher

Now 9 epochs with EMA decay 0.99 (the README demo): AP50 after epochs 1..9 0.035 / 0.156 / 0.244 /
0.336 / 0.416 / 0.465 / 0.511 / 0.546 / 0.567 (AP 0.410). With it as the teacher the Ns student
reached AP50 0.375 after 800 steps against 0.401 alone (docs/BENCHMARKS.md "Distillation"). The
first comparison used the 7-epoch, EMA-0.9998 teacher: AP50 0.425 (AP 0.292), 18 min 5 s wall.

The README demo evaluates at 256×256 since 2026-12-03; the teacher keeps the test size of 192 at
which the numbers above (and the student's) were measured. Training is the same either way.
"""
from damo_jax.config import load_config


def get_config():
    c = load_config("demo")
    c.test.image_size = (192, 192)
    return c
