"""Secure, authenticated gRPC inference gateway for ONNX models."""
