"""Server interceptors: the audit boundary (call context, one record per call, the one error boundary) and
authentication (client certificate checks + Bearer JWT, bound to the certificate per RFC 8705).

Order (server.py): audit wraps authentication, so refusals are audited. The audit interceptor swaps the
request deserializer for a pass-through and decodes inside its boundary, because grpcio would otherwise
refuse an undecodable message before any of our code runs, leaving no record.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog

from gateway.audit import AuditLog
from gateway.auth.certs import CrlStore, check_validity, inspect_peer
from gateway.auth.principal import Principal
from gateway.auth.verifier import MAX_TOKEN_BYTES, TokenVerifier
from gateway.context import CallContext, current_call, request_id_from
from gateway.errors import (
    AuthenticationError,
    CancelledError,
    GatewayError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
)
from gateway.executor import mark_unary

log = structlog.get_logger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"

Behavior = Callable[[Any, grpc.ServicerContext], Any]


def _behavior(handler: grpc.RpcMethodHandler) -> Behavior:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream  # type: ignore[no-any-return]


def _rebuild(handler: grpc.RpcMethodHandler, behavior: Behavior, *, deserializer: Any, serializer: Any) -> Any:
    """The same kind of handler with another behavior and (de)serializers."""
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return factory(behavior, request_deserializer=deserializer, response_serializer=serializer)


def _metadata_values(metadata: Sequence[tuple[str, str]] | None, key: str) -> list[str]:
    return [value for name, value in metadata or () if name == key]


def _request_id(metadata: Sequence[tuple[str, str]] | None) -> str:
    """The caller's safe ``x-request-id`` (the first one), else a new one."""
    return request_id_from(next(iter(_metadata_values(metadata, "x-request-id")), None))


# A server has a handful of methods; past this many names, the callers are inventing them (unknown methods reach
# the cache as authenticated refusals), and their wrappers are built per call rather than kept.
_MAX_CACHED_METHODS = 256


class _HandlerCache:
    """Wrapped handlers per method: built once, not on every call (the inner handler object is stable)."""

    def __init__(self, wrap: Callable[[str, Any], Any]) -> None:
        self._wrap = wrap
        self._entries: dict[str, tuple[Any, Any]] = {}

    def get(self, method: str, handler: Any) -> Any:
        entry = self._entries.get(method)
        if entry is None or entry[0] is not handler:
            entry = (handler, self._wrap(method, handler))
            if len(self._entries) < _MAX_CACHED_METHODS:
                self._entries[method] = entry  # a benign race: two threads may build the same wrapper once
        return entry[1]


