"""Small helpers for end-to-end tests: raw stubs with explicit metadata, so tests control every header."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from gateway import tensors
from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc

TIMEOUT = 10.0


def stub(channel: grpc.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)


def auth(token: str | None, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    headers = (("authorization", f"Bearer {token}"),) if token else ()
    return headers + extra


def tensor(name: str, array: np.ndarray) -> pb.Tensor:
    return tensors.encode(name, array)


def predict_request(model: str, inputs: dict[str, np.ndarray], version: str = "") -> pb.PredictRequest:
    return pb.PredictRequest(model_name=model, model_version=version, inputs=[tensor(n, a) for n, a in inputs.items()])


def outputs(response: pb.PredictResponse) -> dict[str, np.ndarray]:
    return {t.name: tensors.decode(t, max_elements=2**40) for t in response.outputs}


def rpc_error(call: Any) -> grpc.RpcError:
    """The RpcError a call raises (fails the test if it succeeds)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded but should have been refused")


def trailer(exc_or_call: Any, key: str) -> str | None:
    for name, value in exc_or_call.trailing_metadata() or ():
        if name == key:
            return str(value)
    return None
