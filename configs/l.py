"""DAMO-YOLO-L (TinyNAS-L45 CSP backbone, 640).

Train on the bundled demo set (CPU-sized run)::

    python -m damo_jax.train --config l --data demo --runlocal --workdir runs/l_demo

Train on COCO 2017 with the official recipe (global batch 256, 300 epochs, 640x640)::

    python -m damo_jax.train --config l --data coco:/data/coco --workdir runs/l_coco

Expected result with the official recipe: COCO val2017 50.8 mAP (51.9 distilled) (official release, SPEC §11).
Evaluate an official checkpoint::

    python -m damo_jax.evaluation.evaluator --config l --weights damoyolo_l.pth --data coco:/data/coco
"""
from damo_jax.config import model_config


def get_config():
    return model_config(
        name='l',
        backbone='TinyNAS_csp',
        structure='tinynas_L45_kxkx',
        out_indices=(2, 3, 4),
        use_focus=True,
        act='silu',
        reparam=True,
        neck_depth=2.0,
        hidden_ratio=1.0,
        in_channels=(128, 256, 512),
        out_channels=(128, 256, 512),
        depthwise=False,
        reg_max=16,
        last_kernel_size=3,
        nano=False,
        shear=2.0,
        mosaic_scale=(0.1, 2.0),
    )
