"""Dataset readers: COCO JSON, TFDS, YOLO txt, Pascal VOC XML → ``DetectionDataset``."""
from data_pipelines.readers.coco import CocoDataset, read_coco, resolve_coco_paths
from data_pipelines.readers.voc import read_voc
from data_pipelines.readers.yolo import read_yolo

__all__ = ["CocoDataset", "read_coco", "resolve_coco_paths", "read_voc", "read_yolo"]
