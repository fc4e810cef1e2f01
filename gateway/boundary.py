"""The call boundary: one wrapper around every audited handler, on the event loop, in the order a call needs.

Per call: take the call's facts (request id, peer, certificate, then the principal: one frozen ``Call``);
authenticate (certificate, then bearer token) and admit it against the limits, all BEFORE its message is read, so
an unauthenticated or over-limit caller is refused at once and holds nothing; read the message(s) with a bounded
wait; check size and decode; run the handler, which returns its outcome with its response (or raises an error
carrying it); turn exceptions into statuses; build and commit the audit record (the boundary alone records: a
stream's handler yields each message's outcome with its reply, committed here before that reply leaves); only
then let the response leave.

Every method is served as a client-streaming one with raw bytes in and out (the wire format of a unary request
is that of a one-message client stream): grpc would otherwise read a unary request before any of our code runs,
leaving a caller who never sends it holding the call, unauthenticated and unaudited. Unary methods still take
exactly one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import structlog

from gateway import logging as oplog
from gateway import metrics, tracing
from gateway.audit import AuditLog
from gateway.audit.record import build as build_record
from gateway.auth.authenticator import Authenticator
from gateway.auth.certs import PeerCertificate
from gateway.auth.principal import Principal
from gateway.auth.reasons import www_authenticate
from gateway.auth.verifier import UnknownKidError
from gateway.context import (
    NO_OUTCOME,
    Answered,
    Call,
    MessageOutcome,
    Outcome,
    carried,
    check_size,
    current_call,
    new_request_id_and_route_key,
    new_route_key,
)
from gateway.deadlines import Deadlines
from gateway.errors import (
    AuthenticationError,
    CancelledError,
    DeadlineExceededError,
    GatewayError,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
    error_for_code,
    sent_message,
)
from gateway.identifiers import ID, shown
from gateway.limits import Admission, CallerKey, RefusalLimit, Slot
from gateway.tracing import Tracing

log = structlog.get_logger(__name__)

# Where per-call metrics are off: a timer that times nothing (a prometheus_client timer costs ~7x as much).
_UNMETERED = contextlib.nullcontext()
# How long a call whose token names an unknown kid waits for the key refetch (itself bounded by its timeouts).
_KEY_REFRESH_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """How large a message may be, and how long the boundary waits for one."""

    max_message_bytes: int
    message_timeout_s: float  # for the request of a unary method
    stream_idle_timeout_s: float  # for each next message of a stream
    max_call_s: float = 60.0  # a call with a unary response, from its start to its answer
    max_stream_s: float = 3600.0  # a stream (or a client-streaming call), from its start to its end


@dataclass(frozen=True, slots=True)
class _Method:
    """What the boundary keeps of one generated method handler."""

    name: str
    behavior: Callable[..., Any]
    deserialize: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]
    request_streaming: bool
    response_streaming: bool


class _CallState:
    """What the boundary tracks of one call while it runs, written by the boundary alone (no other module sees it):
    the call's facts as far as known, the outcome its handler returned, the sizes, the stream messages recorded,
    the capacity it holds."""

    __slots__ = ("bytes_in", "bytes_out", "call", "messages", "outcome", "request_id_header", "slot")

    def __init__(self, call: Call, *, stream: bool, request_id_header: str | None) -> None:
        self.call = call
        self.request_id_header = request_id_header  # the caller's x-request-id, checked once the caller is known
        self.outcome = NO_OUTCOME
        self.bytes_in = 0
        self.bytes_out = 0
        self.messages: int | None = 0 if stream else None  # a stream's count of its messages' records
        self.slot: Slot | None = None

    def release(self) -> None:
        """Give back the capacity the call held."""
        if self.slot is not None:
            self.slot.release()


class Recorder:
    """Writes the audit record of a call or stream message, and logs refusals (reason never sent to callers)."""

    def __init__(self, audit: AuditLog, *, metered: bool = True, refusals: RefusalLimit | None = None) -> None:
        """``metered=False``: no per-call metrics (nothing would serve them, see ``metrics.recording``).
        ``refusals``: where each refusal recorded is counted against its caller."""
        self._audit = audit
        self._metered = metered
        self.refusals = refusals
        self.methods: frozenset[str] = frozenset()  # the methods served: any other name is no metric label

    async def record(
        self,
        call: Call,
        outcome: Outcome,
        error: GatewayError | None,
        *,
        event: str = "call",
        bytes_in: int = 0,
        bytes_out: int = 0,
        messages: int | None = None,
        alone: bool = False,
    ) -> None:
        """Commit the record, then count the call in the metrics (with the audit failure, when that is how the
        call ends); raises UnavailableError when the sink is down (the call must then fail). ``alone``: no other
        call is in flight, so no other record can share its audit group: committed without waiting for one."""
        if error is not None:
            (log.error if isinstance(error, InternalError) else log.info)(
                "call_refused", request_id=call.request_id, method=call.method, code=error.code, reason=error.reason
            )
            # Counted before the commit is awaited: the other calls of the caller see its block the sooner.
            # A backend's status (its reload window, a method it lacks) is not the caller's doing: not counted.
            refusals = None if error.from_backend else self.refusals
            if refusals is not None and refusals.note(caller_key(call), error.code):
                log.warning(
                    "caller_blocked",
                    request_id=call.request_id,
                    cert_identity=call.certificate.identity if call.certificate else None,
                    sub=call.principal.subject if call.principal else None,
                )
        code, reason = ("OK", None) if error is None else (error.code, error.reason)
        tracing.note_outcome(call, code)  # before the commit: a call whose record is lost still ended so
        entry = build_record(
            call,
            outcome,
            event=event,
            code=code,
            reason=reason,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            messages=messages,
        )
        try:
            if self._metered or call.trace is not None:
                timer = metrics.AUDIT_COMMIT_SECONDS.time() if self._metered else _UNMETERED
                with timer, tracing.span(call, "gateway.audit.commit"):
                    await self._audit.append(entry, alone=alone)
            else:  # neither timed nor traced: no context managers on every call's path
                await self._audit.append(entry, alone=alone)
        except GatewayError as exc:
            self._observe(call, outcome, event, exc)
            raise
        self._observe(call, outcome, event, error)

    def _observe(self, call: Call, outcome: Outcome, event: str, error: GatewayError | None) -> None:
        if self._metered and event != "stream_message":  # a stream is counted once, as a call
            method = call.method if call.method in self.methods else metrics.NONE
            metrics.observe_call(method=method, started=call.started, outcome=outcome, error=error)

    async def record_quietly(self, state: _CallState, error: GatewayError) -> None:
        """Record where no status can be sent any more (the client is gone)."""
        try:
            await self.record_call(state, error)
        except GatewayError:
            log.error("audit_record_lost", request_id=state.call.request_id, method=state.call.method)

    async def record_call(self, state: _CallState, error: GatewayError | None, *, alone: bool = False) -> None:
        """The record of the call itself (a unary call's, or a stream's closing one)."""
        await self.record(
            state.call,
            state.outcome,
            error,
            event="call" if state.messages is None else "stream",
            bytes_in=state.bytes_in,
            bytes_out=state.bytes_out,
            messages=state.messages,
            alone=alone,
        )

    async def record_message(self, state: _CallState, message: MessageOutcome, *, alone: bool = False) -> None:
        """The record of one stream message, counted in its stream's once committed. The stream takes the message's
        action and whether it ran first: a stream whose record of a message that ran is lost is not safe to retry."""
        state.outcome = _joined(state.outcome, message.outcome)
        await self.record(
            message.call,
            message.outcome,
            message.error,
            event="stream_message",
            bytes_in=message.bytes_in,
            bytes_out=message.bytes_out,
            alone=alone,
        )
        state.messages = (state.messages or 0) + 1


def _joined(stream: Outcome, message: Outcome) -> Outcome:
    """A stream's outcome with one more message's: the action its messages took, and whether any ran the model."""
    action = message.action or stream.action
    ran = stream.model_ran or message.model_ran
    if action == stream.action and ran == stream.model_ran:
        return stream
    return Outcome(action=action, model_ran=ran)


def caller_key(call: Call) -> CallerKey | None:
    """Whom the call's refusals count against: its principal once known, else its certificate (None: neither)."""
    principal = call.principal
    if principal is not None:
        return ("principal", principal.issuer, principal.subject)
    if call.certificate is not None:
        return ("certificate", call.certificate.sha256_hex)
    return None


