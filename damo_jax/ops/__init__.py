"""Array ops shared by training, evaluation, inference and export: static-shape NMS (``nms``)."""
