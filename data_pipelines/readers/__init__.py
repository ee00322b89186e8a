"""Dataset readers: COCO JSON, TFDS, YOLO txt, Pascal VOC XML → ``DetectionDataset``."""
from damo_jax.data_pipelines.readers.coco import CocoDataset, read_coco, resolve_coco_paths
from damo_jax.data_pipelines.readers.voc import read_voc
from damo_jax.data_pipelines.readers.yolo import read_yolo

__all__ = ["CocoDataset", "read_coco", "resolve_coco_paths", "read_voc", "read_yolo"]
