"""The Python SDK: ``gateway.Client`` (sync) and ``gateway.AsyncClient`` (grpc.aio), over mutual TLS with a
JWT sent as call credentials, so a token never travels on a channel without TLS.

    with gateway.Client("localhost:50051", ca="certs/clients/alice/ca.crt", cert="certs/clients/alice/alice.crt",
                        key="certs/clients/alice/alice.key", token=token) as client:
        result = client.predict("mlp", {"input": array})
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import secrets
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import grpc
import grpc.aio
import numpy as np
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from gateway import tensors
from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.auth.reasons import reason_of_message
from gateway.errors import (
    AuthenticationError,
    GatewayError,
    TLSHandshakeError,
    UnavailableError,
    error_for_code,
    split_sent_message,
)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's default limit
# gRPC's client-side load balancing over the addresses a target resolves to: the first that connects, or each
# ready one in turn (a target such as "ipv4:10.0.0.2:50051,10.0.0.3:50051", or a DNS name with several records).
LoadBalancing = Literal["pick_first", "round_robin"]
LOAD_BALANCING_POLICIES: tuple[str, ...] = get_args(LoadBalancing)
Inputs = Mapping[str, np.ndarray] | np.ndarray | Sequence[float]

# ---------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, datatype ("FP32", "INT64", ...) and shape (-1 for dynamic dims) of a model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the caller may list: its versions and its default version (None if the caller may not use it)."""

    name: str
    versions: tuple[str, ...]
    default_version: str | None


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    """A model version's signature."""

    name: str
    version: str
    versions: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    model_digest: str | None = None  # "sha256:<hex>" of the version's files, as the gateway loaded them
    execution_provider: str | None = None  # the ONNX Runtime provider its session runs on ("CPU", "CUDA"...)


@dataclass(frozen=True, slots=True)
class PredictResult:
    """Output arrays by name, the version that ran, the request id; ``error`` only on stream results;
    ``attempts``: how many times ``predict`` sent the call (more than 1 when it was retried)."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]
    request_id: str | None = None
    id: str = ""
    error: GatewayError | None = None
    attempts: int = 1


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """One message of a prediction stream."""

    model: str
    inputs: Inputs
    version: str | None = None
    id: str = ""


# ----------------------------------------------------------------------------------------------------- tokens


class TokenProvider:
    """Supplies the bearer token for each call. Subclasses never put the token in their repr."""

    def token(self) -> str:
        """The token to send now."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<redacted>)"


class StaticToken(TokenProvider):
    """A fixed token string."""

    def __init__(self, token: str) -> None:
        self._token = token.strip()

    def token(self) -> str:
        """The token."""
        return self._token


class TokenFile(TokenProvider):
    """A token read from a file, re-read whenever the file changes (rotated by an agent on disk)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._token = ""

    def token(self) -> str:
        """The file's current token."""
        st = self.path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key != self._key:
                self._token, self._key = self.path.read_text().strip(), key
            return self._token

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r})"


class RefreshingToken(TokenProvider):
    """A token from a callable, fetched again ``refresh_before_s`` before its ``exp`` (read, not verified)."""

    def __init__(self, fetch: Callable[[], str], *, refresh_before_s: float = 30.0) -> None:
        self._fetch = fetch
        self._refresh_before_s = refresh_before_s
        self._lock = threading.Lock()
        self._token = ""
        self._refresh_at = 0.0

    def token(self) -> str:
        """A token that is not about to expire."""
        with self._lock:
            if time.time() >= self._refresh_at:
                token = self._fetch().strip()
                self._token = token
                self._refresh_at = _unverified_expiry(token) - self._refresh_before_s
            return self._token


def unverified_claims(token: str) -> dict[str, Any] | None:
    """A JWT's claims read without verifying anything (None when it is no JWT in compact form): for what a client
    may know of its own token (when it expires, whom it is for), never for a decision: the server verifies it.
    The payload is the second base64url part of the compact form (RFC 7515 7.1)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:  # binascii.Error, JSONDecodeError, UnicodeDecodeError
        return None
    return claims if isinstance(claims, dict) else None


def _unverified_expiry(token: str) -> float:
    """A JWT's ``exp`` (0 if it has none), read without verifying anything: only to schedule a refresh."""
    claims = unverified_claims(token)
    if claims is None:
        raise ValueError("not a JWT in compact form with a JSON object as payload")
    expiry = claims.get("exp", 0)
    if isinstance(expiry, bool) or not isinstance(expiry, int | float):
        raise ValueError("the JWT's exp is not a number")
    return float(expiry)


