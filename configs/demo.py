"""README demo: DAMO-YOLO-Ns trained from scratch on the bundled demo set at 320×320, CPU-sized.

    python -m damo_jax.train --config demo --workdir runs/demo

About 10 minutes on a 2-core CPU: trains, evaluates the EMA weights on the demo val split, writes
``runs/demo/curves.png`` and ``runs/demo/predictions.png``. Measured result: see docs/bench_train.md
(target mAP@0.5 ≥ 0.5 on the demo val split within 15 minutes of wall time).

Differences from the official Ns recipe (``configs/ns.py``), all for a 10-minute CPU run:
global batch 8 instead of 256, 320×320 input and mosaic canvas instead of 416 / 640, a short
schedule (epochs / warmup / no-aug tail below) and a larger per-image learning rate.
"""
from damo_jax.config import load_config


def get_config():
    c = load_config("ns")
    c.data.train = "demo"
    c.data.image_size = (320, 320)
    c.data.mosaic_size = (320, 320)
    c.data.max_boxes = 32
    c.test.image_size = (320, 320)
    c.test.batch_size = 16
    c.train.batch_size = 8
    c.train.epochs = 6
    c.train.warmup_epochs = 1
    c.train.no_aug_epochs = 1
    c.train.eval_every_epochs = 2
    c.train.eval_every_epochs_tail = 1
    c.train.base_lr_per_img = 0.004 / 64
    c.train.ema_tau = 200.0     # EMA warms up over ~a few hundred steps (official 2000 of ~140k)
    c.train.log_every_steps = 10
    return c
