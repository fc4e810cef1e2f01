"""Secure, authenticated gRPC inference gateway for ONNX models.

The public SDK surface is imported lazily (PEP 562), so that server modules importing ``gateway.x`` do not
pay for the client, and the transport-free modules stay free of grpc.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Client": "gateway.client",
    "AsyncClient": "gateway.client",
    "PredictResult": "gateway.client",
    "StreamRequest": "gateway.client",
    "ModelInfo": "gateway.client",
    "ModelMetadata": "gateway.client",
    "TensorSpec": "gateway.client",
    "RetryPolicy": "gateway.client",
    "TokenProvider": "gateway.client",
    "StaticToken": "gateway.client",
    "TokenFile": "gateway.client",
    "RefreshingToken": "gateway.client",
    "TLSHandshakeError": "gateway.errors",
    "GatewayError": "gateway.errors",
    "AuthenticationError": "gateway.errors",
    "PermissionDeniedError": "gateway.errors",
    "NotFoundError": "gateway.errors",
    "InvalidArgumentError": "gateway.errors",
    "ResourceExhaustedError": "gateway.errors",
    "UnavailableError": "gateway.errors",
    "DeadlineExceededError": "gateway.errors",
    "CancelledError": "gateway.errors",
    "UnimplementedError": "gateway.errors",
    "InternalError": "gateway.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__
