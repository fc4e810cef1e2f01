"""Request streams of every protocol: each message answered in order, its error in-band, its outcome yielded with
its reply for the call boundary to record."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import structlog

from gateway.context import NO_OUTCOME, Answered, Call, MessageOutcome, Outcome, carried
from gateway.errors import GatewayError, InternalError
from gateway.identifiers import ID

log = structlog.get_logger(__name__)

Request = TypeVar("Request")
Reply = TypeVar("Reply")


async def answer_in_order(
    stream: Call,
    requests: AsyncIterator[Request],
    answer: Callable[[Call, Request], Awaitable[tuple[Reply, Outcome]]],
    refuse: Callable[[Request, GatewayError], Reply],
) -> AsyncIterator[Answered]:
    """One reply per request, in order, each with its message's outcome. A failing message gets ``refuse``'s
    reply and the stream goes on.

    Each message runs as its own call (``Call.for_message``); the boundary commits its record before the reply
    leaves, and if that record cannot be written the stream ends UNAVAILABLE and that reply is never sent. A
    reply over the size limit is refused in-band (RESOURCE_EXHAUSTED) before its outcome is yielded, so that the
    record says what the client gets.
    """
    index = 0
    async for request in requests:
        call = stream.for_message(index)
        error: GatewayError | None = None
        outcome = NO_OUTCOME
        try:
            reply, outcome = await answer(call, request)
            stream.check_reply(_size(reply))
        except GatewayError as exc:
            error, outcome = exc, carried(exc, outcome)
        except Exception as exc:
            log.exception("stream_message_failed", request_id=stream.request_id, message_index=index)
            error, outcome = InternalError(reason="unexpected error"), carried(exc, outcome)
        if error is not None:
            reply = refuse(request, error)
        yield Answered(reply, MessageOutcome(call, outcome, error, _size(request), _size(reply)))
        index += 1


def echoed_id(message_id: str) -> str:
    """A message's id for the reply that refuses it: left out when the id itself is malformed (the reply would
    otherwise carry it back, up to the size of the request)."""
    return message_id if ID.allows(message_id) else ""


def _size(message: object) -> int:
    return message.ByteSize()  # type: ignore[attr-defined]
