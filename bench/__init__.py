"""Side-by-side benchmark: ONNX Runtime alone, a bare tutorial-style grpcio server, and the gateway."""
