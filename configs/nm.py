"""DAMO-YOLO-Nm (TinyNAS nano-middle mob backbone, 416).

Train on the bundled demo set (CPU-sized run)::

    damo-jax train --config nm --data demo --runlocal --workdir runs/nm_demo

Train on COCO 2017 with the official recipe (global batch 256, 300 epochs, 416x416)::

    damo-jax train --config nm --data coco:/data/coco --workdir runs/nm_coco

Expected result with the official recipe: COCO val2017 38.2 mAP (official release, SPEC §11).
Evaluate an official checkpoint::

    damo-jax eval --config nm --weights damoyolo_nm.pth --data coco:/data/coco

Training recipe: ``official_nano`` (AdamW, lr 0.001 per 64 images, wd 1e-2, 300 epochs, batch 256,
416x416 from 640 mosaics; shear 0.2, mosaic scale (0.1, 2.0)) -- see ``damo_jax.config.RECIPES``.
"""
from damo_jax.config import model_config, with_recipe


def get_config():
    c = model_config(
        name='nm',
        backbone='TinyNAS_mob',
        structure='tinynas_nano_middle',
        out_indices=(2, 4, 5),
        use_focus=False,
        act='silu',
        reparam=False,
        neck_depth=0.5,
        hidden_ratio=0.5,
        in_channels=(64, 128, 256),
        out_channels=(64, 128, 256),
        depthwise=True,
        reg_max=7,
        last_kernel_size=1,
        nano=True,
    )  # architecture + evaluation protocol
    # training recipe (SPEC §9.1/§9.2): the named recipe + this model's augmentation strength
    return with_recipe(c, 'official_nano', shear=0.2, mosaic_scale=(0.1, 2.0))