def as_token_provider(token: str | TokenProvider | Callable[[], str] | None) -> TokenProvider | None:
    """Normalize the ``token`` argument."""
    if token is None or isinstance(token, TokenProvider):
        return token
    if isinstance(token, str):
        return StaticToken(token)
    return RefreshingToken(token)


_PROVIDER_FAILURE = "token provider"  # how _BearerAuth's failures start, found again in the status details


class _BearerAuth(grpc.AuthMetadataPlugin):  # type: ignore[misc]
    def __init__(self, provider: TokenProvider) -> None:
        self._provider = provider

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            callback((("authorization", f"Bearer {self._provider.token()}"),), None)
        except Exception as exc:
            # The exception's type only: its text may quote the token. Providers' reprs never hold one, and a
            # GatewayError's message is safe to show by contract (an identity provider's refusal, for one).
            what = f"{type(exc).__name__}: {exc.message}" if isinstance(exc, GatewayError) else type(exc).__name__
            callback((), RuntimeError(f"{_PROVIDER_FAILURE} {self._provider!r} failed: {what}"))


# --------------------------------------------------------------------------------------------------- settings


PemSource = str | os.PathLike[str] | bytes


def _pem(value: PemSource) -> bytes:
    return value if isinstance(value, bytes) else Path(value).read_bytes()


def _named(value: PemSource) -> str:
    return "(PEM bytes)" if isinstance(value, bytes) else str(value)


def _certificates(pem: bytes, role: str, source: PemSource) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ValueError(f"{role} {_named(source)}: not a PEM certificate") from None


def _spki(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _tls_material(*, ca: PemSource, cert: PemSource, key: PemSource) -> tuple[bytes, bytes, bytes]:
    """The PEM bytes of the CA, the client certificate (chain) and its key, checked to be what they claim and the
    key to be the certificate's: a ValueError naming the file, where grpc would fail every call after logging
    its own errors to stderr. OSError when a file cannot be read."""
    return ca_material(ca), *identity_material(cert=cert, key=key)


def ca_material(ca: PemSource) -> bytes:
    """The PEM bytes of a CA bundle, checked to hold certificates."""
    ca_pem = _pem(ca)
    _certificates(ca_pem, "ca", ca)
    return ca_pem


def identity_material(*, cert: PemSource, key: PemSource) -> tuple[bytes, bytes]:
    """The PEM bytes of a client certificate (chain) and its key, checked to be a pair."""
    cert_pem, key_pem = _pem(cert), _pem(key)
    leaf = _certificates(cert_pem, "cert", cert)[0]
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"key {_named(key)}: not an unencrypted PEM private key") from None
    if _spki(private_key.public_key()) != _spki(leaf.public_key()):
        raise ValueError(f"key {_named(key)} does not match cert {_named(cert)}: it is another key pair's")
    return cert_pem, key_pem


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of UNAVAILABLE calls known not to have run: exponential backoff with full jitter.

    ``retry_lost_predictions`` also retries a unary Predict whose connection was lost after it was sent (a
    replica crashed): the model may then run twice, which is harmless for inference, a pure function of its
    inputs. Every attempt carries the same request id, so the audit trails show them together.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    retry_lost_predictions: bool = False

    def backoff(self, attempt: int) -> float:
        """Sleep before attempt ``attempt + 1`` (full jitter, AWS architecture blog's recommendation)."""
        return random.uniform(0, min(self.max_backoff_s, self.initial_backoff_s * 2**attempt))  # noqa: S311


# ------------------------------------------------------------------------------------------- encode / decode


def encode_inputs(inputs: Inputs) -> tuple[list[pb.Tensor], list[float]]:
    """Named tensors, or an unnamed one (the model's only input), or the flat float form."""
    if isinstance(inputs, Mapping):
        return [tensors.encode(name, np.asarray(array)) for name, array in inputs.items()], []
    if isinstance(inputs, np.ndarray):
        return [tensors.encode("", inputs)], []
    return [], [float(v) for v in inputs]


