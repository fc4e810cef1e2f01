"""Request streams of every protocol: each message answered in order, its error in-band, its own audit record."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import structlog

from gateway.context import CallContext
from gateway.errors import GatewayError, InternalError
from gateway.identifiers import ID

log = structlog.get_logger(__name__)

Request = TypeVar("Request")
Reply = TypeVar("Reply")


async def answer_in_order(
    stream: CallContext,
    requests: AsyncIterator[Request],
    answer: Callable[[CallContext, Request], Awaitable[Reply]],
    refuse: Callable[[Request, GatewayError], Reply],
) -> AsyncIterator[Reply]:
    """One reply per request, in order. A failing message gets ``refuse``'s reply and the stream goes on.

    Each message runs under a child of the stream's context and is recorded before its reply leaves: if the
    record cannot be written, the stream ends UNAVAILABLE (the recorder raises) and that reply is never sent. A
    reply over the size limit is refused in-band (RESOURCE_EXHAUSTED) before its record, so the record says what
    the client gets.
    """
    index = 0
    async for request in requests:
        call = stream.for_message(index, bytes_in=_size(request))
        error: GatewayError | None = None
        try:
            reply = await answer(call, request)
            stream.check_reply(_size(reply))
        except GatewayError as exc:
            error = exc
        except Exception:
            log.exception("stream_message_failed", request_id=stream.request_id, message_index=index)
            error = InternalError(reason="unexpected error")
        if error is not None:
            reply = refuse(request, error)
        call.bytes_out = _size(reply)
        stream.model_ran = stream.model_ran or call.model_ran
        await stream.record_message(call, error)
        index += 1
        yield reply


def echoed_id(message_id: str) -> str:
    """A message's id for the reply that refuses it: left out when the id itself is malformed (the reply would
    otherwise carry it back, up to the size of the request)."""
    return message_id if ID.allows(message_id) else ""


def _size(message: object) -> int:
    return message.ByteSize()  # type: ignore[attr-defined]
