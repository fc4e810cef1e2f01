"""Per-call state: request id, peer, identity, principal and the audit fields filled as the call progresses.

Named ``call`` everywhere (``context`` is grpc's ServicerContext). Set by the call boundary, reachable
through ``current_call`` by code that is not handed it explicitly.
"""

from __future__ import annotations

import contextvars
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from gateway.auth.principal import Principal
from gateway.errors import ResourceExhaustedError
from gateway.tensors import WireTensor

if TYPE_CHECKING:
    from gateway.tracing import CallTrace


def new_request_id() -> str:
    """A request id for a call whose caller sent none (or a malformed one)."""
    return secrets.token_hex(16)


def check_size(size: int, limit: int, *, what: str) -> None:
    """RESOURCE_EXHAUSTED when a message (``what``: "message", "response") of ``size`` bytes is over ``limit``."""
    if size > limit:
        raise ResourceExhaustedError(f"{what} of {size} bytes is over the limit of {limit}", reason=f"{what} too large")


class Recorder(Protocol):
    """Commits the audit record of a call or of one stream message (raises UnavailableError when it cannot)."""

    async def record(self, call: CallContext, error: Any) -> None: ...


@dataclass(slots=True)
class CallContext:
    """Everything the gateway knows about one call (or one message of a stream)."""

    request_id: str
    method: str
    peer: str
    started: float = field(default_factory=time.perf_counter)
    event: str = "call"
    cert_identity: str | None = None
    cert_sha256: str | None = None
    principal: Principal | None = None
    model: str | None = None
    requested_version: str | None = None
    version: str | None = None
    model_digest: str | None = None  # the resolved version's bytes (docs/model-signing.md)
    execution_provider: str | None = None  # the resolved version's ONNX Runtime provider (docs/providers.md)
    version_reason: str | None = None  # why that version: requested, default, pinned, canary (docs/versions.md)
    action: str | None = None
    decision: str | None = None
    rule: str | None = None
    inputs: list[dict[str, Any]] | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    message_index: int | None = None
    messages: int | None = None
    model_ran: bool = False  # a refusal before the run is safe for the client to retry
    backend: dict[str, Any] | None = None  # a routed model's exchange with its backend (backends.route.Exchange)
    recorder: Recorder | None = None  # streams: records each message's outcome before its reply leaves
    max_reply_bytes: int | None = None  # streams: the largest reply the call boundary lets through
    trace: CallTrace | None = None  # with tracing on: the call's span, shared by its stream messages

    async def record_message(self, message: CallContext, error: Any) -> None:
        """Commit the record of one stream message (made by ``for_message``) through the stream's recorder, and
        count it in ``messages``."""
        if self.recorder is None:
            raise RuntimeError("stream call has no recorder")
        await self.recorder.record(message, error)
        self.messages = (self.messages or 0) + 1

    def check_reply(self, size: int) -> None:
        """RESOURCE_EXHAUSTED for a stream reply the boundary would not let through: checked before the reply's
        record, so that the record says what the client gets (an in-band refusal, not the reply)."""
        if self.max_reply_bytes is not None:
            check_size(size, self.max_reply_bytes, what="response")

    def for_message(self, index: int, *, bytes_in: int) -> CallContext:
        """A child context for one message of a stream: same caller, its own audit fields and clock."""
        return replace(
            self,
            event="stream_message",
            started=time.perf_counter(),
            model=None,
            requested_version=None,
            version=None,
            model_digest=None,
            version_reason=None,
            execution_provider=None,
            action=None,
            decision=None,
            rule=None,
            inputs=None,
            bytes_in=bytes_in,
            bytes_out=0,
            message_index=index,
            messages=None,
            model_ran=False,
            backend=None,
        )

    def describe_inputs(self, inputs: Mapping[str, WireTensor]) -> None:
        """Record names, datatypes and shapes of the inputs as declared (never their values; read before any is
        decoded, so a refusal for what the values hold still says which inputs it was about)."""
        self.inputs = [
            {"name": name, "datatype": tensor.datatype, "shape": list(tensor.shape)} for name, tensor in inputs.items()
        ]

    def audit_record(self, *, code: str, reason: str | None) -> dict[str, Any]:
        """The audit record for this call; ``ts`` and the chain fields are added by the audit log."""
        principal = self.principal
        groups: Sequence[str] = sorted(principal.groups) if principal else []
        scopes: Sequence[str] = sorted(principal.scopes) if principal else []
        record: dict[str, Any] = {
            "event": self.event,
            "request_id": self.request_id,
            "method": self.method,
            "peer": self.peer,
            "cert_identity": self.cert_identity,
            "cert_sha256": self.cert_sha256,
            "sub": principal.subject if principal else None,
            "iss": principal.issuer if principal else None,
            "jti": principal.token_id if principal else None,
            "groups": groups,
            "scopes": scopes,
            "model": self.model,
            "requested_version": self.requested_version,
            "version": self.version,
            "model_digest": self.model_digest,
            "version_reason": self.version_reason,
            "execution_provider": self.execution_provider,
            "action": self.action,
            "decision": self.decision,
            "rule": self.rule,
            "code": code,
            "reason": reason,
            "latency_ms": round((time.perf_counter() - self.started) * 1000.0, 3),
            "inputs": self.inputs or [],
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "trace_id": self.trace.trace_id if self.trace else None,
        }
        if self.backend is not None:
            record["backend"] = self.backend
        if self.message_index is not None:
            record["message_index"] = self.message_index
        if self.messages is not None:
            record["messages"] = self.messages
        return record


current_call: contextvars.ContextVar[CallContext] = contextvars.ContextVar("current_call")
