"""Inference: ``load_model`` (``loading``: checkpoints, .pth/.npz, ONNX, OpenVINO), the one
inference path (``pipeline``: preprocess -> forward -> NMS -> rescale), ``Detector``
(``detector``), ONNX / OpenVINO runtimes (``backends``), drawing (``draw``), image files and the
array -> RGB converter (``images``). The predict command is ``damo_jax.cli.predict``."""
