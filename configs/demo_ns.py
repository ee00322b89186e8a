"""The README demo's recipe with DAMO-YOLO-Ns (1.4 M params): the README demo until 2026-12-02,
now the distillation demo's student and the small config the tests build (``configs/demo.py`` is
the same recipe with DAMO-YOLO-T, which learns more per step at the same CPU speed).

    python -m damo_jax.train --config demo_ns --workdir runs/demo_ns

Trains 7 epochs of the 800 demo training images (700 steps of batch 8) at 192×192, evaluating the
EMA weights on the demo val split after every epoch. Measured from a fresh clone (commit 0fbe2e8)
on 2026-12-02, AMD EPYC 2 cores (AVX2), nothing else running, empty caches, update step compiled
in the training process (before ``train.precompile``; that process ran the step at ~6 img/s where a
process loading it from the cache runs 9–12 img/s, docs/bench_train.md §0c):

    epoch      1      2      3      4      5      6      7
    minutes  4.9    7.2    9.4   11.6   14.0   16.8   19.2
    AP50   0.046  0.143  0.234  0.289  0.318  0.331  0.336   (AP 0.219 at the end)

Per-step learning, same seed: AdamW 2e-3 AP50 0.000 / 0.139 / 0.192 / 0.228 / 0.238 / 0.238 after
epochs 1–6; AdamW 4e-3 (this config) for 8 epochs 0.047 / 0.161 / 0.250 / 0.287 / 0.326 / 0.343 /
0.355 / 0.357; AdamW 8e-3 0.065 / 0.148 / 0.222 / 0.284 (epochs 1–4, no better); batch 4 at AdamW
4e-3 0.072 / 0.141 / 0.193 / 0.206 (epochs 1–4: worse per epoch, though 16.5 img/s vs 12).

What differs from the official Ns recipe (``configs/ns.py``), all to learn fast in a few hundred
steps on a CPU (same model, same train and eval code path, same dataset and val split):

* 192×192 input (official 416): the demo objects are 8–55 % of the image side, i.e. ≥ 15 px at
  192 (at 160 DAMO-YOLO-T loses a third of its AP50: 0.251 vs 0.398 after 5 epochs);
* global batch 8 (official 256) and an AdamW lr of 4e-3 (``base_lr_per_img`` = 0.032 / 64; the
  official per-image lr gives 1.25e-4 at batch 8, far too slow for 700 steps), warmup 0.3 epoch,
  cosine to 5 % over 7 epochs, last epoch without augmentation;
* light augmentation: no mosaic, mixup or SADA (they shrink and occlude objects, which helps long
  runs and slows short ones), horizontal flip only;
* EMA ramp ``tau`` = 100 steps (official 2000 of ~140k steps);
* conv kernel gradients as matmuls on CPU (``model.grad_impl = "auto"``, the default).
"""
from damo_jax.config import load_config
from damo_jax.data_pipelines.demo import CLASS_NAMES


def get_config():
    c = load_config("ns")
    c.data.train = "demo"
    c.data.image_size = (192, 192)
    c.data.mosaic_size = (192, 192)
    c.data.mosaic_prob = 0.0
    c.data.mixup_prob = 0.0
    c.data.sada = False
    c.data.flip_prob = 0.5
    c.data.max_boxes = 32
    c.test.image_size = (192, 192)
    c.model.image_size = (192, 192)     # what `damo-jax info --config demo_ns` reports
    c.model.head.num_classes = len(CLASS_NAMES)   # training sets both from the data as well
    c.model.class_names = CLASS_NAMES
    c.test.batch_size = 16
    c.train.batch_size = 8
    c.train.epochs = 7
    c.train.warmup_epochs = 0.3
    c.train.no_aug_epochs = 1
    c.train.eval_every_epochs = 1
    c.train.eval_every_epochs_tail = 1
    c.train.base_lr_per_img = 0.032 / 64     # AdamW lr 4e-3 at batch 8
    c.train.ema_decay = 0.99                 # EMA horizon ~100 steps (1 epoch); official 0.9998
    c.train.ema_tau = 100.0
    c.train.log_every_steps = 10
    return c