def _metadata_values(metadata: Sequence[tuple[str, Any]] | None, key: str) -> list[str]:
    return [value for name, value in metadata or () if name == key]


def _request_id_header(metadata: Sequence[tuple[str, Any]]) -> str | None:
    """The caller's ``x-request-id``, None when absent or empty."""
    return next(iter(_metadata_values(metadata, "x-request-id")), None) or None


def _decode(deserialize: Callable[[bytes], Any], raw: bytes, *, index: int | None = None) -> Any:
    try:
        return deserialize(raw)
    except Exception:
        where = "request" if index is None else f"stream message {index}"
        raise InvalidArgumentError(f"{where} is not a valid protobuf message") from None


def _unexpected(exc: BaseException, call: Call) -> InternalError:
    log.error("call_failed_unexpectedly", request_id=call.request_id, method=call.method, exc_info=exc)
    return InternalError(reason=f"unexpected {type(exc).__name__}")


def _status(error: GatewayError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


class CallBoundary:
    """Wraps handlers so that every call goes through the steps in the module docstring, in that order."""

    def __init__(
        self,
        *,
        recorder: Recorder,
        authenticator: Authenticator | None,
        admission: Admission,
        limits: MessageLimits,
        tracing: Tracing,
        metered: bool = True,
    ) -> None:
        """``authenticator=None`` is the dev_no_auth mode: calls are admitted without a caller. ``metered=False``:
        no per-call metrics (nothing would serve them, see ``metrics.recording``)."""
        self.recorder = recorder
        self._metered = metered
        self._tracing = tracing
        self._authenticator = authenticator
        self._admission = admission
        self._limits = limits
        self._max_reply_bytes = limits.max_message_bytes
        # What a call (or a stream) past its time cap is refused with, naming the setting: made only when a cap
        # fires, not one exception per call.
        self._call_cap = functools.partial(_past_cap, limits.max_call_s, "limits.max_call_s", "call time limit")
        self._stream_cap = functools.partial(_past_cap, limits.max_stream_s, "limits.max_stream_s", "stream time limit")
        self._deadlines = Deadlines(_not_received)  # every wait of a call bounded, without a timer each
        self._active = 0  # handlers running, from their first step to their record: shutdown waits for them
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_left = 0.0  # loop time the last handler ended: its answer may still be on its way out
        self._closing = False

    def close(self) -> None:
        """Refuse every call from now on, as UNAVAILABLE marked safe to retry (the shutdown, past its drain)."""
        self._closing = True

    async def wait_delivered(self, timeout_s: float, flush_s: float) -> bool:
        """Wait until no handler is running, then until ``flush_s`` after the last one ended, so that its answer
        can reach the client before grpc closes the connection (a close while the client still sends, e.g. its
        flow-control pings, resets the connection and loses what it had not yet read). False after ``timeout_s``."""
        if not await self.wait_idle(timeout_s):
            return False
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._last_left + flush_s - loop.time()))
        return True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no handler is running (each has committed its record); False after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _enter(self) -> None:
        self._active += 1
        self._idle.clear()
        if self._metered:
            metrics.IN_FLIGHT.inc()

    def _leave(self) -> None:
        # The request id set by _enter_call: cleared with the call, so no later line in this context claims it.
        oplog.request_id.set(None)
        self._active -= 1
        if self._metered:
            metrics.IN_FLIGHT.dec()
        self._last_left = asyncio.get_running_loop().time()
        if not self._active:
            self._idle.set()

    # ------------------------------------------------------------------------------------------------ handlers

    def generic_handler(self, services: Mapping[str, Mapping[str, grpc.RpcMethodHandler]]) -> grpc.GenericRpcHandler:
        """One generic handler serving every method of ``services`` (by service name) through the boundary, and
        refusing any other method after authentication (an unauthenticated caller learns nothing of them)."""
        wrapped = {
            f"/{service}/{name}": self._wrap(_method(f"/{service}/{name}", handler))
            for service, handlers in services.items()
            for name, handler in handlers.items()
        }
        self.recorder.methods = frozenset(wrapped)
        return _Routes(wrapped, self._unknown)

    def _wrap(self, method: _Method) -> grpc.RpcMethodHandler:
        if method.response_streaming:

            async def stream_response(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
                # Closed here, not by the garbage collector, when grpc stops iterating (the client went away):
                # the stream's slot and its record must not wait for a collection.
                async with contextlib.aclosing(self._serve_stream(method, context)) as outs:
                    async for out in outs:
                        yield out

            return grpc.stream_stream_rpc_method_handler(stream_response)

        return grpc.stream_unary_rpc_method_handler(functools.partial(self._serve_unary, method))

    def _unknown(self, name: str) -> grpc.RpcMethodHandler:
        async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
            self._enter()
            # An unknown method's name is the caller's choice, up to the metadata limit: recorded as shown.
            state, metadata = self._begin(shown(name), context, stream=False, traced_as=_UNKNOWN_METHOD)
            error: GatewayError = UnimplementedError(reason=f"unknown method {state.call.method}")
            try:
                try:
                    await self._admit(state, metadata, peer_pem=_peer_pem(context), stream=False)
                except GatewayError as exc:
                    error = exc
                await self._finish(state, error, context)
            finally:
                state.release()
                self._leave()

        return grpc.stream_unary_rpc_method_handler(refuse)

    # ------------------------------------------------------------------------------------------------ per call

    def _begin(
        self, method: str, context: grpc.aio.ServicerContext, *, stream: bool, traced_as: str | None = None
    ) -> tuple[_CallState, Sequence[Any]]:
        """The call's facts known at its entry, and its metadata (read once); the request id also goes back in
        the trailer. ``traced_as``: the name its span gets instead of ``method`` (which an unknown method's caller
        chose)."""
        metadata = context.invocation_metadata() or ()
        state = self._enter_call(method, peer=context.peer(), metadata=metadata, stream=stream, traced_as=traced_as)
        context.set_trailing_metadata((("x-request-id", state.call.request_id),))
        return state, metadata

    def _enter_call(
        self, method: str, *, peer: str, metadata: Sequence[Any], stream: bool, traced_as: str | None = None
    ) -> _CallState:
        """The call's facts known at its entry, whatever its transport. A malformed ``x-request-id`` is replaced
        here and refused by ``_admit``: it must not reach the record, the logs or a response header."""
        header = _request_id_header(metadata)
        if header is not None and ID.allows(header):
            request_id, route_key = header, new_route_key()
        else:
            request_id, route_key = new_request_id_and_route_key()
        trace = self._tracing.start_call(traced_as or method, metadata, request_id)
        call = Call(
            request_id, method, peer, time.perf_counter(), route_key, trace, max_reply_bytes=self._max_reply_bytes
        )
        oplog.request_id.set(request_id)
        return _CallState(call, stream=stream, request_id_header=header)

    async def _admit(self, state: _CallState, metadata: Sequence[Any], *, peer_pem: bytes | None, stream: bool) -> None:
        """Authenticate, then take the principal's and the server's capacity (``state.slot``); the call's
        facts in ``state`` gain its certificate, then its principal.

        The certificate's identity is taken first, whatever follows: it costs one cached lookup, and with it every
        record names its peer, those of the drain's refusals (issue 27 item 8) and of a blocked caller included. A
        caller blocked for its refusals is refused before its token is verified, when its certificate is blocked
        (unless its token was verified before, on that certificate), or right after, when its principal is."""
        authenticator = self._authenticator
        refusals = self.recorder.refusals
        if authenticator is not None:
            peer = authenticator.inspect(peer_pem)  # AuthenticationError: unfit for a client
            authorization = _metadata_values(metadata, "authorization")
            principal = None if self._closing else authenticator.remembered(peer, authorization)
            if principal is None:  # from here every refusal's record names the certificate
                state.call = state.call.identified(peer)
                if self._closing:
                    raise UnavailableError("the gateway is shutting down", reason="shutting down")
                # A certificate blocked for its token-less refusals is refused before a token is verified, unless
                # the call carries a verdict still remembered for it: many principals may share one certificate (a
                # proxy with unbound tokens), and one of them must not lock the others out.
                if refusals is not None:
                    refusals.check(caller_key(state.call))
            with (
                metrics.AUTH_SECONDS.time() if self._metered else _UNMETERED,
                tracing.span(state.call, "gateway.authenticate"),
            ):
                if principal is None:  # else the verdict of an earlier call still holds: no second lookup
                    principal = await self._authenticate(authenticator, peer, authorization)
            state.call = state.call.admitted(principal, peer)  # the certificate too, where a verdict was remembered
        elif self._closing:
            raise UnavailableError("the gateway is shutting down", reason="shutting down")
        if state.request_id_header is not None:  # checked once the caller is known: a caller without a token
            ID.check(state.request_id_header, "x-request-id header")  # learns nothing more
        principal = state.call.principal
        if principal is not None and refusals is not None:
            refusals.check(caller_key(state.call))
        state.slot = self._admission.admit(
            (principal.issuer, principal.subject) if principal is not None else None, stream=stream
        )

    @staticmethod
    async def _authenticate(
        authenticator: Authenticator, peer: PeerCertificate | None, authorization: Sequence[str]
    ) -> Principal:
        """The bearer token, bound to the certificate ``peer``: the caller's principal, or AuthenticationError."""
        try:
            return authenticator.authenticate(peer, authorization)
        except UnknownKidError:
            # The issuer may have rotated its keys: wait, bounded, for the one shared and rate-limited refetch
            # (in its own thread: the loop keeps serving), then verify once more. Still unknown: refused.
            refresh = authenticator.refresh_keys()
            if refresh is None or not await _finished(refresh, _KEY_REFRESH_WAIT_S):
                raise
            return authenticator.authenticate(peer, authorization)

    def _check_size(self, size: int, *, what: str = "message") -> None:
        check_size(size, self._limits.max_message_bytes, what=what)

    async def _request(self, method: _Method, state: _CallState, context: grpc.aio.ServicerContext) -> Any:
        """The one request of a unary method, then the end of the request: nothing may follow it, and that is known
        before the handler runs (a refused call runs no model, issue 27 item 10). Both reads within one bound of
        ``limits.message_timeout_s``, whose error names the read it was waiting for."""
        timeout_s = self._limits.message_timeout_s
        waiting_for = ["request message"]
        raw = await self._deadlines.within(
            self._read_request(state, context, waiting_for),
            timeout_s,
            "request",
            expired_error=lambda: _not_received(waiting_for[0], timeout_s),
        )
        return _decode(method.deserialize, raw)

    async def _read_request(
        self, state: _CallState, context: grpc.aio.ServicerContext, waiting_for: list[str]
    ) -> bytes:
        raw = await context.read()
        if raw is grpc.aio.EOF:
            if _deadline_passed(context):  # grpc ends the request stream when the deadline passes
                raise _deadline_exceeded()
            # grpc reports a message over its own limit (twice ours) as the end of the stream: the client then
            # gets grpc's RESOURCE_EXHAUSTED, and the record must say the same.
            raise ResourceExhaustedError(
                "no request message, or one over the size limit",
                reason="no request message (none sent, or over grpc's size limit)",
            )
        state.bytes_in = len(raw)
        self._check_size(len(raw))
        # The client sends its half-close with the message (or right after it): this costs no round trip.
        waiting_for[0] = "end of the request"
        if await context.read() is not grpc.aio.EOF:
            raise InvalidArgumentError("a unary method takes exactly one request message")
        return raw  # type: ignore[no-any-return]

    async def _requests(self, method: _Method, state: _CallState, context: grpc.aio.ServicerContext) -> Any:
        """The messages of a stream, each waited for at most the idle timeout; RESOURCE_EXHAUSTED at the first one
        that comes while its caller is blocked for its refusals."""
        refusals = self.recorder.refusals
        index = 0
        while True:
            raw = await self._deadlines.within(context.read(), self._limits.stream_idle_timeout_s, "stream message")
            if raw is grpc.aio.EOF:
                # grpcio reports a cancel (the client's, or its own for a message over its size limit) both as the
                # end of the request stream and as a cancellation of this task, in two events that may come one
                # loop turn apart: one turn lets the second land before an OK is recorded (docs/audit.md).
                await asyncio.sleep(0)
                if _deadline_passed(context):
                    raise _deadline_exceeded()
                return
            state.bytes_in += len(raw)
            self._check_size(len(raw))
            if refusals is not None:  # ended at its next message once its caller is blocked (issue 27 item 9)
                refusals.check(caller_key(state.call))
            yield _decode(method.deserialize, raw, index=index)
            index += 1

    async def _serve_unary(self, method: _Method, _requests: Any, context: grpc.aio.ServicerContext) -> bytes | None:
        """One call with a unary response (its messages are read from ``context``, not from ``_requests``)."""
        self._enter()
        state, metadata = self._begin(method.name, context, stream=False)
        try:
            error: GatewayError | None = None
            out = None
            try:
                cap_s, cap = self._time_cap(stream=method.request_streaming)
                served = self._serve_call(method, state, context, metadata)
                out = await self._deadlines.within(served, cap_s, "response", expired_error=cap)
            except BaseException as exc:
                state.outcome = carried(exc, state.outcome)
                error = await self._failed(state, context, exc)
            await self._finish(state, error, context)
            return out
        finally:
            state.release()
            self._leave()

    async def _serve_call(
        self, method: _Method, state: _CallState, context: grpc.aio.ServicerContext, metadata: Sequence[Any]
    ) -> bytes:
        """A call with a unary response, from admission to its encoded answer."""
        await self._admit(state, metadata, peer_pem=_peer_pem(context), stream=method.request_streaming)
        current_call.set(state.call)
        if method.request_streaming:
            request = self._requests(method, state, context)
        else:
            request = await self._request(method, state, context)
        response = await method.behavior(request, context)
        if type(response) is Answered:
            state.outcome, response = response.outcome, response.reply  # type: ignore[assignment]
        out: bytes = method.serialize(response)
        state.bytes_out = len(out)
        self._check_size(len(out), what="response")
        return out

    def _time_cap(self, *, stream: bool) -> tuple[float, Callable[[], DeadlineExceededError]]:
        """How long a call (or a stream) may last, and what makes the error past it."""
        if stream:
            return self._limits.max_stream_s, self._stream_cap
        return self._limits.max_call_s, self._call_cap

    async def _serve_stream(self, method: _Method, context: grpc.aio.ServicerContext) -> AsyncGenerator[bytes, None]:
        self._enter()
        state, metadata = self._begin(method.name, context, stream=True)
        try:
            error: GatewayError | None = None
            try:
                # Every wait of the stream is bounded by what is left of its time (issue 27, E11), but for that of
                # grpc sending a reply (at a yield), which the client's flow control and keepalive bound.
                loop = asyncio.get_running_loop()
                cap_s, cap = self._time_cap(stream=True)
                ends = loop.time() + cap_s
                admitted = self._admit(state, metadata, peer_pem=_peer_pem(context), stream=True)
                await self._deadlines.within(admitted, cap_s, "admission", expired_error=cap)
                current_call.set(state.call)
                if method.request_streaming:
                    request = self._requests(method, state, context)
                else:
                    request = await self._deadlines.within(
                        self._request(method, state, context), ends - loop.time(), "request", expired_error=cap
                    )
                replies = 0
                behavior = aiter(method.behavior(request, context))
                while True:
                    left_s = ends - loop.time()
                    if left_s <= 0:
                        raise cap()
                    try:
                        reply = await self._deadlines.within(anext(behavior), left_s, "reply", expired_error=cap)
                    except StopAsyncIteration:
                        break
                    answered = reply.outcome if type(reply) is Answered else None
                    out = method.serialize(reply.reply if answered is not None else reply)
                    self._check_size(len(out), what="response")
                    state.bytes_out += len(out)
                    if not isinstance(answered, MessageOutcome):
                        # A library's handler (reflection) says nothing of its replies: none leaves unrecorded.
                        answered = MessageOutcome(state.call.for_message(replies), NO_OUTCOME, None, 0, len(out))
                    await self.recorder.record_message(state, answered, alone=self._active == 1)
                    replies += 1
                    yield out
            except BaseException as exc:
                error = await self._failed(state, context, exc)
            await self._finish(state, error, context)
        finally:
            state.release()
            self._leave()

    async def _failed(self, state: _CallState, context: grpc.aio.ServicerContext, exc: BaseException) -> GatewayError:
        """The error to answer ``exc`` with; a call already ended under its handler (cancelled, deadline, client
        gone, or aborted by a library's handler) is recorded here and ``exc`` raised again."""
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, asyncio.CancelledError | GeneratorExit | grpc.aio.AbortError):
            ended = _aborted(context) if isinstance(exc, grpc.aio.AbortError) else _ended_early(context)
            await self.recorder.record_quietly(state, ended)
            tracing.end_call(state.call)
            raise exc
        if isinstance(exc, Exception):
            return _unexpected(exc, state.call)
        raise exc  # KeyboardInterrupt, SystemExit: not a call's failure

    async def _finish(self, state: _CallState, error: GatewayError | None, context: grpc.aio.ServicerContext) -> None:
        """Record the outcome and end the call's span, then fail the call if it failed or its record could not be
        written."""
        call = state.call
        error = await self._record_end(state, error)
        if error is None:
            return
        trailers = [("x-request-id", call.request_id)]
        if _retry_safe(state, error):
            trailers.append(("x-retry-safe", "true"))
        challenge = www_authenticate(error.reason) if isinstance(error, AuthenticationError) else None
        if challenge is not None:  # RFC 6750 3: what is wrong with the token, as an HTTP resource server says it
            trailers.append(("www-authenticate", challenge))
        if len(trailers) > 1:
            context.set_trailing_metadata(tuple(trailers))
        await context.abort(_status(error), sent_message(error, call.request_id))

    async def _record_end(self, state: _CallState, error: GatewayError | None) -> GatewayError | None:
        """Commit the call's record and end its span; the error to answer with (the audit sink's, when the record
        could not be written)."""
        call = state.call
        try:
            await self.recorder.record_call(state, error, alone=self._active == 1)
        except GatewayError as exc:
            log.error("call_refused_audit_unavailable", request_id=call.request_id, method=call.method)
            error = exc
            tracing.note_outcome(call, exc.code)
        tracing.end_call(call)
        return error

    # ------------------------------------------------------------------------------------- other transports

    async def serve_request(
        self,
        method: str,
        *,
        peer: str,
        peer_pem: bytes | None,
        metadata: Sequence[tuple[str, str]],
        read: Callable[[], Awaitable[bytes]],
        answer: Callable[[Call, bytes], Awaitable[Answered]],
        size: Callable[[Any], int],
    ) -> Served:
        """One call of a transport other than grpc (the REST binding), through the steps of a unary gRPC call:
        its facts; authentication and admission before its body is read (``read``, waited for at most
        ``limits.message_timeout_s``, then held to ``limits.max_message_bytes``); ``answer``, which returns its
        reply (of ``size`` bytes) with the outcome; one record. The transport turns what it returns into its
        answer (``metadata``: its headers, lower-cased names, for the token, the request id and traceparent)."""
        self._enter()
        state = self._enter_call(method, peer=peer, metadata=metadata, stream=False)
        body_read = False

        async def served() -> Any:
            nonlocal body_read
            await self._admit(state, metadata, peer_pem=peer_pem, stream=False)
            current_call.set(state.call)
            body = await self._deadlines.within(read(), self._limits.message_timeout_s, "request body")
            body_read = True
            state.bytes_in = len(body)
            self._check_size(len(body))
            answered = await answer(state.call, body)
            if isinstance(answered.outcome, Outcome):  # a unary answer's always is
                state.outcome = answered.outcome
            state.bytes_out = size(answered.reply)
            self._check_size(state.bytes_out, what="response")
            return answered.reply

        try:
            error: GatewayError | None = None
            reply = None
            try:
                cap_s, cap = self._time_cap(stream=False)
                reply = await self._deadlines.within(served(), cap_s, "response", expired_error=cap)
            except BaseException as exc:
                state.outcome = carried(exc, state.outcome)
                error = await self._refused(state, exc)
            error = await self._record_end(state, error)
            retry_safe = error is not None and _retry_safe(state, error)
            return Served(state.call, reply, error, retry_safe=retry_safe, body_read=body_read)
        finally:
            state.release()
            self._leave()

    async def _refused(self, state: _CallState, exc: BaseException) -> GatewayError:
        """The error to answer ``exc`` with, outside grpc; a cancelled call (its connection closed, or the
        shutdown) is recorded here and ``exc`` raised again."""
        if isinstance(exc, GatewayError):
            return exc
        if isinstance(exc, asyncio.CancelledError):
            await self.recorder.record_quietly(state, CancelledError(reason="connection closed before the answer"))
            tracing.end_call(state.call)
            raise exc
        if isinstance(exc, Exception):
            return _unexpected(exc, state.call)
        raise exc