def build_request(model: str, inputs: Inputs, *, version: str | int | None, id: str = "") -> pb.PredictRequest:
    """A PredictRequest for ``inputs``."""
    encoded, flat = encode_inputs(inputs)
    return pb.PredictRequest(
        model_name=model, model_version="" if version is None else str(version), inputs=encoded, input_data=flat, id=id
    )


def _decode_tensor(tensor: pb.Tensor) -> np.ndarray:
    return tensors.decode(tensor, max_elements=2**62)


def parse_response(response: pb.PredictResponse, request_id: str | None, attempts: int = 1) -> PredictResult:
    """A PredictResult from a PredictResponse."""
    outputs = {t.name: _decode_tensor(t) for t in response.outputs}
    return PredictResult(
        response.model_name, response.model_version, outputs, request_id, response.id, attempts=attempts
    )


def _spec(spec: pb.TensorSpec) -> TensorSpec:
    return TensorSpec(spec.name, tensors.BY_ENUM[spec.datatype].name, tuple(spec.shape))


def parse_metadata(response: pb.GetModelMetadataResponse) -> ModelMetadata:
    """A ModelMetadata from the protobuf response."""
    return ModelMetadata(
        response.name,
        response.version,
        tuple(response.versions),
        tuple(_spec(s) for s in response.inputs),
        tuple(_spec(s) for s in response.outputs),
        response.model_digest or None,
        response.execution_provider or None,
    )


def parse_models(response: pb.ListModelsResponse) -> list[ModelInfo]:
    """ModelInfo for each listed model."""
    return [ModelInfo(m.name, tuple(m.versions), m.default_version or None) for m in response.models]


def _trailer(metadata: Any, key: str) -> str | None:
    for name, value in metadata or ():
        if name == key:
            return str(value)
    return None


def error_from_rpc(exc: grpc.RpcError) -> GatewayError:
    """The typed error for a failed call: one table, shared with the server (``gateway.errors``)."""
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details() or code.name  # type: ignore[attr-defined]
    request_id = _trailer(exc.trailing_metadata(), "x-request-id")  # type: ignore[attr-defined]
    if code is grpc.StatusCode.UNAVAILABLE and not _server_answered(exc):
        if _PROVIDER_FAILURE in details:
            # grpc reports a failing metadata plugin as UNAVAILABLE ("Getting metadata from plugin failed with
            # error: ..."), yet nothing was sent: this client's credentials failed, and a retry cannot help.
            return AuthenticationError(details[details.index(_PROVIDER_FAILURE) :])
        problem = handshake_problem(details)
        if problem is not None:
            return TLSHandshakeError(f"TLS handshake failed: {problem} ({details})")
    return _refusal(code.name, details, request_id)


def _refusal(code: str, details: str, request_id: str | None) -> GatewayError:
    """The typed error for a status the gateway sent: its message without the ending that names the request id
    (kept in ``request_id``) and, for UNAUTHENTICATED, the vocabulary's term as ``reason`` ("token expired")."""
    message, sent_id = split_sent_message(details)
    error = error_for_code(code, message, request_id=request_id or sent_id)
    if isinstance(error, AuthenticationError):
        error.reason = reason_of_message(message) or message
    return error


def _server_answered(exc: grpc.RpcError) -> bool:
    """Whether the call got headers or trailers of the server's own (the gateway always sets x-request-id)."""
    return bool(exc.initial_metadata()) or bool(exc.trailing_metadata())  # type: ignore[attr-defined]


# How grpc's details begin when it never had a connection to send the request on: its load balancer's
# "failed to connect to all addresses; last error: ... Connection refused" (also unreachable, connect timeout),
# and name resolution failures ("errors resolving ...", older grpc "DNS resolution failed ...").
_CONNECT_FAILURES = ("failed to connect to all addresses", "errors resolving", "dns resolution failed")

# grpc reports a failed handshake only in the status details (BoringSSL's reason names), one line per side that
# can be wrong, each saying what to change. The first that matches wins.
_HANDSHAKE_PROBLEMS = (
    (
        ("wrong_version_number", "first record does not look like a tls handshake"),
        "this port does not speak TLS: give the gateway's main port (the probe port, health.listen, is plaintext)",
    ),
    (
        ("certificate_verify_failed",),
        "the server's certificate does not chain to the CA given (ca=, --ca): give the CA that signed the "
        "gateway's certificate (certs/clients/NAME/ca.crt)",
    ),
    (
        ("hostname verification", "verification check failed"),
        "the server's certificate does not carry the target's name: connect by a name it carries, or give "
        "server_name= (--server-name)",
    ),
    (
        ("handshake", "ssl", "certificate"),
        "check that the server's certificate chains to the CA given and carries the target's name",
    ),
)
# The server closed a new connection before any call: with TLS 1.3 a server refuses the client's certificate after
# the client has finished its side, so the client sees its socket closed, not an alert it can name.
_REFUSED_CLIENT_CERTIFICATE = (
    "the server closed the connection at the handshake: it refused the client certificate (cert=, --cert): not "
    "signed by a CA the gateway trusts (tls.client_ca), expired, revoked, or not for client authentication"
)


