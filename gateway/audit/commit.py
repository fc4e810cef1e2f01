"""The group commit: records from the event loop (``append``) or from threads (``write``) queued into groups, one
committer at a time, each caller woken once its group is committed (or refused).

On the event loop, the records of one loop turn form one group, committed at the end of the turn on the loop
itself (no thread switch), or handed to the writer thread where committing may wait on the disk (``fsync:
always``, or a recovery), so the loop never waits on an fsync. A thread caller with nobody committing commits its
own record at once; callers arriving meanwhile queue for the writer thread. What a commit does (chain, write, make
durable) is the audit log's; see docs/audit.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.errors import InternalError, UnavailableError

Committer = Literal["leader", "writer"]


@dataclass(slots=True)
class Group:
    """Records committed together, and how their callers are woken once ``error`` and ``failed`` are set."""

    records: list[dict[str, Any]] = field(default_factory=list)
    # Thread callers: one held lock each, released by the committer. A bare lock is the cheapest wake-up CPython
    # offers (threading.Event and Condition add Python-level bookkeeping per waiter; measured about 10% per record).
    waiters: list[Any] = field(default_factory=list)
    error: str | None = None
    failed: dict[int, str] = field(default_factory=dict)  # index -> reason, for a record that could not be encoded
    # Loop callers: one future each (a caller cancelled while waiting must not cancel the others' wake-up),
    # resolved on their loop with None or the reason the group was refused.
    loop: asyncio.AbstractEventLoop | None = None
    loop_thread: int = 0
    futures: list[asyncio.Future[str | None]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None  # the write timeout of a group handed to the writer thread

    def release(self) -> None:
        """Wake every caller of the group; ``error`` and ``failed`` are set before."""
        for waiter in self.waiters:
            waiter.release()
        if self.loop is not None:
            if threading.get_ident() == self.loop_thread:
                self.resolve(self.error)
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                    self.loop.call_soon_threadsafe(self.resolve, self.error)

    def resolve(self, refusal: str | None) -> None:
        """On the loop: wake the loop callers still waiting, with ``refusal`` (None when committed)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for future in self.futures:
            if not future.done():
                future.set_result(refusal)


