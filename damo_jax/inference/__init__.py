"""Inference: ``Detector`` (``detector``), ONNX / OpenVINO backends (``backends``), the predict CLI
(``predict``) and drawing (``draw``)."""
