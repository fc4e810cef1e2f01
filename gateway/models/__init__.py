"""Models: the versioned repository on disk and the ONNX Runtime sessions that execute them."""