def handshake_problem(details: str) -> str | None:
    """What to change, when a call failed in the TLS handshake (None: it did not)."""
    lowered = details.lower()
    for markers, problem in _HANDSHAKE_PROBLEMS:
        if any(marker in lowered for marker in markers):
            return problem
    if lowered.startswith(_CONNECT_FAILURES[0]) and lowered.endswith("socket closed"):
        return _REFUSED_CLIENT_CERTIFICATE
    return None


def _retryable(exc: grpc.RpcError, error: GatewayError, *, lost_connections: bool) -> bool:
    """UNAVAILABLE known not to have run: the server said so (``x-retry-safe``), or no connection was ever made.

    A connection lost once the request was sent ("Socket closed", no trailers, as when the server crashes) may
    have run the model, so it is retried only when ``lost_connections`` says a second run is acceptable.
    """
    if not isinstance(error, UnavailableError) or isinstance(error, TLSHandshakeError):
        return False
    if _trailer(exc.trailing_metadata(), "x-retry-safe") == "true":  # type: ignore[attr-defined]
        return True
    if _server_answered(exc):
        return False
    return lost_connections or (exc.details() or "").lower().startswith(_CONNECT_FAILURES)  # type: ignore[attr-defined]


class _Attempts:
    """The attempts of one unary call: the time each may take, and the pause before the next one.

    ``rerunnable``: the call may run twice (Predict), so the policy's ``retry_lost_predictions`` applies to it.
    """

    def __init__(self, retry: RetryPolicy, timeout: float | None, *, rerunnable: bool) -> None:
        self._retry = retry
        self._lost_connections = rerunnable and retry.retry_lost_predictions
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._made = 0

    @property
    def made(self) -> int:
        """The attempts made so far, counting the one under way."""
        return self._made + 1

    def timeout(self) -> float | None:
        """What is left of the call's deadline."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def pause_after(self, exc: grpc.RpcError) -> float:
        """The pause before the next attempt; raises the typed error when there is to be none."""
        self._made += 1
        error = error_from_rpc(exc)
        pause = self._retry.backoff(self._made - 1)
        out_of_time = self._deadline is not None and time.monotonic() + pause >= self._deadline
        retryable = _retryable(exc, error, lost_connections=self._lost_connections)
        if out_of_time or self._made >= self._retry.max_attempts or not retryable:
            raise error from None
        return pause


def _new_request_id() -> str:
    """A request id made by the client (the server accepts a safe caller-chosen one)."""
    return secrets.token_hex(16)


def _metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id),)


StreamItems = Iterable[StreamRequest | Inputs]


class _Messages:
    """A stream's request messages, each made from the caller's next item only when grpc sends it.

    grpc reports a request iterable that raises only as a cancelled call: ``failure`` keeps the caller's
    exception, to be raised instead.
    """

    def __init__(
        self, items: StreamItems | AsyncIterable[StreamRequest | Inputs], model: str | None, version: Any
    ) -> None:
        self._items, self._model, self._version = items, model, version
        self.failure: Exception | None = None

    def __iter__(self) -> Iterator[pb.PredictRequest]:
        try:
            for index, item in enumerate(self._items):  # type: ignore[arg-type]
                yield self._message(item, index)
        except Exception as exc:
            self.failure = exc
            raise

    async def __aiter__(self) -> AsyncIterator[pb.PredictRequest]:
        index = 0
        try:
            async for item in self._each():
                yield self._message(item, index)
                index += 1
        except Exception as exc:
            self.failure = exc
            raise

    async def _each(self) -> AsyncIterator[Any]:
        if isinstance(self._items, AsyncIterable):
            async for item in self._items:
                yield item
        else:
            # Read in the event loop: a producer that blocks should be an async iterable.
            for item in self._items:
                yield item

    def _message(self, item: Any, index: int) -> pb.PredictRequest:
        if isinstance(item, StreamRequest):
            return build_request(item.model, item.inputs, version=item.version, id=item.id or str(index))
        if self._model is None:
            raise ValueError("predict_stream: pass model= or StreamRequest items")
        return build_request(self._model, item, version=self._version, id=str(index))

    def error(self, exc: grpc.RpcError) -> Exception:
        """The caller's own failure if there was one, else the call's typed error."""
        return self.failure or error_from_rpc(exc)


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _stream_result(reply: pb.PredictStreamResponse, request_id: str, *, raise_errors: bool) -> PredictResult:
    """One stream reply as a result; an in-band error is raised when ``raise_errors``."""
    if not reply.HasField("error"):
        return parse_response(reply.response, request_id)
    code = _CODE_NAMES.get(reply.error.code, "UNKNOWN")
    error = _refusal(code, reply.error.message, request_id)
    if raise_errors:
        raise error
    return PredictResult("", "", {}, request_id, reply.id, error)


# ---------------------------------------------------------------------------------------------------- clients


def check_target(target: str) -> None:
    """A URL is no grpc target: grpc would try to resolve "https" as a host name and say only that it failed."""
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https", "grpc", "grpcs"):
        raise ValueError(
            f"target {target!r}: give HOST:PORT without a scheme ({rest.rstrip('/')!r}): TLS is set by the client, "
            "not the target"
        )


class _ClientBase:
    """What Client and AsyncClient share: the constructor, its settings and the repr."""

    def __init__(
        self,
        target: str,
        *,
        ca: PemSource,
        cert: PemSource,
        key: PemSource,
        token: str | TokenProvider | Callable[[], str] | None = None,
        server_name: str | None = None,
        timeout: float | None = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_s: float = 60.0,
        load_balancing: LoadBalancing = "pick_first",
    ) -> None:
        if load_balancing not in LOAD_BALANCING_POLICIES:
            raise ValueError(f"load_balancing {load_balancing!r}: expected one of {', '.join(LOAD_BALANCING_POLICIES)}")
        check_target(target)
        if "," in target and not server_name:
            raise ValueError(
                f"target {target!r} has several addresses: pass server_name, the name their certificate carries"
            )
        provider = as_token_provider(token)
        ca_pem, cert_pem, key_pem = _tls_material(ca=ca, cert=cert, key=key)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
        )
        if provider is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.metadata_call_credentials(_BearerAuth(provider))
            )
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 20000),
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})),
        ]
        if server_name:
            # Connect by IP but check the certificate for this name (and send it as :authority).
            options += [("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)]
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self._channel = self._open(target, credentials, options)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def _open(self, target: str, credentials: grpc.ChannelCredentials, options: list[tuple[str, Any]]) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    def _attempts(self, timeout: float | None, *, rerunnable: bool) -> _Attempts:
        return _Attempts(self.retry, self.timeout if timeout is None else timeout, rerunnable=rerunnable)


class Client(_ClientBase):
    """A synchronous gateway client over mutual TLS; a context manager that closes its channel."""

    def _open(self, target: str, credentials: grpc.ChannelCredentials, options: list[tuple[str, Any]]) -> Any:
        return grpc.secure_channel(target, credentials, options=options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(
        self, method: Any, request: Any, *, timeout: float | None, request_id: str | None, rerunnable: bool = False
    ) -> Any:
        """One unary call with typed errors and retries that never outlast the deadline, each attempt with the
        same request id (the caller's, or one made here): (response, trailers, attempts made)."""
        attempts = self._attempts(timeout, rerunnable=rerunnable)
        request_id = request_id or _new_request_id()
        while True:
            try:
                response, call = method.with_call(request, timeout=attempts.timeout(), metadata=_metadata(request_id))
                return response, call.trailing_metadata(), attempts.made
            except grpc.RpcError as exc:
                time.sleep(attempts.pause_after(exc))

    def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: str | int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> PredictResult:
        """Run one inference: a mapping of names to arrays, one array (one-input models), or a list of floats."""
        request = build_request(model, inputs, version=version)
        response, trailers, attempts = self._call(
            self._stub.Predict, request, timeout=timeout, request_id=request_id, rerunnable=True
        )
        return parse_response(response, _trailer(trailers, "x-request-id"), attempts)

    def predict_stream(
        self,
        requests: StreamItems,
        *,
        model: str | None = None,
        version: str | int | None = None,
        timeout: float | None = None,
        raise_errors: bool = True,
        request_id: str | None = None,
    ) -> Iterator[PredictResult]:
        """Results in request order over one stream. Items are StreamRequests, or inputs for ``model``.

        A failed message raises its typed error (``raise_errors``), or yields a result with ``error`` set.
        Every result and error carries the stream's ``request_id`` (the caller's, or one made here).
        """
        # The stream's request id is chosen here, not read from the trailers, so that every result and
        # in-band error carries it as it arrives (the server accepts a safe caller-chosen id).
        request_id = request_id or _new_request_id()
        messages = _Messages(requests, model, version)
        responses = self._stub.PredictStream(
            iter(messages), timeout=self.timeout if timeout is None else timeout, metadata=_metadata(request_id)
        )
        try:
            for reply in responses:
                yield _stream_result(reply, request_id, raise_errors=raise_errors)
        except grpc.RpcError as exc:
            raise messages.error(exc) from None
        finally:
            responses.cancel()  # a raised error or an abandoned iterator must not leave the stream open

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the caller may list."""
        response, _, _ = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout=timeout, request_id=None)
        return parse_models(response)

    def metadata(self, model: str, version: str | int | None = None, *, timeout: float | None = None) -> ModelMetadata:
        """A model version's signature."""
        request = pb.GetModelMetadataRequest(model_name=model, model_version="" if version is None else str(version))
        response, _, _ = self._call(self._stub.GetModelMetadata, request, timeout=timeout, request_id=None)
        return parse_metadata(response)


class AsyncClient(_ClientBase):
    """The same surface as Client, awaitable, on grpc.aio."""

    def _open(self, target: str, credentials: grpc.ChannelCredentials, options: list[tuple[str, Any]]) -> Any:
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def _call(
        self, method: Any, request: Any, *, timeout: float | None, request_id: str | None, rerunnable: bool = False
    ) -> Any:
        """See Client._call."""
        attempts = self._attempts(timeout, rerunnable=rerunnable)
        request_id = request_id or _new_request_id()
        while True:
            call = method(request, timeout=attempts.timeout(), metadata=_metadata(request_id))
            try:
                return await call, await call.trailing_metadata(), attempts.made
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.pause_after(exc))

    async def predict(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: str | int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> PredictResult:
        """Run one inference (see Client.predict)."""
        request = build_request(model, inputs, version=version)
        response, trailers, attempts = await self._call(
            self._stub.Predict, request, timeout=timeout, request_id=request_id, rerunnable=True
        )
        return parse_response(response, _trailer(trailers, "x-request-id"), attempts)

    async def predict_stream(
        self,
        requests: StreamItems | AsyncIterable[StreamRequest | Inputs],
        *,
        model: str | None = None,
        version: str | int | None = None,
        timeout: float | None = None,
        raise_errors: bool = True,
        request_id: str | None = None,
    ) -> AsyncIterator[PredictResult]:
        """Results in request order over one stream (see Client.predict_stream); ``requests`` is read lazily,
        an iterable or an async iterable."""
        request_id = request_id or _new_request_id()  # see Client.predict_stream
        messages = _Messages(requests, model, version)
        call = self._stub.PredictStream(
            aiter(messages), timeout=self.timeout if timeout is None else timeout, metadata=_metadata(request_id)
        )
        try:
            async for reply in call:
                yield _stream_result(reply, request_id, raise_errors=raise_errors)
        except grpc.RpcError as exc:
            raise messages.error(exc) from None
        except asyncio.CancelledError:
            # grpc.aio cancels the call when the request iterable raises, and reports a local cancellation.
            if messages.failure is None:
                raise
            raise messages.failure from None
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the caller may list."""
        response, _, _ = await self._call(
            self._stub.ListModels, pb.ListModelsRequest(), timeout=timeout, request_id=None
        )
        return parse_models(response)

    async def metadata(
        self, model: str, version: str | int | None = None, *, timeout: float | None = None
    ) -> ModelMetadata:
        """A model version's signature."""
        request = pb.GetModelMetadataRequest(model_name=model, model_version="" if version is None else str(version))
        response, _, _ = await self._call(self._stub.GetModelMetadata, request, timeout=timeout, request_id=None)
        return parse_metadata(response)
