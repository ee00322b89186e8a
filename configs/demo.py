"""README demo: DAMO-YOLO-T trained from scratch on the bundled demo set at 192×192, CPU-sized.

    python -m damo_jax.train --config demo --workdir runs/demo

The recipe of ``configs/demo_ns.py`` (192×192, batch 8, AdamW 4e-3, flip only, EMA evaluated on the
demo val split after every epoch; its docstring lists every deviation from the official recipe and
why) with DAMO-YOLO-T (8.5 M params) instead of Ns and 9 epochs (900 steps): on this CPU the two
models run at the same speed (11–14 img/s with the step loaded from the compilation cache, AMD EPYC
AVX2) and T learns more per step (AP50 0.425 vs 0.336 after 7 epochs, same seed). Writes
``runs/demo/curves.png`` and ``runs/demo/predictions.png``.

Target: AP50 ≥ 0.5 within 10 minutes of training wall time on a 2-core CPU — **NOT reached**.

Measured from a fresh clone (commit 1c35081) with README command 1 on 2026-12-02 10:03, AMD EPYC
2 cores (AVX2), nothing else running, empty caches (``DAMO_JAX_CACHE`` pointed at a new folder: the
demo images are generated and the update step compiled, in a child process — 53 s, then loaded in
18 s, ``train.precompile``); minutes from the command's start, AP50 of the EMA weights on the val
split:

    epoch      1      2      3      4      5      6      7      8      9
    minutes  2.7    3.7    4.7    5.7    6.6    7.7    8.6    9.8   11.2
    AP50   0.034  0.156  0.241  0.331  0.399  0.430  0.449  0.456  0.460   (AP 0.317; done at 11.3 min)

**At 10 minutes AP50 is 0.456: the target is missed by 0.044** (the run ends at 11.3 min with
0.460). The 7-epoch schedule of the same model (commit 0eaa08d, fresh clone, 08:52): 0.011 / 0.051
/ 0.236 / 0.335 / 0.398 / 0.417 / 0.425 at 2.3 / 3.2 / 4.1 / 5.0 / 5.9 / 6.9 / 8.0 min. Tried and
measured, not better within 10 minutes: T at 224×224 for 6 epochs (0.034 / 0.093 / 0.218 / 0.350 /
0.367 / 0.380, done at 10.9 min: 10 img/s instead of 12–14), T at 160×160 (0.251 after 5 epochs vs
0.398), Ns (0.336 after 7 epochs), AdamW 8e-3, batch 4 (``configs/demo_ns.py``). The previous demo
(Ns, compiled in the training process) was at 0.336 after 19.2 minutes. ``predictions.png`` (9-epoch
run) shows boxes on most objects, most with the right class (star, ring, circle, triangle mostly
right; cross / square still confused at times).
"""
from damo_jax.config import load_config


def get_config():
    c = load_config("demo_ns")
    c.model = load_config("t").model
    c.train.epochs = 9
    return c
