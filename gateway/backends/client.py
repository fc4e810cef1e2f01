"""The grpc.aio client of one backend: channels (mutual TLS, or plaintext to loopback), round robin over the
addresses that are up, an in-flight cap, a health poll that keeps the routed models' signatures, and the mapping of
the backend's status codes to what the gateway's caller is told.

Nothing is sent for a caller before the pipeline has decided (gateway.pipeline); the poll is the gateway's own
traffic. The poll reads the backend's metadata, so a call never waits for it, and a backend that is down is known
before a call picks it: its calls fail at once with UNAVAILABLE, nothing sent (so the caller may retry). A call once
sent is never retried here: only grpc's own transparent retry of a request that never left the client applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import structlog

from gateway import metrics, tensors
from gateway._pb.inference import grpc_service_pb2 as pb
from gateway._pb.inference import grpc_service_pb2_grpc as pb_grpc
from gateway.backends.route import Exchange, RemoteModel, RemoteOutput
from gateway.config import BackendSettings
from gateway.errors import (
    DeadlineExceededError,
    GatewayError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
)
from gateway.identifiers import ID, NAME, shown
from gateway.models.schema import TensorSpec

log = structlog.get_logger(__name__)

_POLL_TIMEOUT_S = 5.0  # each health and metadata call of the poll, at most (less when the poll interval is shorter)
_RECONNECT_BACKOFF_MS = (200, 2000)  # a restarted backend is reconnected within seconds, not grpc's default 120 s


@dataclass(frozen=True, slots=True)
class _Address:
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.GRPCInferenceServiceStub


def _credentials(settings: BackendSettings) -> grpc.ChannelCredentials | None:
    """Mutual TLS: the backend's CA, the gateway's own certificate and key; None for plaintext."""
    if settings.plaintext:
        return None
    ca, cert, key = settings.ca, settings.cert, settings.key
    if ca is None or cert is None or key is None:  # config.validate refuses this: a programming error here
        raise ValueError("mutual TLS to a backend needs ca, cert and key")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=key.read_bytes(), certificate_chain=cert.read_bytes()
    )


def _channel_options(settings: BackendSettings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.initial_reconnect_backoff_ms", _RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", _RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", _RECONNECT_BACKOFF_MS[1]),
    ]
    if settings.server_name is not None:
        options.append(("grpc.ssl_target_name_override", settings.server_name))
    return options


class BackendClient:
    """One backend (``backends.NAME``): the models it serves for the gateway, and calls to it."""

    def __init__(
        self, name: str, settings: BackendSettings, *, max_elements: int, max_bytes_elements: int, metered: bool
    ) -> None:
        """``max_elements``/``max_bytes_elements``: the gateway's tensor limits, held to the backend's answers too."""
        self.name = name
        self.settings = settings
        self._limits = (max_elements, max_bytes_elements)
        self._metered = metered
        self._addresses: tuple[_Address, ...] = ()
        self._up: tuple[_Address, ...] = ()
        self._turn = itertools.count()
        self._models: Mapping[str, RemoteModel] = {}
        self._described: dict[str, str] = {}  # gateway name -> why it is not served now (logged once per change)
        self._in_flight = 0
        self._poller: asyncio.Task[None] | None = None
        self._was_up: bool | None = None
        self._index_failure: str | None = None  # the code RepositoryIndex last failed with (logged once)
        self._token: str | None = None  # token_file's content as the last poll read it

    @property
    def up(self) -> bool:
        """At least one address answered ServerReady true at the last poll."""
        return bool(self._up)

    @property
    def required(self) -> bool:
        """The gateway is not ready while this backend is down."""
        return self.settings.required

    async def start(self) -> None:
        """Open the channels (on the running loop), poll once now, then keep polling in the background."""
        settings = self.settings
        credentials = _credentials(settings)
        options = _channel_options(settings)
        addresses = []
        for address in settings.addresses:
            channel = (
                grpc.aio.insecure_channel(address, options=options)
                if credentials is None
                else grpc.aio.secure_channel(address, credentials, options=options)
            )
            addresses.append(_Address(address, channel, pb_grpc.GRPCInferenceServiceStub(channel)))
        self._addresses = tuple(addresses)
        if settings.plaintext:
            log.warning(
                "backend_plaintext",
                backend=self.name,
                addresses=list(settings.addresses),
                detail="calls and tensors to this backend are not encrypted: loopback (same pod) only",
            )
        await self.poll()
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever(), name=f"backend-{self.name}")

    async def close(self) -> None:
        """Stop polling and close the channels (calls still open on them end CANCELLED)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for address in self._addresses:
            await address.channel.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self.poll()
            except Exception:  # the poll must outlive any surprise; the next one tries again
                log.exception("backend_poll_failed", backend=self.name)

    def _metadata(self) -> list[tuple[str, str]]:
        return [] if self._token is None else [("authorization", "Bearer " + self._token)]

    async def _read_token(self) -> None:
        """Read ``token_file`` off the event loop, at each poll: a token refreshed on disk (a sidecar, a cron job)
        is sent within ``health_interval_s``, and no call waits on the disk. A file that cannot be read keeps the
        last token (logged)."""
        token_file = self.settings.token_file
        if token_file is None:
            return
        try:
            self._token = (await asyncio.to_thread(token_file.read_text)).strip()
        except OSError as exc:
            log.error(
                "backend_token_unreadable", backend=self.name, key=f"backends.{self.name}.token_file", error=str(exc)
            )

    async def poll(self) -> None:
        """ServerReady on every address, then the routed models' metadata from one that is up."""
        await self._read_token()
        timeout = min(_POLL_TIMEOUT_S, self.settings.deadline_s)
        metadata = self._metadata()
        answers = await asyncio.gather(
            *(self._ready(address, timeout, metadata) for address in self._addresses), return_exceptions=False
        )
        self._up = tuple(address for address, ready in zip(self._addresses, answers, strict=True) if ready)
        if self._up:
            self._models = await self._describe(self._up[0], timeout, metadata)
        else:
            self._models = {}
        if self._metered:
            metrics.BACKEND_UP.labels(backend=self.name).set(int(self.up))
        if self.up != self._was_up:
            (log.info if self.up else log.error)(
                "backend_up" if self.up else "backend_down",
                backend=self.name,
                addresses_up=[a.address for a in self._up],
                models=sorted(self._models),
            )
            self._was_up = self.up

    @staticmethod
    async def _ready(address: _Address, timeout: float, metadata: list[tuple[str, str]]) -> bool:
        try:
            answer = await address.stub.ServerReady(pb.ServerReadyRequest(), timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.ready)

    async def _describe(
        self, address: _Address, timeout: float, metadata: list[tuple[str, str]]
    ) -> dict[str, RemoteModel]:
        """The routed models' signatures: the explicit names, and the repository index's names that match a
        pattern. A model whose metadata cannot be read or served is left out, its reason logged once."""
        names = dict(self.settings.models)
        index = await self._index(address, timeout, metadata)  # names and versions, where the backend lists them
        if index is None:  # not answered this time: what the last index said stands (no flapping on one timeout)
            index = {model.remote_name: model.version for model in self._models.values()}
        # Explicit routes win: a pattern never renames one, nor serves its remote model under a second name.
        explicit = set(names) | set(names.values())
        names.update(
            (name, name)
            for name in index
            if name not in explicit
            and any(fnmatch.fnmatchcase(name, pattern) for pattern in self.settings.model_patterns)
        )
        found: dict[str, RemoteModel] = {}
        reasons: dict[str, str] = {}
        for gateway_name, remote in names.items():
            try:
                answer = await address.stub.ModelMetadata(
                    pb.ModelMetadataRequest(name=remote), timeout=timeout, metadata=metadata
                )
                found[gateway_name] = self._remote_model(gateway_name, remote, answer, index.get(remote, ""))
            except grpc.aio.AioRpcError as exc:
                previous = self._models.get(gateway_name)
                if previous is not None and exc.code() is not grpc.StatusCode.NOT_FOUND:
                    found[gateway_name] = previous  # one slow answer does not take a model out: the last stands
                else:
                    reasons[gateway_name] = f"ModelMetadata: {exc.code().name}"
            except ValueError as exc:
                reasons[gateway_name] = str(exc)
        for gateway_name, reason in reasons.items():
            if self._described.get(gateway_name) != reason:
                log.warning("backend_model_unavailable", backend=self.name, model=gateway_name, reason=reason)
        for gateway_name, model in found.items():
            previous = self._models.get(gateway_name)
            if previous != model:
                log.info(
                    "backend_model_described",
                    backend=self.name,
                    model=gateway_name,
                    remote_model=model.remote_name,
                    version=model.version,
                    versions=list(model.versions),
                    changed=previous is not None,
                )
        self._described = reasons
        return found

    async def _index(self, address: _Address, timeout: float, metadata: list[tuple[str, str]]) -> dict[str, str] | None:
        """The backend's ready models and their versions (RepositoryIndex; MLServer says "State.READY"); empty where
        it does not serve the method (KServe), None where it did not answer."""
        try:
            index = await address.stub.RepositoryIndex(
                pb.RepositoryIndexRequest(ready=True), timeout=timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            if self.settings.model_patterns and self._index_failure != exc.code().name:
                log.warning("backend_discovery_failed", backend=self.name, code=exc.code().name)
            self._index_failure = exc.code().name
            return {} if exc.code() is grpc.StatusCode.UNIMPLEMENTED else None
        self._index_failure = None
        return {
            entry.name: entry.version
            for entry in index.models
            if NAME.allows(entry.name) and entry.state.rpartition(".")[2] in ("", "READY")
        }

    def _remote_model(self, name: str, remote: str, answer: pb.ModelMetadataResponse, listed: str) -> RemoteModel:
        def specs(entries: Sequence[pb.ModelMetadataResponse.TensorMetadata], kind: str) -> tuple[TensorSpec, ...]:
            found = []
            for entry in entries:
                if not ID.allows(entry.name):
                    raise ValueError(f"{kind} {shown(entry.name)!r} is not a well-formed name")
                if entry.datatype not in tensors.BY_NAME:
                    raise ValueError(f"{kind} {shown(entry.name)!r}: datatype {shown(entry.datatype)!r} not served")
                found.append(TensorSpec(entry.name, entry.datatype, tuple(d if d >= 0 else -1 for d in entry.shape)))
            return tuple(found)

        versions = tuple(answer.versions) or ((listed,) if listed else ())
        for version in versions:
            if not NAME.allows(version):
                raise ValueError(f"version {shown(version)!r} is not a well-formed name")
        return RemoteModel(
            name=name,
            backend=self.name,
            remote_name=remote,
            version=_highest(versions),
            versions=versions,
            platform=answer.platform,
            inputs=specs(answer.inputs, "input"),
            outputs=specs(answer.outputs, "output"),
            max_elements=self._limits[0],
            max_bytes_elements=self._limits[1],
        )

    def model(self, name: str) -> RemoteModel | GatewayError:
        """The routed model ``name`` as last described, or why not: UNAVAILABLE while the backend is down (or has
        not described it), NOT_FOUND for a name no pattern found."""
        model = self._models.get(name)
        if model is not None:
            return model
        if name in self.settings.models:
            return UnavailableError(f"model '{name}' is unavailable", reason=f"backend {self.name} not ready")
        return NotFoundError(f"model '{shown(name)}' not found")

    def models(self) -> Sequence[RemoteModel]:
        """The models this backend serves for the gateway now."""
        return tuple(self._models.values())

    def _pick(self) -> _Address:
        """The next address that is up, round robin; UNAVAILABLE (nothing sent) when none is, RESOURCE_EXHAUSTED at
        the in-flight cap."""
        up = self._up
        if not up:
            raise UnavailableError("the model's backend is unavailable", reason=f"backend {self.name} down")
        if self._in_flight >= self.settings.max_in_flight:
            raise ResourceExhaustedError(
                "the model's backend is at its limit of calls in flight", reason=f"backend {self.name} in-flight cap"
            )
        return up[next(self._turn) % len(up)]

    async def _call(self, exchange: Exchange, rpc: str, request: Any, metadata: list[tuple[str, str]]) -> Any:
        """One unary call through the next address, every outcome in ``exchange`` and the metrics. A caller whose
        own deadline passes first cancels it (grpc.aio cancels the backend call with the caller's task)."""
        address = self._pick()
        exchange.address, exchange.sent = address.address, True
        self._in_flight += 1
        in_flight = metrics.BACKEND_IN_FLIGHT.labels(backend=self.name) if self._metered else None
        if in_flight is not None:
            in_flight.inc()
        started = time.perf_counter()
        try:
            answer = await getattr(address.stub, rpc)(request, timeout=self.settings.deadline_s, metadata=metadata)
            exchange.code = "OK"
            return answer
        except grpc.aio.AioRpcError as exc:
            exchange.code = exc.code().name
            raise self._error(exc) from None
        except asyncio.CancelledError:  # the caller went away: grpc.aio cancels the backend call with the task
            exchange.code = "CANCELLED"
            raise
        finally:
            self._in_flight -= 1
            elapsed = time.perf_counter() - started
            exchange.latency_ms = round(elapsed * 1000.0, 3)
            if in_flight is not None:
                in_flight.dec()
                metrics.BACKEND_CALLS.labels(backend=self.name, code=exchange.code or "UNKNOWN").inc()
                metrics.BACKEND_SECONDS.labels(backend=self.name).observe(elapsed)

    def _error(self, exc: grpc.aio.AioRpcError) -> GatewayError:
        """What the caller is told of a backend's status: its class, never the backend's internals (nor its
        message: logged). Marked ``from_backend``: not counted against the caller's refusals (gateway.limits)."""
        error = self._status_error(exc)
        error.from_backend = True
        return error

    def _status_error(self, exc: grpc.aio.AioRpcError) -> GatewayError:
        code = exc.code()
        reason = f"backend {self.name}: {code.name}"
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError("the model's backend did not answer in time", reason=reason)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhaustedError("the model's backend answer is too large, or it is busy", reason=reason)
        if code is grpc.StatusCode.INVALID_ARGUMENT:  # about the request; its text may name the backend's internals
            log.info("backend_refused_request", backend=self.name, detail=shown(exc.details() or ""))
            return InvalidArgumentError("the model's backend refused the request as invalid", reason=reason)
        if code is grpc.StatusCode.NOT_FOUND:
            return NotFoundError("the model or version was not found on its backend", reason=reason)
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return UnimplementedError("the model's backend does not serve this method", reason=reason)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            return UnavailableError("the model's backend is unavailable", reason=reason)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # The backend refused the gateway's own identity: a configuration fault, not the caller's.
            log.error("backend_refused_gateway", backend=self.name, code=code.name, detail=shown(exc.details() or ""))
        return InternalError(reason=reason)

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
        """ModelInfer of exactly ``version`` (the one the policy judged; None where the backend advertises none),
        with the inputs' raw bytes as they came (typed contents encoded raw, a step at a time); the answer's version
        must be the one asked for, its outputs are checked against their shapes and the gateway's limits."""
        request = pb.ModelInferRequest(model_name=model.remote_name, model_version=version or "")
        for name, tensor in inputs.items():
            request.inputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
            if tensor.raw is not None:
                raw = tensor.raw
            else:
                array, _ = await tensors.in_steps(tensors.decode_steps(tensor))
                (_, raw), _ = await tensors.in_steps(tensors.encode_steps(array))
            request.raw_input_contents.append(raw)
        for name in outputs or ():
            request.outputs.add(name=name)
        metadata = [("x-request-id", request_id), *headers, *self._metadata()]
        answer = await self._call(exchange, "ModelInfer", request, metadata)
        answered = answer.model_version or version
        if answered is not None and (answered != version or not NAME.allows(answered)):
            # Fail closed: the policy judged ``version``; an answer from another one is not released.
            log.error(
                "backend_answer_version_mismatch",
                backend=self.name,
                model=model.name,
                asked=version,
                answered=shown(answer.model_version),
            )
            raise InternalError(reason=f"backend {self.name}: answered another version than asked")
        exchange.version = answered
        try:
            return await self._outputs(answer)
        except InvalidArgumentError as exc:  # the backend's answer, not the caller's request, is malformed
            log.error("backend_answer_malformed", backend=self.name, model=model.name, detail=exc.message)
            raise InternalError(reason=f"backend {self.name}: malformed answer") from None

    async def _outputs(self, answer: pb.ModelInferResponse) -> dict[str, RemoteOutput]:
        raw_outputs = answer.raw_output_contents
        if raw_outputs and len(raw_outputs) != len(answer.outputs):
            raise InvalidArgumentError("raw_output_contents does not match the outputs")
        found: dict[str, RemoteOutput] = {}
        for index, output in enumerate(answer.outputs):
            row = tensors.BY_NAME.get(output.datatype)
            if row is None or not ID.allows(output.name) or output.name in found:
                raise InvalidArgumentError(f"output {shown(output.name)!r} is not servable")
            wire = tensors.wire_tensor(
                output.name,
                row,
                output.shape,
                raw=raw_outputs[index] if raw_outputs else None,
                contents=output.contents,
                raw_field="raw_output_contents",
            )
            tensors.check(wire, max_elements=self._limits[0], max_bytes_elements=self._limits[1])
            if row is tensors.BYTES or wire.raw is None:  # a step at a time: the loop serves others meanwhile
                array, _ = await tensors.in_steps(tensors.decode_steps(wire))
                raw = wire.raw if wire.raw is not None else (await tensors.in_steps(tensors.encode_steps(array)))[0][1]
            else:
                raw = wire.raw
                array = np.frombuffer(raw, dtype=row.dtype).reshape(wire.shape)
            found[output.name] = RemoteOutput(row, array, raw)
        return found

    async def config(
        self, model: RemoteModel, *, version: str | None, request_id: str, exchange: Exchange
    ) -> pb.ModelConfig:
        """The backend's ModelConfig of ``version``, reduced to what a caller allowed the model's metadata may
        read (the signature's fields, as the gateway's own ModelConfig shows: never the backend's paths,
        parameters or instance groups), under the gateway's model name (UNIMPLEMENTED where the backend has none,
        as MLServer and KServe)."""
        request = pb.ModelConfigRequest(name=model.remote_name, version=version or "")
        metadata = [("x-request-id", request_id), *self._metadata()]
        answer = await self._call(exchange, "ModelConfig", request, metadata)
        found = answer.config
        shown_config = pb.ModelConfig(
            name=model.name, platform=found.platform, backend=found.backend, max_batch_size=found.max_batch_size
        )
        shown_config.input.extend(found.input)
        shown_config.output.extend(found.output)
        return shown_config


def _highest(versions: Sequence[str]) -> str:
    """The version a call naming none runs: the highest number, or the last listed where one is not a number; ""
    for none. The backend's own default (pinned, canary) is not known through the protocol."""
    if not versions:
        return ""
    if all(v.isascii() and v.isdigit() for v in versions):
        return max(versions, key=int)
    return versions[-1]
