"""The audit record's shape: one dict per call (or stream message) from the call's facts, its outcome and its code.

The audit log adds ``ts`` and the chain fields (``chain``, ``seq``, ``prev``, ``hash``); docs/audit.md lists every
field. Imports no grpc and no structlog: every transport records through here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.context import Call, Outcome
    from gateway.tensors import WireTensor

_NONE: list[str] = []  # groups and scopes of a call without a principal: never changed


class CallRecord(dict[str, Any]):
    """A record as ``build`` makes it. Its values are text, integers, booleans, None, and lists and mappings of
    them; its only floats are durations in milliseconds rounded to 3 places, never negative (0.0 or at least
    0.001), never NaN or infinite. For such values orjson writes the canonical JSON (chain.py) byte for byte, which
    lets the audit writer encode it that way (writer.py's ``_fast_canonical``, several times faster)."""

    __slots__ = ()


def describe_inputs(inputs: Mapping[str, WireTensor]) -> tuple[dict[str, Any], ...]:
    """Names, datatypes and shapes of the inputs as declared (never their values; read before any is decoded, so
    a refusal for what the values hold still says which inputs it was about)."""
    return tuple(
        {"name": name, "datatype": tensor.datatype, "shape": list(tensor.shape)} for name, tensor in inputs.items()
    )


def build(
    call: Call,
    outcome: Outcome,
    *,
    event: str,
    code: str,
    reason: str | None,
    bytes_in: int,
    bytes_out: int,
    messages: int | None = None,
) -> CallRecord:
    """The record of ``call`` (``event``: "call", "stream" or "stream_message"), its latency taken now."""
    principal = call.principal
    certificate = call.certificate
    trace = call.trace
    record = CallRecord(
        {
            "event": event,
            "request_id": call.request_id,
            "method": call.method,
            "peer": call.peer,
            "cert_identity": certificate.identity if certificate is not None else None,
            "cert_sha256": certificate.sha256_hex if certificate is not None else None,
            "sub": principal.subject if principal is not None else None,
            "iss": principal.issuer if principal is not None else None,
            "jti": principal.token_id if principal is not None else None,
            "groups": sorted(principal.groups) if principal is not None else _NONE,
            "scopes": sorted(principal.scopes) if principal is not None else _NONE,
            "model": outcome.model,
            "requested_version": outcome.requested_version,
            "version": outcome.version,
            "model_digest": outcome.model_digest,
            "version_reason": outcome.version_reason,
            "execution_provider": outcome.execution_provider,
            "action": outcome.action,
            "decision": outcome.decision,
            "rule": outcome.rule,
            "code": code,
            "reason": reason,
            "latency_ms": round((time.perf_counter() - call.started) * 1000.0, 3),
            "inputs": list(outcome.inputs),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "trace_id": trace.trace_id if trace is not None else None,
        }
    )
    if outcome.backend is not None:
        record["backend"] = outcome.backend
    if call.message_index is not None:
        record["message_index"] = call.message_index
    if messages is not None:
        record["messages"] = messages
    return record