@dataclass(frozen=True, slots=True)
class Served:
    """How a call of another transport ended (``CallBoundary.serve_request``): its facts, and its reply or the
    error to answer with (recorded either way), whether retrying it is safe, whether its whole body was read."""

    call: Call
    reply: Any
    error: GatewayError | None
    retry_safe: bool
    body_read: bool


def _retry_safe(state: _CallState, error: GatewayError) -> bool:
    """UNAVAILABLE before the model ran (draining, audit sink down): the client may send the call again."""
    return isinstance(error, UnavailableError) and not state.outcome.model_ran


_UNKNOWN_METHOD = "/unknown/method"


def _peer_pem(context: grpc.aio.ServicerContext) -> bytes | None:
    """The client certificate grpc's handshake verified, as PEM."""
    pems = context.auth_context().get("x509_pem_cert")
    return pems[0] if pems else None


def _past_cap(cap_s: float, key: str, reason: str) -> DeadlineExceededError:
    return DeadlineExceededError(f"the call ran past the server's limit of {cap_s:g} s ({key})", reason=reason)


async def _finished(work: Future[None], timeout_s: float) -> bool:
    """Whether ``work`` (running in another thread) ends within ``timeout_s``; it is never cancelled here, since
    other calls may be waiting for it too."""
    done, _ = await asyncio.wait({asyncio.wrap_future(work)}, timeout=timeout_s)
    return bool(done)


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _deadline_exceeded() -> DeadlineExceededError:
    return DeadlineExceededError(reason="deadline passed before the response")


