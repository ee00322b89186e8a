"""Distillation demo teacher: DAMO-YOLO-Nm with the README demo's data/schedule settings, trained
longer (5 epochs = 500 steps of batch 8 at 256x256) so it is ahead of the demo student (Ns, 300
steps). See docs/DISTILL.md::

    python -m damo_jax.train --config demo_teacher --workdir runs/demo_teacher
    python -m damo_jax.train --config demo --workdir runs/demo_distill \\
        --config.distill.teacher=nm --config.distill.teacher_weights=runs/demo_teacher
"""
from damo_jax.config import load_config


def get_config():
    c = load_config("demo")
    teacher = load_config("nm")
    c.model = teacher.model
    c.train.epochs = 5
    c.train.eval_every_epochs = 5      # the teacher is evaluated once, at the end
    c.train.eval_every_epochs_tail = 5
    return c
