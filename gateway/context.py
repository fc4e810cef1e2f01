"""Per-call values: the facts known at a call's entry (``Call``, frozen) and what the pipeline learned (``Outcome``).

Facts flow down, outcomes flow back: the call boundary makes the ``Call`` and alone records; the pipeline returns
the ``Outcome`` with its result, or lets the exception it raises carry it (``carry``/``carried``); a stream loop
yields each message's ``MessageOutcome`` with its reply. ``audit/record.py`` turns them into the record. Named
``call`` everywhere (``context`` is grpc's ServicerContext). Imports no grpc: every transport shares these.

These values, and the others made on every call's path (``tensors.WireTensor``, the pipeline's ``InferRequest``
and ``InferResult``, the audit chain's ``Head``), are named tuples: immutable as frozen dataclasses, and made about
four times faster (a frozen dataclass sets each field through ``object.__setattr__``).
"""

from __future__ import annotations

import contextvars
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from gateway.errors import GatewayError, ResourceExhaustedError

if TYPE_CHECKING:
    from gateway.auth.certs import PeerCertificate
    from gateway.auth.principal import Principal
    from gateway.tracing import CallTrace


def new_route_key() -> str:
    """A call's canary draw: random, so that no caller steers itself into or out of a canary by the request id
    it sends, and clients reusing request ids do not skew the share (docs/versions.md)."""
    return secrets.token_hex(8)


def new_request_id_and_route_key() -> tuple[str, str]:
    """A request id for a call whose caller sent none (or a malformed one), and its route key: one draw."""
    drawn = secrets.token_hex(24)
    return drawn[:32], drawn[32:]


def check_size(size: int, limit: int, *, what: str) -> None:
    """RESOURCE_EXHAUSTED when a message (``what``: "message", "response") of ``size`` bytes is over ``limit``."""
    if size > limit:
        raise ResourceExhaustedError(f"{what} of {size} bytes is over the limit of {limit}", reason=f"{what} too large")


class Call(NamedTuple):
    """What the gateway knows of one call at its entry (or of one message of a stream): who, how, since when."""

    request_id: str
    method: str
    peer: str
    started: float  # time.perf_counter() at entry: the record's latency is measured from here
    route_key: str  # new_route_key(): places the call in or out of a canary; its messages too
    trace: CallTrace | None = None  # with tracing on: the call's span, shared by its stream messages
    certificate: PeerCertificate | None = None  # the client's certificate, once inspected
    principal: Principal | None = None  # the authenticated caller, once admitted
    message_index: int | None = None  # a stream message's place in its stream
    max_reply_bytes: int | None = None  # the largest reply the boundary lets through (a stream checks each)

    def identified(self, certificate: PeerCertificate | None) -> Call:
        """This call with its client certificate known."""
        return self._with(self.started, certificate, self.principal, self.message_index)

    def admitted(self, principal: Principal | None, certificate: PeerCertificate | None) -> Call:
        """This call with its caller authenticated on ``certificate``."""
        return self._with(self.started, certificate, principal, self.message_index)

    def for_message(self, index: int) -> Call:
        """One message of this stream: the same caller, its own place and clock."""
        return self._with(time.perf_counter(), self.certificate, self.principal, index)

    def _with(
        self, started: float, certificate: PeerCertificate | None, principal: Principal | None, index: int | None
    ) -> Call:
        # Positional, not _replace: this is on every call's path (_replace costs several times as much).
        return Call(
            self.request_id,
            self.method,
            self.peer,
            started,
            self.route_key,
            self.trace,
            certificate,
            principal,
            index,
            self.max_reply_bytes,
        )

    def check_reply(self, size: int) -> None:
        """RESOURCE_EXHAUSTED for a stream reply the boundary would not let through: checked before the reply's
        outcome is yielded, so that its record says what the client gets (an in-band refusal, not the reply)."""
        if self.max_reply_bytes is not None:
            check_size(size, self.max_reply_bytes, what="response")


class Outcome(NamedTuple):
    """What the pipeline learned of a call: the model and version it is about, the policy's decision, the inputs
    as declared (audit/record.py's ``describe_inputs``), and whether the model ran (a refusal before the run is
    safe for the client to retry)."""

    action: str | None = None
    model: str | None = None
    requested_version: str | None = None
    version: str | None = None
    model_digest: str | None = None  # the resolved version's bytes (docs/model-signing.md)
    execution_provider: str | None = None  # the resolved version's ONNX Runtime provider (docs/providers.md)
    version_reason: str | None = None  # why that version: requested, default, pinned, canary (docs/versions.md)
    decision: str | None = None
    rule: str | None = None
    backend: Mapping[str, Any] | None = None  # a routed model's exchange with its backend (backends.route.Exchange)
    inputs: tuple[Mapping[str, Any], ...] = ()
    model_ran: bool = False

    def finished(self, inputs: tuple[Mapping[str, Any], ...], *, model_ran: bool) -> Outcome:
        """This outcome with what was learned after the decision."""
        return Outcome(
            self.action,
            self.model,
            self.requested_version,
            self.version,
            self.model_digest,
            self.execution_provider,
            self.version_reason,
            self.decision,
            self.rule,
            self.backend,
            inputs,
            model_ran,
        )


NO_OUTCOME = Outcome()


class MessageOutcome(NamedTuple):
    """One answered stream message, as its stream loop yields it to the boundary with its reply."""

    call: Call  # the message's own (``Call.for_message``)
    outcome: Outcome
    error: GatewayError | None  # what the reply refuses in-band; None: answered
    bytes_in: int
    bytes_out: int


class Answered(NamedTuple):
    """A handler's reply with the outcome the boundary records for it: a unary method's response (``outcome``
    an Outcome), or one reply of a stream (a MessageOutcome)."""

    reply: Any
    outcome: Outcome | MessageOutcome


_CARRIED = "gateway_outcome"


def carry(exc: BaseException, outcome: Outcome) -> None:
    """Let ``exc``, raised once a step had learned ``outcome``, take it up to the boundary that records it."""
    setattr(exc, _CARRIED, outcome)


def carried(exc: BaseException, default: Outcome = NO_OUTCOME) -> Outcome:
    """The outcome ``exc`` carries; ``default`` when it carries none (raised before anything was learned)."""
    outcome: Outcome = getattr(exc, _CARRIED, default)
    return outcome


# The generated servicers are called with (request, context) only: the boundary hands each its call's facts here.
# Read-only below the boundary; nothing flows back through it.
current_call: contextvars.ContextVar[Call] = contextvars.ContextVar("current_call")
