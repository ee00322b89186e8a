"""DAMO-YOLO-Ns (TinyNAS nano-small mob backbone, 416).

Train on the bundled demo set (CPU-sized run)::

    python -m damo_jax.train --config ns --data demo --runlocal --workdir runs/ns_demo

Train on COCO 2017 with the official recipe (global batch 256, 300 epochs, 416x416)::

    python -m damo_jax.train --config ns --data coco:/data/coco --workdir runs/ns_coco

Expected result with the official recipe: COCO val2017 32.3 mAP (official release, SPEC §11).
Evaluate an official checkpoint::

    python -m damo_jax.evaluation.evaluator --config ns --weights damoyolo_ns.pth --data coco:/data/coco
"""
from damo_jax.config import model_config


def get_config():
    return model_config(
        name='ns',
        backbone='TinyNAS_mob',
        structure='tinynas_nano_small',
        out_indices=(2, 4, 5),
        use_focus=False,
        act='silu',
        reparam=False,
        neck_depth=0.5,
        hidden_ratio=0.5,
        in_channels=(40, 80, 160),
        out_channels=(40, 80, 160),
        depthwise=True,
        reg_max=7,
        last_kernel_size=1,
        nano=True,
        shear=0.2,
        mosaic_scale=(0.75, 1.25),
    )
