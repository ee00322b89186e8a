"""legacy DAMO-YOLO-N config as the current official code builds it (not in the model zoo, SPEC §1.8).

Train on the bundled demo set (CPU-sized run)::

    python -m damo_jax.train --config n --data demo --runlocal --workdir runs/n_demo

Train on COCO 2017 with the official recipe (global batch 256, 300 epochs, 416x416)::

    python -m damo_jax.train --config n --data coco:/data/coco --workdir runs/n_coco

Expected result with the official recipe: COCO val2017 n/a (legacy) (official release, SPEC §11).
Evaluate an official checkpoint::

    python -m damo_jax.evaluation.evaluator --config n --weights damoyolo_n.pth --data coco:/data/coco
"""
from damo_jax.config import model_config


def get_config():
    return model_config(
        name='n',
        backbone='TinyNAS_mob',
        structure='tinynas_L20_k1kx_nano',
        out_indices=(2, 4, 5),
        use_focus=True,
        act='silu',
        reparam=False,
        neck_depth=0.5,
        hidden_ratio=0.5,
        in_channels=(80, 112, 160),
        out_channels=(64, 128, 256),
        depthwise=True,
        reg_max=7,
        last_kernel_size=3,
        nano=True,
        shear=0.2,
        mosaic_scale=(0.1, 2.0),
    )