def _ended_early(context: grpc.aio.ServicerContext) -> GatewayError:
    """Why a call was cancelled under its handler: its deadline passed, or the client went away (or grpc ended it)."""
    if _deadline_passed(context):
        return _deadline_exceeded()
    # grpc also cancels a call itself for a message over its own size limit (twice ours); the client then gets
    # RESOURCE_EXHAUSTED from grpc, and grpcio tells the two cases apart to no handler.
    return CancelledError(reason="client cancelled, or grpc refused a message over its size limit")


def _not_received(what: str, timeout_s: float) -> DeadlineExceededError:
    return DeadlineExceededError(f"no {what} within {timeout_s:g} s", reason=f"{what} not received in time")


def _aborted(context: grpc.aio.ServicerContext) -> GatewayError:
    """A handler of a library (reflection) that aborted on its own: recorded with the status it chose."""
    code = context.code()
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return error_for_code(name, "aborted by the handler")


def _method(name: str, handler: grpc.RpcMethodHandler) -> _Method:
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream  # type: ignore[attr-defined]
    )
    return _Method(
        name=name,
        behavior=behavior,
        deserialize=handler.request_deserializer or (lambda raw: raw),  # type: ignore[attr-defined]
        serialize=handler.response_serializer or (lambda message: message),  # type: ignore[attr-defined]
        request_streaming=handler.request_streaming,  # type: ignore[attr-defined]
        response_streaming=handler.response_streaming,  # type: ignore[attr-defined]
    )


class _Routes(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Method name -> wrapped handler; any other name gets the refusal for unknown methods."""

    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler], unknown: Callable[[str], Any]) -> None:
        self._handlers = handlers
        self._unknown = unknown

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        handler = self._handlers.get(method)
        return handler if handler is not None else self._unknown(method)


class HandlerCollector:
    """Stands in for a server in the generated ``add_*Servicer_to_server`` functions, to collect their handlers
    (by service, then method name) so that the boundary can wrap them."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        """The generated code registers the same handlers twice; the named registration is the one kept."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Keep the handlers of ``service``."""
        self.services[service] = dict(handlers)
