"""Secure, authenticated gRPC inference gateway for ONNX models.

The public SDK surface is imported lazily (PEP 562), so that server modules importing ``gateway.x`` do not
pay for the client, and the transport-free modules stay free of grpc. The SDK needs grpcio, protobuf, numpy,
cryptography and httpx (``pip install gateway``); the server's dependencies come with
``pip install 'gateway[server]'``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see of the lazy names below (the package ships py.typed)
    from gateway.client import (
        AsyncClient,
        Client,
        ModelInfo,
        ModelMetadata,
        PredictResult,
        RefreshingToken,
        RetryPolicy,
        StaticToken,
        StreamRequest,
        TensorSpec,
        TokenFile,
        TokenProvider,
    )
    from gateway.errors import (
        AuthenticationError,
        CancelledError,
        DeadlineExceededError,
        GatewayError,
        InternalError,
        InvalidArgumentError,
        NotFoundError,
        PermissionDeniedError,
        ResourceExhaustedError,
        TLSHandshakeError,
        UnavailableError,
        UnimplementedError,
    )
    from gateway.oauth import ClientCredentialsTokenProvider

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
    "ClientCredentialsTokenProvider": "gateway.oauth",
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


def package_version() -> str:
    """The installed distribution's version (``gateway --version``, the Open Inference Protocol's ServerMetadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gateway")
    except PackageNotFoundError:
        return "(not installed)"
