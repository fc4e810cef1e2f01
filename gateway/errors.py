"""Domain errors: one tree shared by the server, the pipeline and the SDK, and the errors that stop a start.

Each GatewayError carries the gRPC status code name it maps to and a message that is safe to show a caller (at
most MAX_MESSAGE_CHARS). The precise internal reason (the claim that is malformed, the rule id that denied, ...)
travels in ``reason`` and goes to the audit record and the operational log only; of an AuthenticationError's reason
the caller learns its term (gateway/auth/reasons.py). A refused call's status message ends with its request id and
where its operator finds the rest (``sent_message``). This module imports nothing from grpc so that policy, tokens,
models and audit stay transport-free; the boundary turns ``code`` into a status.

StartupError is a second, separate tree: the errors that stop the gateway from starting. They never reach a caller;
each is defined next to the code that raises it, and ``gateway serve`` prints it and exits with the code shown.

    GatewayError                       INTERNAL (anything unexpected)
    ├── AuthenticationError            UNAUTHENTICATED
    ├── PermissionDeniedError          PERMISSION_DENIED
    ├── NotFoundError                  NOT_FOUND
    ├── InvalidArgumentError           INVALID_ARGUMENT
    ├── ResourceExhaustedError         RESOURCE_EXHAUSTED
    ├── UnavailableError               UNAVAILABLE
    │   └── TLSHandshakeError          UNAVAILABLE (SDK only: the handshake failed, nothing was sent; not retried)
    ├── DeadlineExceededError          DEADLINE_EXCEEDED
    ├── CancelledError                 CANCELLED (the client went away; recorded, never sent)
    ├── UnimplementedError             UNIMPLEMENTED
    └── InternalError                  INTERNAL

    StartupError                       (never sent to a caller)
    ├── ConfigError                    exit 2  gateway.config
    ├── CertificateConfigError         exit 2  gateway.auth.certs
    ├── TokenConfigError               exit 2  gateway.auth.keys
    ├── PolicyError                    exit 2  gateway.policy
    ├── ModelLoadError                 exit 1  gateway.models.runtime (a model that cannot be served, models.strict)
    └── AuditError                     exit 1  gateway.audit.chain (an audit trail that cannot be continued)
"""

from __future__ import annotations

from gateway.auth import reasons


class StartupError(Exception):
    """An error that stops the gateway from starting; the CLI reports it and exits 2 (1 for models and audit)."""


# A message reaches the client in a trailer (grpc-message) or an in-band stream error: far below the 8 KiB of
# metadata grpc clients accept by default, past which they get RESOURCE_EXHAUSTED instead of the status recorded.
MAX_MESSAGE_CHARS = 1024


class GatewayError(Exception):
    """Base of every error the gateway reports to a caller."""

    code: str = "INTERNAL"
    default_message: str = "internal error"

    def __init__(self, message: str | None = None, *, reason: str | None = None, request_id: str | None = None) -> None:
        self.message = (message or self.default_message)[:MAX_MESSAGE_CHARS]
        self.reason = reason or self.message
        self.request_id = request_id
        self.from_backend = False  # a remote backend's status, not the caller's doing (gateway.backends)
        super().__init__(self.message)

    def __str__(self) -> str:
        if self.request_id:  # a refusal the gateway sent: its operator finds the rest under that id
            return f"{self.message} (code {self.code}, request id {self.request_id}; {LOG_POINTER})"
        return self.message


class AuthenticationError(GatewayError):
    """No valid credentials: missing, malformed, expired or unbound token, or a refused certificate.

    Raised with a ``reason`` from the vocabulary (gateway/auth/reasons.py), its message is the reason's term and
    what to do. In the SDK, ``reason`` is the term the gateway sent (``token expired``), or the message itself."""

    code = "UNAUTHENTICATED"
    default_message = "unauthenticated"

    def __init__(self, message: str | None = None, *, reason: str | None = None, request_id: str | None = None) -> None:
        if message is None and reason is not None:
            message = reasons.client_message(reason)
        super().__init__(message, reason=reason, request_id=request_id)


class PermissionDeniedError(GatewayError):
    """Authenticated, but no policy allows this action (or a deny rule matched)."""

    code = "PERMISSION_DENIED"
    default_message = "permission denied"


class NotFoundError(GatewayError):
    """A model or version the caller may see does not exist."""

    code = "NOT_FOUND"
    default_message = "not found"


class InvalidArgumentError(GatewayError):
    """The request is malformed: tensors that do not match the model's signature, undecodable messages."""

    code = "INVALID_ARGUMENT"
    default_message = "invalid argument"


class ResourceExhaustedError(GatewayError):
    """A size, queue or rate limit was hit."""

    code = "RESOURCE_EXHAUSTED"
    default_message = "resource exhausted"


class UnavailableError(GatewayError):
    """The gateway cannot serve right now (audit sink down, shutting down); safe to retry later."""

    code = "UNAVAILABLE"
    default_message = "unavailable"


class TLSHandshakeError(UnavailableError):
    """The TLS handshake failed (wrong CA, wrong name, refused client certificate); the SDK does not retry it."""


class DeadlineExceededError(GatewayError):
    """The call's deadline passed."""

    code = "DEADLINE_EXCEEDED"
    default_message = "deadline exceeded"


class CancelledError(GatewayError):
    """The client cancelled, or its deadline passed, before the response was sent."""

    code = "CANCELLED"
    default_message = "cancelled"


class UnimplementedError(GatewayError):
    """The method is not served here."""

    code = "UNIMPLEMENTED"
    default_message = "method not implemented"


class InternalError(GatewayError):
    """A failure inside the gateway or the model runtime; details go to the operational log only."""

    code = "INTERNAL"
    default_message = "internal error"


# TLSHandshakeError is not in the table: no server sends it, the SDK reads it from a failed handshake.
ERRORS_BY_CODE: dict[str, type[GatewayError]] = {
    cls.code: cls
    for cls in (
        AuthenticationError,
        PermissionDeniedError,
        NotFoundError,
        InvalidArgumentError,
        ResourceExhaustedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        UnimplementedError,
        InternalError,
    )
}


# Where the operator finds why a call was refused: the boundary logs every refusal as call_refused with the request id.
LOG_POINTER = "see call_refused in the gateway's log"


def sent_message(error: GatewayError, request_id: str) -> str:
    """The status message of a refused call: what the caller may know, its request id, and the log line that says
    the rest (within MAX_MESSAGE_CHARS: a long message is cut, never its ending)."""
    message = "internal error" if isinstance(error, InternalError) else error.message
    ending = f" (request id {request_id}; {LOG_POINTER})"
    return message[: MAX_MESSAGE_CHARS - len(ending)] + ending


def split_sent_message(details: str) -> tuple[str, str | None]:
    """``sent_message`` read back (by the SDK): the message without its ending, and the request id it names."""
    head, marker, tail = details.rpartition(" (request id ")
    if not marker or not tail.endswith(f"; {LOG_POINTER})"):
        return details, None
    return head, tail[: -len(f"; {LOG_POINTER})")]


def error_for_code(code: str, message: str, *, request_id: str | None = None) -> GatewayError:
    """The error for a status code name; a code outside the table is a GatewayError carrying that code."""
    cls = ERRORS_BY_CODE.get(code, GatewayError)
    error = cls(message, request_id=request_id)
    if cls is GatewayError:
        error.code = code
    return error
