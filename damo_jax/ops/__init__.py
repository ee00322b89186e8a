"""Array ops shared by training, evaluation, inference and export: box ops (``boxes``: IoU, GIoU,
format conversions, the multiple-of-32 size check) and static-shape NMS (``nms``)."""