class GroupCommit:
    """Queues records into groups and hands each to one committer at a time, which keeps the chain in order
    without a lock around the I/O. Accepts records between ``start`` and ``stop``."""

    def __init__(
        self,
        *,
        commit: Callable[[Group], bool],
        rotation_due: Callable[[], bool],
        rotate: Callable[[], None],
        commits_on_loop: Callable[[], bool],
        name: str,
        write_timeout_s: float | None,
    ) -> None:
        """``commit`` chains, writes and makes durable one group (False: it failed, ``group.error`` says why);
        ``rotate`` rotates the active file once ``rotation_due``; ``commits_on_loop`` says whether a loop turn's
        group may be committed on the loop now (never where that would wait on an fsync)."""
        self._commit = commit
        self._rotation_due = rotation_due
        self._rotate = rotate
        self._commits_on_loop = commits_on_loop
        self._name = name
        self._write_timeout = write_timeout_s
        # ``_lock`` guards the pending group, the state and the committer role; the writer thread waits on
        # ``_wakeup`` until it is handed the role.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._group = Group()
        self._turn: Group | None = None  # the loop turn's records, committed by its first caller at the end of it
        self._handoff: deque[Group] = deque()  # loop groups for the writer thread (fsync always, or busy)
        self._committer: Committer | None = None  # who commits now: a caller with its own record, or the thread
        self._state = "new"  # new -> open -> closing -> closed (-> open again)
        self._writer: threading.Thread | None = None
        self.records_failed = 0  # queued behind a failed group, and failed with it

    @property
    def accepting(self) -> bool:
        """Whether records are taken now."""
        return self._state == "open"

    def check_startable(self) -> None:
        """RuntimeError while started."""
        with self._lock:
            if self._state in ("open", "closing"):
                raise RuntimeError("audit log is already open")

    def start(self) -> None:
        """Take records, and start the writer thread."""
        with self._lock:
            self._group = Group()
            self._turn = None
            self._handoff.clear()
            self._committer = None
            self._state = "open"
        self._writer = threading.Thread(target=self._run, name=f"audit-writer-{self._name}", daemon=True)
        self._writer.start()

    def stop(self) -> bool:
        """Take no more records, and return once everything taken is handled (False: was not started)."""
        with self._lock:
            if self._state != "open":
                return False
            self._state = "closing"
            self._wakeup.notify_all()
        if self._writer is not None:
            self._writer.join()
        return True

    def stopped(self) -> None:
        """Mark the log closed, once the audit log has closed its files."""
        with self._lock:
            self._state = "closed"

    # ------------------------------------------------------------------------------------------------ callers

    def write(self, event: dict[str, Any]) -> str | None:
        """From a thread: queue ``event`` and wait until its group is handled. None once committed, else why not
        (a timeout included); UnavailableError when not accepting, InternalError when it could not be encoded."""
        waiter = threading.Lock()
        waiter.acquire()
        with self._lock:
            if self._state != "open":
                raise UnavailableError(reason="audit log is not open")
            group = self._group
            index = len(group.records)
            group.records.append(event)
            group.waiters.append(waiter)
            lead = self._committer is None
            if lead:
                # Nobody is committing: this caller commits its own record at once, in its own thread, with no
                # hand-off to the writer thread and back (two thread switches). Callers arriving meanwhile queue.
                self._committer = "leader"
                self._group = Group()
        if lead:
            self._lead(group)
        if not waiter.acquire(timeout=-1 if self._write_timeout is None else self._write_timeout):
            return "audit write timed out"
        if group.error is not None:
            return group.error
        if group.failed and index in group.failed:
            raise InternalError(reason=group.failed[index])
        return None

    async def append(self, event: dict[str, Any], *, alone: bool = False) -> str | None:
        """On the event loop: queue ``event`` into this loop turn's group and wait until it is handled, as
        ``write``. Every record appended during one loop turn is committed at the end of it, as one group;
        ``alone``: the caller knows no other record can join this turn's group (nothing else is in flight), so its
        group is committed at once, without waiting a loop turn for company that cannot come."""
        if self._state != "open":
            raise UnavailableError(reason="audit log is not open")
        loop = asyncio.get_running_loop()
        group = self._turn
        first = group is None
        if group is None:
            group = self._turn = Group(loop=loop, loop_thread=threading.get_ident())
        index = len(group.records)
        group.records.append(event)
        future: asyncio.Future[str | None] = loop.create_future()
        group.futures.append(future)
        if first:
            # The turn's first caller commits its group once the rest of the turn has run (every caller in it has
            # joined), in its own next step: a callback would cost it one more loop turn to be woken.
            try:
                if not alone:
                    await asyncio.sleep(0)
            finally:
                self._commit_turn(group)  # cancelled or not: the turn's other callers wait on this group
        refusal = await future  # done already, unless the group went to the writer thread
        if refusal is None and index in group.failed:
            raise InternalError(reason=group.failed[index])
        return refusal

    def _lead(self, group: Group, *, on_loop: bool = False) -> None:
        """Commit ``group`` as the leader, then hand the committer role on or give it up. On the loop, a
        rotation that falls due is left to the writer thread (it fsyncs)."""
        self._commit_and_release(group, rotate=not on_loop)
        with self._lock:
            if self._group.records or self._handoff or self._state != "open" or self._rotation_due():
                # What queued meanwhile goes to the writer thread: a leader commits one group only, so its own
                # latency stays one write.
                self._committer = "writer"
                self._wakeup.notify()
            else:
                self._committer = None

    def _commit_turn(self, group: Group) -> None:
        """End of a loop turn: commit its records here, or hand them to the writer thread (never fsync here)."""
        self._turn = None
        with self._lock:
            if self._state != "open":
                lead = False
                group.error = "audit log is not open"
            elif self._committer is None and self._commits_on_loop():
                self._committer = "leader"
                lead = True
            else:
                lead = False
                self._handoff.append(group)
                if self._committer is None:
                    self._committer = "writer"
                    self._wakeup.notify()
        if lead:
            self._lead(group, on_loop=True)
        elif group.error is not None:
            group.release()
        elif self._write_timeout is not None and group.loop is not None:
            group.timer = group.loop.call_later(self._write_timeout, group.resolve, "audit write timed out")

    # ------------------------------------------------------------------------------------------------ committer

    def _run(self) -> None:
        """The writer thread: commit what it is handed, and rotate when a rotation falls due."""
        while True:
            with self._lock:
                while self._committer != "writer" and not (self._state != "open" and self._committer is None):
                    self._wakeup.wait()
                group: Group | None
                if self._rotation_due():
                    group = None
                elif self._handoff:
                    group = self._handoff.popleft()
                else:
                    group = self._group
                    if not group.records:
                        self._committer = None
                        if self._state != "open":
                            return  # closing, and everything submitted has been handled
                        continue
                    self._group = Group()
            if group is None:
                self._rotate()
            else:
                self._commit_and_release(group)

    def _commit_and_release(self, group: Group, *, rotate: bool = True) -> None:
        """Commit one group as the committer and wake its callers, then rotate; on failure, first fail what queued
        behind it, so that a woken caller's next record starts a recovery instead of joining the failed queue."""
        committed = self._commit(group)
        if not committed:
            self._fail_queued(group.error or "audit write failed")
        group.release()
        if committed and rotate and self._rotation_due():
            self._rotate()

    def _fail_queued(self, reason: str) -> None:
        """Fail everything queued behind a failed group: nothing is written past a failure unrecovered."""
        with self._lock:
            queued = [*self._handoff, self._group]
            self._handoff.clear()
            self._group = Group()
        for group in queued:
            if group.records:
                group.error = reason
                self.records_failed += len(group.records)
                group.release()
