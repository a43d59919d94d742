"""Inference: map backends (torch, ONNX Runtime, OpenVINO), maps and scores of image files, the
``Detector`` API, ``rstpm predict``'s inputs and outputs, overlays and the ONNX export."""
