"""DAMO-YOLO training augmentations on numpy HWC uint8 images (SPEC §9.2–9.3)."""
from damo_jax.data_pipelines.augment.affine import affine_matrix, box_candidates, random_affine, transform_boxes
from damo_jax.data_pipelines.augment.flip import hflip, random_hflip
from damo_jax.data_pipelines.augment.mixup import mixup
from damo_jax.data_pipelines.augment.mosaic import mosaic
from damo_jax.data_pipelines.augment.pipeline import AugParams, as_hw, load_sample, train_sample
from damo_jax.data_pipelines.augment.resize import drop_small, stretch_resize
from damo_jax.data_pipelines.augment.sada import sada

__all__ = ["affine_matrix", "box_candidates", "random_affine", "transform_boxes", "hflip",
           "random_hflip", "mixup", "mosaic", "AugParams", "as_hw", "load_sample", "train_sample",
           "drop_small", "stretch_resize", "sada"]
