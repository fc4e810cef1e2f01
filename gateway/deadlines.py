"""Waits bounded in time, many at once, by one periodic check on the event loop instead of a timer each.

A timer per wait (``asyncio.timeout``, ``loop.call_at``) makes a handle, pushes it on the loop's heap, and, once
cancelled, leaves it there until the heap is rebuilt, every comparison a Python call (``TimerHandle.__lt__``). The
call boundary bounds two waits per call, and nearly none is ever reached: here each costs an entry in a dict, and
one check every ``resolution_s``, scheduled only while some wait is bounded, cancels the waits past their time. A
bound thus fires up to ``resolution_s`` late, never early.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

RESOLUTION_S = 0.05


class _Wait:
    """One bounded wait: the task waiting, until when, and whether its time ran out."""

    __slots__ = ("deadline", "expired", "task")

    def __init__(self, deadline: float, task: asyncio.Task[Any]) -> None:
        self.deadline = deadline
        self.task = task
        self.expired = False


class Deadlines:
    """Bounds waits on one event loop (the one it is first used on; a new loop, after a restart, starts afresh)."""

    def __init__(
        self, expired_error: Callable[[str, float], BaseException], resolution_s: float = RESOLUTION_S
    ) -> None:
        """``expired_error(what, timeout_s)``: what a wait past its bound raises, unless the wait names its own."""
        self._expired_error = expired_error
        self._resolution_s = resolution_s
        self._waits: dict[_Wait, None] = {}  # insertion-ordered set
        self._loop: asyncio.AbstractEventLoop | None = None
        self._check: asyncio.TimerHandle | None = None

    async def within(
        self,
        waited: Awaitable[Any],
        timeout_s: float,
        what: str,
        *,
        expired_error: Callable[[], BaseException] | None = None,
    ) -> Any:
        """``await waited`` for at most ``timeout_s``; past it, the error ``expired_error`` makes (by default the
        one made at construction, naming ``what``). Nested bounds each raise their own: that of the one whose time
        ran out first. Any other cancellation stays a cancellation, as with ``asyncio.timeout``."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a bounded wait outside a task")
        loop = task.get_loop()
        if loop is not self._loop:
            self._loop, self._check = loop, None  # the old loop is gone, and its waits with it
            self._waits.clear()
        cancelling = task.cancelling()
        wait = _Wait(loop.time() + timeout_s, task)
        self._waits[wait] = None
        if self._check is None:
            self._check = loop.call_at(loop.time() + self._resolution_s, self._expire_due, loop)
        try:
            result = await waited
        except BaseException as exc:
            # Past its time, the bound's own cancel request is withdrawn whatever the wait raised (as
            # asyncio.timeout does); the cancellation it caused becomes its error, any other stays as it is.
            if wait.expired and task.uncancel() <= cancelling and isinstance(exc, asyncio.CancelledError):
                raise (expired_error() if expired_error else self._expired_error(what, timeout_s)) from None
            raise
        finally:
            self._waits.pop(wait, None)
        if wait.expired:  # its cancellation came as the wait ended: withdrawn, as asyncio.timeout does
            task.uncancel()
        return result

    def _expire_due(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel each task whose earliest bound has passed (a later one of the same task, nested, waits for the
        next check: the earlier bound's error is the one raised); check again while any wait is bounded."""
        if loop is not self._loop:  # a loop given up on (a stop that timed out) that ran on: not its waits
            return
        now = loop.time()
        try:
            due = sorted((wait for wait in self._waits if wait.deadline <= now), key=lambda wait: wait.deadline)
            cancelled: set[asyncio.Task[Any]] = set()
            for wait in due:
                if wait.task in cancelled:
                    continue
                cancelled.add(wait.task)
                del self._waits[wait]
                wait.expired = True
                wait.task.cancel()
        finally:  # whatever happened, the waits left are still checked
            self._check = loop.call_at(now + self._resolution_s, self._expire_due, loop) if self._waits else None
