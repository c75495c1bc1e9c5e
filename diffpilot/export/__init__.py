"""ONNX export (``onnx``, needs torch) and the numpy + onnxruntime runtime (``runtime``, no torch)."""
