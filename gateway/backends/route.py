"""What the pipeline knows of routed models, without grpc: a routed model as its backend last described it, the
execution interface a backend client implements, and the record of one exchange with a backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from gateway import tensors
from gateway.errors import GatewayError, NotFoundError
from gateway.models import schema
from gateway.models.schema import TensorSpec


@dataclass(frozen=True, slots=True)
class RemoteModel(schema.InputChecks):
    """A routed model: its gateway name, the backend's name and signature for it, as the last health poll read them
    (ModelMetadata). ``digest`` and ``batcher`` are None: the gateway holds neither for a model it does not run."""

    name: str
    backend: str
    remote_name: str
    version: str  # the version a call naming none runs: the highest the backend advertises ("" when it names none)
    versions: tuple[str, ...]  # every version the backend advertises (ModelMetadata), in its order
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_elements: int
    max_bytes_elements: int
    digest: None = None
    batcher: None = None
    provider: None = None  # no ONNX Runtime provider: the backend runs it

    def resolve(self, requested: str | None) -> str | NotFoundError | None:
        """The version a call runs, named to the backend (docs/backends.md): the one asked for if the backend
        advertises it, else the default; None for a backend that advertises no version (and is asked for none).
        A version not advertised is NOT_FOUND here, before anything is sent: the backend never sees it."""
        if requested is None:
            return self.version or None
        if requested in self.versions:
            return requested
        return NotFoundError(f"model '{self.name}' has no version '{requested}'")


@dataclass(slots=True)
class Exchange:
    """One call to a backend, as the audit record tells it: filled in by the backend client as it goes, read by the
    pipeline whatever the outcome. ``address`` and ``code`` (the backend's status) stay None when nothing was sent;
    ``sent``: the request may have reached the backend (so a retry is not known to be safe)."""

    backend: str
    address: str | None = None
    code: str | None = None
    latency_ms: float | None = None
    version: str | None = None
    sent: bool = False

    def record(self) -> dict[str, Any]:
        """The record's ``backend`` field."""
        return {"name": self.backend, "address": self.address, "code": self.code, "latency_ms": self.latency_ms}


@dataclass(frozen=True, slots=True)
class RemoteOutput:
    """One output of a backend's answer: its datatype, shape, raw bytes (the form both APIs send) and an array view
    of them (no copy for fixed-size datatypes)."""

    row: tensors.DataType
    array: np.ndarray
    raw: bytes


class Backend(Protocol):
    """A backend client, as the pipeline calls it (gateway.backends.client.BackendClient)."""

    name: str

    def model(self, name: str) -> RemoteModel | GatewayError:
        """The routed model ``name`` as last described, or why it cannot be served now (UNAVAILABLE, NOT_FOUND)."""
        ...

    def models(self) -> Sequence[RemoteModel]:
        """Every model this backend serves for the gateway now."""
        ...

    async def infer(
        self,
        model: RemoteModel,
        inputs: Mapping[str, tensors.WireTensor],
        *,
        version: str | None,
        outputs: tuple[str, ...] | None,
        request_id: str,
        headers: Sequence[tuple[str, str]],
        exchange: Exchange,
    ) -> dict[str, RemoteOutput]:
        """Run ``model`` on the backend with the checked ``inputs``; every outcome goes into ``exchange``."""
        ...

    async def config(self, model: RemoteModel, *, version: str | None, request_id: str, exchange: Exchange) -> Any:
        """The backend's ModelConfig of ``model`` at ``version`` (inference.ModelConfig), reduced to its signature's
        fields and named as the gateway names it."""
        ...


class Routes:
    """Which backend serves a gateway model name: explicit names first, then patterns (by discovery)."""

    def __init__(self, backends: Sequence[Backend], explicit: Mapping[str, Backend], patterns: Sequence[Backend]):
        self.backends = tuple(backends)
        self._by_name = {backend.name: backend for backend in backends}
        self._explicit = dict(explicit)
        self._patterns = tuple(patterns)

    def backend(self, name: str) -> Backend:
        """The backend named ``name`` (a RemoteModel's ``backend``)."""
        return self._by_name[name]

    def explicit(self, name: str) -> Backend | None:
        """The backend a name is routed to by ``backends.NAME.models``."""
        return self._explicit.get(name)

    def discovered(self, name: str) -> Backend | None:
        """The backend whose ``model_patterns`` found ``name`` in its repository index."""
        for backend in self._patterns:
            if not isinstance(backend.model(name), GatewayError):
                return backend
        return None

    def models(self) -> list[RemoteModel]:
        """Every routed model servable now, by gateway name."""
        found: dict[str, RemoteModel] = {}
        for backend in self.backends:
            for model in backend.models():
                found.setdefault(model.name, model)
        return [found[name] for name in sorted(found)]
