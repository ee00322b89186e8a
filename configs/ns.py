"""DAMO-YOLO-Ns (TinyNAS nano-small mob backbone, 416).

Train on the bundled demo set (CPU-sized run)::

    damo-jax train --config ns --data demo --runlocal --workdir runs/ns_demo

Train on COCO 2017 with the official recipe (global batch 256, 300 epochs, 416x416)::

    damo-jax train --config ns --data coco:/data/coco --workdir runs/ns_coco

Expected result with the official recipe: COCO val2017 32.3 mAP (official release, SPEC §11).
Evaluate an official checkpoint::

    damo-jax eval --config ns --weights damoyolo_ns.pth --data coco:/data/coco

Training recipe: ``official_nano`` (AdamW, lr 0.001 per 64 images, wd 1e-2, 300 epochs, batch 256,
416x416 from 640 mosaics; shear 0.2, mosaic scale (0.75, 1.25)) -- see ``damo_jax.config.RECIPES``.
"""
from damo_jax.config import model_config, with_recipe


def get_config():
    c = model_config(
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
    )  # architecture + evaluation protocol
    # training recipe (SPEC §9.1/§9.2): the named recipe + this model's augmentation strength
    return with_recipe(c, 'official_nano', shear=0.2, mosaic_scale=(0.75, 1.25))
