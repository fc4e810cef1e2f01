"""What the pipeline sees of remote backends (gateway.backends.route): no grpc, routes by name then by pattern,
and a routed model's inputs checked against the backend's signature."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from gateway import tensors
from gateway.backends.route import Exchange, RemoteModel, Routes
from gateway.errors import GatewayError, InvalidArgumentError, NotFoundError
from gateway.models.schema import TensorSpec
from tests.conftest import ROOT

MODEL = RemoteModel(
    name="mlp",
    backend="mlserver",
    remote_name="mlp-onnx",
    version="2",
    versions=("1", "2"),
    platform="",
    inputs=(TensorSpec("input", "FP32", (-1, 4)),),
    outputs=(TensorSpec("output", "FP32", (-1, 2)),),
    max_elements=1000,
    max_bytes_elements=100,
)


class FakeBackend:
    """A backend that serves the models it was given (the client's cache, without a server)."""

    def __init__(self, name: str, models: dict[str, RemoteModel]) -> None:
        self.name = name
        self._models = models

    def model(self, name: str) -> RemoteModel | GatewayError:
        return self._models.get(name) or NotFoundError(f"model '{name}' not found")

    def models(self) -> list[RemoteModel]:
        return list(self._models.values())


def test_the_pipelines_view_of_backends_imports_no_grpc():
    code = "import sys, gateway.backends.route; print('grpc' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "False"


def test_routes_by_explicit_name_then_by_what_a_pattern_backend_found():
    explicit, patterned = FakeBackend("a", {"mlp": MODEL}), FakeBackend("b", {"text-1": MODEL})
    routes = Routes([explicit, patterned], {"mlp": explicit}, [patterned])  # type: ignore[list-item,dict-item]
    assert routes.explicit("mlp") is explicit and routes.explicit("text-1") is None
    assert routes.discovered("text-1") is patterned and routes.discovered("text-2") is None
    assert routes.backend("b") is patterned


def test_a_routed_models_inputs_are_checked_against_the_backends_signature():
    row = tensors.BY_NAME["FP32"]
    good = tensors.WireTensor("input", row, (2, 4), b"\0" * 32, None)
    MODEL.validate({"input": good})
    assert MODEL.name_inputs({"": good}) == {"input": good}
    with pytest.raises(InvalidArgumentError, match=r"input 'input': shape \[2, 5\], model expects \[-1, 4\]"):
        MODEL.validate({"input": tensors.WireTensor("input", row, (2, 5), b"\0" * 40, None)})


def test_a_routed_model_runs_an_advertised_version_only():
    assert MODEL.resolve(None) == "2" and MODEL.resolve("1") == "1"
    assert isinstance(MODEL.resolve("3"), NotFoundError)
    unversioned = dataclasses.replace(MODEL, version="", versions=())
    assert unversioned.resolve(None) is None and isinstance(unversioned.resolve("1"), NotFoundError)


def test_an_exchange_with_nothing_sent_records_no_address_and_no_code():
    assert Exchange("mlserver").record() == {"name": "mlserver", "address": None, "code": None, "latency_ms": None}
