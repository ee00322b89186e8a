"""DAMO-YOLO-L (TinyNAS-L45 CSP backbone, 640).

Train on the bundled demo set (CPU-sized run)::

    damo-jax train --config l --data demo --runlocal --workdir runs/l_demo

Train on COCO 2017 with the official recipe (global batch 256, 300 epochs, 640x640)::

    damo-jax train --config l --data coco:/data/coco --workdir runs/l_coco

Expected result with the official recipe: COCO val2017 50.8 mAP (51.9 distilled) (official release, SPEC §11).
Evaluate an official checkpoint::

    damo-jax eval --config l --weights damoyolo_l.pth --data coco:/data/coco

Training recipe: ``official`` (SGD, lr 0.01 per 64 images, wd 5e-4, 300 epochs, batch 256,
640x640; shear 2.0, mosaic scale (0.1, 2.0)) -- see ``damo_jax.config.RECIPES``.
"""
from damo_jax.config import model_config, with_recipe


def get_config():
    c = model_config(
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
    )  # architecture + evaluation protocol
    # training recipe (SPEC §9.1/§9.2): the named recipe + this model's augmentation strength
    return with_recipe(c, 'official', shear=2.0, mosaic_scale=(0.1, 2.0))
