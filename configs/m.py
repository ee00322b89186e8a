"""DAMO-YOLO-M (TinyNAS-L35 CSP backbone, 640).

Train on the bundled demo set (CPU-sized run)::

    damo-jax train --config m --data demo --runlocal --workdir runs/m_demo

Train on COCO 2017 with the official recipe (global batch 256, 300 epochs, 640x640)::

    damo-jax train --config m --data coco:/data/coco --workdir runs/m_coco

Expected result with the official recipe: COCO val2017 49.2 mAP (50.2 distilled) (official release, SPEC §11).
Evaluate an official checkpoint::

    damo-jax eval --config m --weights damoyolo_m.pth --data coco:/data/coco

Training recipe: ``official`` (SGD, lr 0.01 per 64 images, wd 5e-4, 300 epochs, batch 256,
640x640; shear 2.0, mosaic scale (0.1, 2.0)) -- see ``damo_jax.config.RECIPES``.
"""
from damo_jax.config import model_config, with_recipe


def get_config():
    c = model_config(
        name='m',
        backbone='TinyNAS_csp',
        structure='tinynas_L35_kxkx',
        out_indices=(2, 3, 4),
        use_focus=True,
        act='silu',
        reparam=True,
        neck_depth=1.5,
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
