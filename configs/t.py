"""DAMO-YOLO-T (TinyNAS-L20 res backbone, 640).

Train on the bundled demo set (CPU-sized run)::

    damo-jax train --config t --data demo --runlocal --workdir runs/t_demo

Train on COCO 2017 with the official recipe (global batch 256, 300 epochs, 640x640)::

    damo-jax train --config t --data coco:/data/coco --workdir runs/t_coco

Expected result with the official recipe: COCO val2017 42.0 mAP (43.6 distilled) (official release, SPEC §11).
Evaluate an official checkpoint::

    damo-jax eval --config t --weights damoyolo_t.pth --data coco:/data/coco

Training recipe: ``official`` (SGD, lr 0.01 per 64 images, wd 5e-4, 300 epochs, batch 256,
640x640; shear 0.2, mosaic scale (0.1, 2.0)) -- see ``damo_jax.config.RECIPES``.
"""
from damo_jax.config import model_config, with_recipe


def get_config():
    c = model_config(
        name='t',
        backbone='TinyNAS_res',
        structure='tinynas_L20_k1kx',
        out_indices=(2, 4, 5),
        use_focus=True,
        act='relu',
        reparam=True,
        neck_depth=1.0,
        hidden_ratio=1.0,
        in_channels=(96, 192, 384),
        out_channels=(64, 128, 256),
        depthwise=False,
        reg_max=16,
        last_kernel_size=3,
        nano=False,
    )  # architecture + evaluation protocol
    # training recipe (SPEC §9.1/§9.2): the named recipe + this model's augmentation strength
    return with_recipe(c, 'official', shear=0.2, mosaic_scale=(0.1, 2.0))
