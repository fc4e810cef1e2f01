"""Operational log configuration (structlog): JSON in production, console in development, secrets redacted.

This is never the audit trail, which ``gateway.audit`` writes itself.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Keys whose values are never logged, whatever the call site passes: defence in depth behind "never log a token".
_SECRET_KEY = re.compile(r"(token|authorization|password|secret|private|bearer|jwt)", re.IGNORECASE)
# A JWT in free text: three base64url segments, the first starting like a JSON header ("eyJ").
_JWT_TEXT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")

# The request id of the call served in this context, set by the call boundary for the call's duration: every line
# logged in it carries it, whoever logs it. One ContextVar set per call (structlog's bind/unbind_contextvars cost
# several times as much on every call, and a call rarely logs).
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("gateway_request_id", default=None)


def _add_request_id(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the call's request id, unless the line names one itself."""
    current = request_id.get()
    if current is not None:
        event_dict.setdefault("request_id", current)
    return event_dict


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop secret-named values and anything that looks like a JWT."""
    for key, value in list(event_dict.items()):
        if _SECRET_KEY.search(key):
            event_dict[key] = "[redacted]"
        elif isinstance(value, str) and "eyJ" in value:
            event_dict[key] = _JWT_TEXT.sub("[redacted-jwt]", value)
    return event_dict


def configure(*, fmt: str = "json", level: str = "info", stream: Any = None, worker: int | None = None) -> None:
    """Configure the process-wide operational logger (stderr by default), and send the standard library's
    logging (grpcio's Python side, asyncio, other libraries) through the same processors to the same stream.

    ``worker``: the index of this worker of several (``workers: N``), carried by every line as ``worker``: the
    workers share the supervisor's stderr."""
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    # Context first: a call's request id reaches every line logged in its context, whoever logs it.
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _add_request_id,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if worker is not None:
        shared.append(functools.partial(_add_worker, index=worker))
    output = stream or sys.stderr
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        # One write per line (WriteLogger: message and newline together; print() makes two on an unbuffered
        # stderr), so the lines of workers sharing the supervisor's stderr never run into each other.
        logger_factory=structlog.WriteLoggerFactory(file=output),
        cache_logger_on_first_use=False,
    )
    _bridge_stdlib(shared=shared, renderer=renderer, level=level, stream=output)


def _add_worker(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any], *, index: int
) -> MutableMapping[str, Any]:
    event_dict["worker"] = index
    return event_dict


def _bridge_stdlib(*, shared: list[Any], renderer: Any, level: str, stream: Any) -> None:
    """The root logger's one handler renders stdlib records as structlog lines, redacted like the rest."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