def _status(error: GatewayError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


class AuditInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Creates the call context, decodes, turns exceptions into statuses, and writes exactly one record."""

    def __init__(
        self,
        *,
        audit: AuditLog,
        max_message_bytes: int,
        at_concurrency_limit: Callable[[], bool] = lambda: False,
        streams_full: Callable[[], bool] = lambda: False,
        exempt_prefixes: Sequence[str] = (HEALTH_PREFIX,),
    ) -> None:
        """``max_message_bytes`` is enforced here, so oversize refusals are audited; grpcio's own limit is a
        backstop set above it (server.py). ``at_concurrency_limit`` says whether grpcio is about to refuse the
        call being routed for its concurrency limit (it asks the interceptors first, then refuses).
        ``streams_full`` says whether every stream thread is taken (executor.py): a stream routed then is
        refused with RESOURCE_EXHAUSTED, from the unary pool, instead of waiting for a thread."""
        self._audit = audit
        self._max_message_bytes = max_message_bytes
        self._at_concurrency_limit = at_concurrency_limit
        self._streams_full = streams_full
        self._exempt = tuple(exempt_prefixes)
        # Calls routed to a handler vs calls that reached the boundary: the difference is what grpcio refused
        # in between (a message over its backstop limit, a client gone before its message arrived).
        self._counts = {"routed": 0, "handled": 0}
        self._counts_lock = threading.Lock()
        self._handlers = _HandlerCache(self._wrap)
        self._stream_refusals = _HandlerCache(self._refuse_stream)
        self._exempt_handlers = _HandlerCache(lambda _method, handler: _unary_in_unary_pool(handler))

    def counts(self) -> dict[str, int]:
        """Calls routed to an audited method, and calls that reached the audit boundary."""
        with self._counts_lock:
            return dict(self._counts, unobserved=self._counts["routed"] - self._counts["handled"])

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self._counts[key] += 1

    def record(self, call: CallContext, error: GatewayError | None) -> None:
        """Write the record for a call or stream message; raises UnavailableError when the sink is down."""
        if error is None:
            self._audit.write(call.audit_record(code="OK", reason=None))
            return
        # The precise reason goes to the operational log and the audit record, never to the caller.
        (log.error if isinstance(error, InternalError) else log.info)(
            "call_refused", request_id=call.request_id, method=call.method, code=error.code, reason=error.reason
        )
        self._audit.write(call.audit_record(code=error.code, reason=error.reason))

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        method: str = details.method  # type: ignore[attr-defined]
        if method.startswith(self._exempt):
            return self._exempt_handlers.get(method, continuation(details))
        handler = continuation(details)
        self._count("routed")
        if handler is not None and self._at_concurrency_limit():
            self._record_over_limit(method, details)
            return handler  # grpcio refuses it with RESOURCE_EXHAUSTED; no handler of ours will run
        if handler is None:
            return grpc.unary_unary_rpc_method_handler(
                mark_unary(self._unimplemented(method)), request_deserializer=None, response_serializer=None
            )
        if (handler.request_streaming or handler.response_streaming) and self._streams_full():
            return self._stream_refusals.get(method, handler)
        return self._handlers.get(method, handler)

    def _record_over_limit(self, method: str, details: grpc.HandlerCallDetails) -> None:
        self._count("handled")
        request_id = _request_id(details.invocation_metadata)  # type: ignore[attr-defined]
        # grpcio gives the routing step no peer; the record says so rather than guess.
        call = CallContext(request_id=request_id, method=method, peer="unknown")
        self.record_quietly(call, ResourceExhaustedError(reason="concurrent RPC limit"))

    def _wrap(self, method: str, handler: Any) -> Any:
        deserialize = handler.request_deserializer or (lambda raw: raw)
        serialize = handler.response_serializer or (lambda message: message)
        behavior = _behavior(handler)
        if handler.response_streaming:
            wrapped = self._stream_response(method, behavior, deserialize, serialize, handler)
        else:
            wrapped = self._unary_response(method, behavior, deserialize, serialize, handler)
            if not handler.request_streaming:
                mark_unary(wrapped)
        return _rebuild(handler, wrapped, deserializer=None, serializer=None)

    def _begin(self, method: str, context: grpc.ServicerContext) -> CallContext:
        self._count("handled")
        request_id = _request_id(context.invocation_metadata())
        call = CallContext(request_id=request_id, method=method, peer=context.peer())
        current_call.set(call)
        context.set_trailing_metadata((("x-request-id", request_id),))
        return call

    def _requests(self, raw: Any, call: CallContext, deserialize: Any, streaming: bool) -> Any:
        if not streaming:
            call.bytes_in = len(raw)
            self._check_size(len(raw))
            return _decode(deserialize, raw)

        def messages() -> Iterator[Any]:
            try:
                for index, item in enumerate(raw):
                    call.bytes_in += len(item)
                    self._check_size(len(item))
                    yield _decode(deserialize, item, index=index)
                # A cancel can end grpc's request iterator as if the client had closed its side, with the cancel
                # event right behind: yielding the GIL once lets grpc's poller handle it before the stream's record.
                time.sleep(0)
            except grpc.RpcError:  # grpc's request iterator fails this way when the client cancels or goes away
                raise CancelledError(reason="client cancelled the stream") from None

        return messages()

    def _check_size(self, size: int) -> None:
        if size > self._max_message_bytes:
            raise ResourceExhaustedError(
                f"message of {size} bytes is over the limit of {self._max_message_bytes}", reason="message too large"
            )

    def _finish(self, call: CallContext, error: GatewayError | None, context: grpc.ServicerContext) -> None:
        """Record the outcome, then fail the call if it failed or its record could not be written."""
        if error is None and not context.is_active():
            error = CancelledError(reason="client cancelled or deadline passed before the response")
        try:
            self.record(call, error)
        except GatewayError as exc:
            log.error("call_refused_audit_unavailable", request_id=call.request_id, method=call.method)
            error = exc
        if error is not None:
            if isinstance(error, UnavailableError) and not call.model_ran:
                context.set_trailing_metadata((("x-request-id", call.request_id), ("x-retry-safe", "true")))
            message = error.message
            if isinstance(error, InternalError):
                message = f"internal error (request id {call.request_id})"
            if not isinstance(error, CancelledError):
                context.abort(_status(error), message)

    def _unary_response(
        self, method: str, behavior: Behavior, deserialize: Any, serialize: Any, handler: Any
    ) -> Behavior:
        def audited(raw: Any, context: grpc.ServicerContext) -> Any:
            call = self._begin(method, context)
            out = None
            error = None
            try:
                request = self._requests(raw, call, deserialize, handler.request_streaming)
                out = serialize(behavior(request, context))
                call.bytes_out = len(out)
            except GatewayError as exc:
                error = exc
            except Exception as exc:
                error = _unexpected(exc, call)
            self._finish(call, error, context)
            return out

        return audited

    def _stream_response(
        self, method: str, behavior: Behavior, deserialize: Any, serialize: Any, handler: Any
    ) -> Behavior:
        def audited(raw: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = self._begin(method, context)
            call.event = "stream"
            error = None
            try:
                request = self._requests(raw, call, deserialize, handler.request_streaming)
                for message in behavior(request, context):
                    out = serialize(message)
                    call.bytes_out += len(out)
                    yield out
            except GeneratorExit:
                # grpc closes the generator when the client goes away: still exactly one record for the stream.
                self.record_quietly(call, CancelledError(reason="client cancelled the stream"))
                raise
            except GatewayError as exc:
                error = exc
            except Exception as exc:
                error = _unexpected(exc, call)
            self._finish(call, error, context)

        return audited

    def record_quietly(self, call: CallContext, error: GatewayError) -> None:
        """Record where no status can be sent any more (the client is gone)."""
        try:
            self.record(call, error)
        except GatewayError:
            log.error("audit_record_lost", request_id=call.request_id, method=call.method)

    def _refuse_stream(self, method: str, handler: Any) -> Any:
        def audited(raw: Any, context: grpc.ServicerContext) -> None:
            call = self._begin(method, context)
            call.event = "stream"
            error = ResourceExhaustedError(
                "the server is at its limit of open streams; retry later", reason="every stream thread is taken"
            )
            self._finish(call, error, context)

        return _rebuild(handler, mark_unary(audited), deserializer=None, serializer=None)

    def _unimplemented(self, method: str) -> Behavior:
        def audited(raw: Any, context: grpc.ServicerContext) -> None:
            call = self._begin(method, context)
            call.bytes_in = len(raw)
            self._finish(call, UnimplementedError(reason=f"unknown method {method}"), context)

        return audited


def _unary_in_unary_pool(handler: Any) -> Any:
    """An exempt unary handler (health Check) routed to the unary pool: a balancer's probe must not wait behind
    open streams. Streaming ones (health Watch) stay in the stream pool."""
    if handler is None or handler.request_streaming or handler.response_streaming:
        return handler
    inner = handler.unary_unary

    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        return inner(request, context)

    return _rebuild(
        handler,
        mark_unary(behavior),
        deserializer=handler.request_deserializer,
        serializer=handler.response_serializer,
    )


def _decode(deserialize: Any, raw: bytes, *, index: int | None = None) -> Any:
    try:
        return deserialize(raw)
    except Exception:
        where = "request" if index is None else f"stream message {index}"
        raise InvalidArgumentError(f"{where} is not a valid protobuf message") from None


def _unexpected(exc: Exception, call: CallContext) -> InternalError:
    log.error("call_failed_unexpectedly", request_id=call.request_id, method=call.method, exc_info=exc)
    return InternalError(reason=f"unexpected {type(exc).__name__}")


def _refuse_unknown_method(raw: Any, context: grpc.ServicerContext) -> None:
    raise UnimplementedError(reason=f"unknown method {current_call.get().method}")


_UNKNOWN_METHOD = grpc.unary_unary_rpc_method_handler(_refuse_unknown_method)


def bearer_token(values: Sequence[str]) -> str:
    """The token from exactly one ``authorization: Bearer <jwt>`` header (RFC 6750 section 2.1)."""
    if not values:
        raise AuthenticationError(reason="no authorization header")
    if len(values) > 1:
        raise AuthenticationError(reason="several authorization headers")
    value = values[0]
    if len(value) > MAX_TOKEN_BYTES:
        raise AuthenticationError(reason="authorization header too large")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        raise AuthenticationError(reason="authorization scheme is not Bearer")
    token = token.strip()
    if not token or " " in token:
        raise AuthenticationError(reason="malformed bearer token")
    return token


class AuthenticationInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Proves who is calling twice: the client certificate (checked per call) and a Bearer JWT bound to it."""

    def __init__(
        self,
        *,
        verifier: TokenVerifier,
        crl: CrlStore | None,
        require_certificate: bool = True,
        exempt_prefixes: Sequence[str] = (HEALTH_PREFIX,),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._verifier = verifier
        self._crl = crl
        self._require_certificate = require_certificate
        self._exempt = tuple(exempt_prefixes)
        self._clock = clock
        self._handlers = _HandlerCache(self._wrap)

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if method.startswith(self._exempt):
            return handler
        if handler is None:
            # Who asks comes first: an unauthenticated caller learns nothing, not even which methods exist.
            return self._wrap(method, _UNKNOWN_METHOD)
        return self._handlers.get(method, handler)

    def _wrap(self, method: str, handler: Any) -> Any:
        """The handler behind authentication; the request is decoded only once the caller is known."""
        behavior = _behavior(handler)
        deserialize = handler.request_deserializer or (lambda raw: raw)
        streaming = handler.request_streaming

        def authenticated(raw: Any, context: grpc.ServicerContext) -> Any:
            authorization = _metadata_values(context.invocation_metadata(), "authorization")
            self.authenticate(current_call.get(), context, authorization)
            if streaming:
                request = (_decode(deserialize, item, index=index) for index, item in enumerate(raw))
            else:
                request = _decode(deserialize, raw)
            return behavior(request, context)

        return _rebuild(handler, authenticated, deserializer=None, serializer=handler.response_serializer)

    def authenticate(self, call: CallContext, context: grpc.ServicerContext, authorization: Sequence[str]) -> None:
        """Fill ``call.principal`` or raise AuthenticationError; the certificate is checked before the token."""
        pems = context.auth_context().get("x509_pem_cert")
        x5t = None
        if pems:
            peer = inspect_peer(pems[0])
            call.cert_identity, call.cert_sha256 = peer.identity, peer.sha256_hex
            x5t = peer.x5t_s256
            # Connections outlive certificates (RFC 5280 validity is checked at the handshake only): re-check.
            check_validity(peer, datetime.fromtimestamp(self._clock(), UTC))
            if self._crl is not None:
                self._crl.check(peer)
        elif self._require_certificate:
            raise AuthenticationError(reason="no client certificate")
        token = self._verifier.verify(bearer_token(authorization), cert_x5t=x5t)
        call.principal = Principal(
            cert_identity=call.cert_identity or "",
            cert_sha256=call.cert_sha256 or "",
            subject=token.subject,
            issuer=token.issuer,
            token_id=token.token_id,
            groups=token.groups,
            scopes=token.scopes,
            token_bound=token.bound,
        )
