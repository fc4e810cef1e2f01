"""The durable audit writer: records from the event loop (``append``) or from threads (``write``), committed in
groups, each chained, written with one ``os.write`` and made durable per the fsync policy before its callers wake.

On the event loop, the records of one loop turn form one group, committed at the end of the turn on the loop
itself (no thread switch), or, under ``fsync: always``, handed to the writer thread as one group, so the loop
never waits on an fsync. See docs/audit.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import structlog

from gateway import metrics
from gateway.audit.chain import (
    ZERO_HASH,
    AuditError,
    Checkpoint,
    Digester,
    check_line,
    checkpoint_path,
    encode_checkpoint,
    lock_path,
    parse_rotated,
    read_checkpoint,
    rotated_path,
    seal,
    utc_now,
    validate_chain_id,
)
from gateway.errors import InternalError, UnavailableError

log = structlog.get_logger(__name__)

FsyncPolicy = Literal["always", "batch", "none"]
FSYNC_POLICIES: tuple[str, ...] = ("always", "batch", "none")
MIB = 1024 * 1024

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_FILE_MODE = 0o600  # the trail names callers and what they did: owner-only, like the keys
_TAIL_CHUNK = 64 * 1024
_FAILURE_LOG_INTERVAL_S = 10.0  # while the sink stays down, repeat audit_write_failed at most this often
_STAGED_SUFFIX = ".next"  # .audit.log.next: the next active file, made before a rotation renames the full one


@dataclass(frozen=True, slots=True)
class AuditStats:
    """Counters for metrics: a snapshot, cheap to take."""

    healthy: bool
    seq: int
    records_written: int
    groups_written: int
    write_failures: int
    records_failed: int
    rotations: int


@dataclass(slots=True)
class _Group:
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


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why the sink is down, and since when (for audit_recovered's down_s)."""

    op: str
    error: str
    since: float


@dataclass(frozen=True, slots=True)
class _Head:
    """The last committed record: what the next record chains to and what a checkpoint may vouch for."""

    seq: int
    hash: str
    file: str


def _stamped(record: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh copy of ``record`` (the caller's mapping is left alone) with ``ts``, the moment it was submitted."""
    event = dict(record)
    event["ts"] = utc_now()
    return event


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # regular files report a full disk as a short write, then ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _exclusive_lock(path: Path) -> int:
    """A descriptor holding an exclusive flock on ``path``; AuditError when another writer holds it.

    Two processes appending to one chain would interleave seqs and break it: a second gateway (or worker)
    configured with the same audit path must fail to start, not corrupt the trail.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditError(f"{path}: the audit log is in use by another process (one writer per file)") from None
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_tail(fd: int, size: int) -> tuple[int, bytes | None]:
    """``(end of the last complete line, that line without its newline)``; bytes after it are a torn write."""
    data = b""
    pos = size
    while pos > 0:
        start = max(0, pos - _TAIL_CHUNK)
        data = os.pread(fd, pos - start, start) + data
        pos = start
        last_nl = data.rfind(b"\n")
        if last_nl < 0:
            continue
        prev_nl = data.rfind(b"\n", 0, last_nl)
        if prev_nl >= 0 or pos == 0:
            return pos + last_nl + 1, data[prev_nl + 1 : last_nl]
    return 0, None


def _read_first_line(fd: int, end: int) -> bytes:
    data = b""
    while len(data) < end:
        chunk = os.pread(fd, min(_TAIL_CHUNK, end - len(data)), len(data))
        if not chunk:
            break
        data += chunk
        newline = data.find(b"\n")
        if newline >= 0:
            return data[:newline]
    return data


class AuditLog:
    """The audit trail of one process: one hash chain, one active file, one writer thread.

    ``write()`` may be called from any number of threads; it returns once the record is committed under the
    fsync policy and raises ``UnavailableError`` when it could not be (fail closed).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "batch",
        hmac_key: bytes | None = None,
        max_bytes: int = 64 * MIB,
        chain_id: str = "main",
        dev_fail_open: bool = False,
        batch_interval_s: float = 0.2,
        write_timeout_s: float | None = 10.0,
        metered: bool = True,
    ) -> None:
        """Configure; nothing is touched on disk until ``open()``. ``metered=False``: no per-group metrics
        (nothing would serve them: ``metrics.recording``)."""
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        if hmac_key is not None and len(hmac_key) < 16:
            raise ValueError("hmac_key must be at least 16 bytes (RFC 2104 recommends at least the hash length)")
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        if batch_interval_s <= 0:
            raise ValueError("batch_interval_s must be positive")
        self.path = Path(path)
        self.checkpoint_path = checkpoint_path(self.path)
        self.chain_id = validate_chain_id(chain_id)
        self.fsync: FsyncPolicy = fsync
        self.dev_fail_open = dev_fail_open
        self._key = hmac_key
        self._digest = Digester(hmac_key)
        self._max_bytes = max_bytes
        self._interval = batch_interval_s
        self._write_timeout = write_timeout_s
        self._metered = metered
        # Fail at configuration time, not at the first rotation, if the names cannot fit in a checkpoint.
        encode_checkpoint(
            Checkpoint(
                self.chain_id, 10**16 - 1, ZERO_HASH, rotated_path(self.path, 10**16 - 1, 10**16 - 1).name, utc_now()
            ),
            self._digest,
        )

        # Caller side: ``_lock`` guards the pending group, the state and the committer role; the writer thread
        # waits on ``_wakeup`` until it is handed the role.
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._group = _Group()
        self._turn: _Group | None = None  # the loop turn's records, committed by a callback at the end of the turn
        self._handoff: deque[_Group] = deque()  # loop groups for the writer thread (fsync always, or busy)
        # Who commits now: None, "leader" (a caller committing its own record) or "writer" (the writer thread).
        # One committer at a time keeps the chain in order without a lock around the I/O.
        self._committer: str | None = None
        self._state = "new"  # new -> open -> closing -> closed (-> open again)
        # Writer side. ``_io_lock`` orders fd swaps (rotation, recovery, close) against the background fsync and
        # checkpoint writes; the hot path (chaining, os.write) runs in the writer thread alone and needs no lock.
        self._io_lock = threading.Lock()
        self._fd = -1  # private; tests point it at /dev/full to make writes fail for real
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the active file; None between files
        self._offset = 0  # committed size of the active file: bytes beyond it belong to a failed group
        self._file_first_seq = 1
        self._head = _Head(0, ZERO_HASH, self.path.name)
        self._checkpoint_head: _Head | None = None  # what the checkpoint file says now
        self._broken: _Failure | None = None
        self._failures = 0  # bumped under _io_lock by every failure: recovery clears only what it recovered from
        self._last_failure_log = 0.0
        self._writer: threading.Thread | None = None
        self._syncer: threading.Thread | None = None
        self._stop_sync = threading.Event()
        self._lock_fd = -1  # held (flock) while open: one writer per file, whatever the process
        # Held while open, so that staying up needs no new descriptor (issue 27: a peer flood that uses up the
        # process's descriptors must not take the sink down): the checkpoint file, the folder (fsynced after a
        # rotation), and a spare given up for the one open a rotation needs.
        self._checkpoint_fd = -1
        self._dir_fd = -1
        self._spare_fd = -1
        self._last_deferral_log = 0.0
        self.records_written = 0
        self.groups_written = 0
        self.write_failures = 0
        self.records_failed = 0
        self.rotations = 0

    # ------------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> AuditLog:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> AuditLog:
        """Continue the chain from the files on disk (or start it) and start the writer; AuditError if unsafe."""
        with self._lock:
            if self._state in ("open", "closing"):
                raise RuntimeError("audit log is already open")
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = _exclusive_lock(lock_path(self.path))
        try:
            checkpoint = read_checkpoint(self.checkpoint_path, self._key)
        except ValueError as exc:
            self._release_lock()
            raise AuditError(f"{self.checkpoint_path}: {exc}; an operator must look (gateway audit verify)") from exc
        try:
            self._hold_descriptors()
            fd = os.open(self.path, _OPEN_FLAGS, _FILE_MODE)
        except BaseException:
            self._release_lock()
            raise
        try:
            self._resume(fd, checkpoint)
            if self.fsync != "none":
                os.fsync(fd)
                os.fsync(self._dir_fd)  # the file's name, if open() just created it
            self._write_checkpoint(self._head)
        except BaseException:
            os.close(fd)
            self._fd = -1
            self._release_lock()
            raise
        self._broken = None
        self._stop_sync.clear()
        with self._lock:
            self._group = _Group()
            self._turn = None
            self._handoff.clear()
            self._committer = None
            self._state = "open"
        metrics.AUDIT_SINK_UP.set(1)
        self._writer = threading.Thread(target=self._run, name=f"audit-writer-{self.chain_id}", daemon=True)
        self._writer.start()
        if self.fsync == "batch":
            self._syncer = threading.Thread(target=self._sync_loop, name=f"audit-sync-{self.chain_id}", daemon=True)
            self._syncer.start()
        log.info(
            "audit_opened",
            file=str(self.path),
            chain=self.chain_id,
            seq=self._head.seq,
            fsync=self.fsync,
            keyed=self._digest.keyed,  # an HMAC-keyed trail verifies only with its key
        )
        if self.dev_fail_open:
            log.warning("audit_fail_open_enabled", file=str(self.path), detail="calls proceed when audit writes fail")
        return self

    def close(self) -> None:
        """Commit everything submitted, fsync, write the final checkpoint and stop; later writes are refused."""
        with self._lock:
            if self._state != "open":
                return
            self._state = "closing"
            self._wakeup.notify_all()
        if self._writer is not None:
            self._writer.join()
        self._stop_sync.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._io_lock:
            try:
                if self._broken is None:
                    os.fsync(self._fd)  # every policy, "none" included: a clean shutdown loses nothing
                    self._write_checkpoint(self._head)
            except OSError as exc:
                log.error("audit_write_failed", op="close", error=str(exc), file=str(self.path))
            finally:
                os.close(self._fd)
                self._fd = -1
        self._release_lock()
        with self._lock:
            self._state = "closed"
        metrics.AUDIT_SINK_UP.set(0)
        log.info("audit_closed", file=str(self.path), chain=self.chain_id, seq=self._head.seq)

    def _release_lock(self) -> None:
        """Close the descriptors held while open; the lock's last (closing it drops the flock)."""
        for name in ("_checkpoint_fd", "_dir_fd", "_spare_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)

    def _hold_descriptors(self) -> None:
        """Open what the writer keeps open until ``close``: the folder and a spare (the checkpoint file at its first
        write, so that a start refused before it leaves no empty checkpoint behind)."""
        self._dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _resume(self, fd: int, checkpoint: Checkpoint | None) -> None:
        """Find the chain head on disk, check it against the checkpoint, drop a torn last line."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuditError(f"{self.path} is not a regular file")
        end, last = _read_tail(fd, st.st_size)
        if last is not None:
            head = self._head_from_line(last, self.path.name)
            first = self._head_from_line(_read_first_line(fd, end), self.path.name).seq
        else:
            head, first = self._head_from_rotated(), None
        if checkpoint is not None:
            self._check_against(checkpoint, head)
        if end < st.st_size:
            # A crash in the middle of a write leaves a torn last line. Its callers never saw success: write()
            # returns only once the whole group is in the file (a power loss under batch/none: see docs/audit.md).
            os.ftruncate(fd, end)
            log.warning(
                "audit_partial_record_discarded", file=str(self.path), offset=end, bytes=st.st_size - end, seq=head.seq
            )
        self._fd = fd
        self._identity = (st.st_dev, st.st_ino)
        self._offset = end
        self._file_first_seq = first if first is not None else head.seq + 1
        self._head = head
        self._checkpoint_head = (
            _Head(checkpoint.seq, checkpoint.hash, checkpoint.file) if checkpoint is not None else None
        )

    def _head_from_line(self, line: bytes, name: str) -> _Head:
        link, reason = check_line(line, self._digest)
        if link is None or reason is not None:
            raise AuditError(
                f"{self.path.parent / name}: a record does not verify ({reason}); wrong hmac key or an altered "
                "file; an operator must look (gateway audit verify)"
            )
        if link.chain != self.chain_id:
            raise AuditError(
                f"{self.path.parent / name} holds chain {link.chain!r}, configured chain is {self.chain_id!r}"
            )
        return _Head(link.seq, link.hash, name)

    def _head_from_rotated(self) -> _Head:
        """The head when the active file holds no record yet: the last record of the newest rotated file."""
        newest: tuple[int, Path] | None = None
        for entry in self.path.parent.iterdir():
            parsed = parse_rotated(entry.name)
            if parsed is not None and parsed[0] == self.path.name and (newest is None or parsed[1] > newest[0]):
                newest = (parsed[1], entry)
        if newest is None:
            return _Head(0, ZERO_HASH, self.path.name)
        with newest[1].open("rb") as handle:
            end, last = _read_tail(handle.fileno(), os.fstat(handle.fileno()).st_size)
            if last is None or end != os.fstat(handle.fileno()).st_size:
                raise AuditError(f"{newest[1]}: rotated file does not end with a complete record")
        return self._head_from_line(last, newest[1].name)

    def _check_against(self, checkpoint: Checkpoint, head: _Head) -> None:
        if checkpoint.chain != self.chain_id:
            raise AuditError(
                f"{self.checkpoint_path} is for chain {checkpoint.chain!r}, configured chain is {self.chain_id!r}"
            )
        if head.seq < checkpoint.seq:
            raise AuditError(
                f"{self.path}: the trail ends at seq {head.seq} but the checkpoint of {checkpoint.ts} vouches for seq "
                f"{checkpoint.seq} in {checkpoint.file}: records were removed or a file is missing; refusing to "
                "continue the chain, an operator must look (gateway audit verify)"
            )
        if head.seq == checkpoint.seq and head.hash != checkpoint.hash:
            raise AuditError(
                f"{self.path}: the record at seq {head.seq} differs from the checkpoint's: the trail was rewritten; "
                "an operator must look (gateway audit verify)"
            )

    # ------------------------------------------------------------------------------------------------ callers

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record; return once it is committed, else raise UnavailableError (fail closed)."""
        try:
            event = _stamped(record)
        except Exception as exc:
            raise InternalError(reason=f"audit record not serializable: {type(exc).__name__}") from exc
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
                self._group = _Group()
        if lead:
            self._lead(group)
        if not waiter.acquire(timeout=-1 if self._write_timeout is None else self._write_timeout):
            self._refuse(record, "audit write timed out")
            return
        if group.error is not None:
            self._refuse(record, group.error)
        elif group.failed and index in group.failed:
            raise InternalError(reason=group.failed[index])

    def _lead(self, group: _Group, *, on_loop: bool = False) -> None:
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

    async def append(self, record: Mapping[str, Any]) -> None:
        """On the event loop: append one record, return once it is committed, else raise UnavailableError.

        Every record appended during one loop turn is committed by one callback at the end of that turn.
        """
        try:
            event = _stamped(record)
        except Exception as exc:
            raise InternalError(reason=f"audit record not serializable: {type(exc).__name__}") from exc
        if self._state != "open":
            raise UnavailableError(reason="audit log is not open")
        loop = asyncio.get_running_loop()
        group = self._turn
        if group is None:
            group = self._turn = _Group(loop=loop, loop_thread=threading.get_ident())
            loop.call_soon(self._commit_turn, group)
        index = len(group.records)
        group.records.append(event)
        future: asyncio.Future[str | None] = loop.create_future()
        group.futures.append(future)
        refusal = await future
        if refusal is not None:
            self._refuse(record, refusal)
        elif index in group.failed:
            raise InternalError(reason=group.failed[index])

    def _commit_turn(self, group: _Group) -> None:
        """End of a loop turn: commit its records here, or hand them to the writer thread (never fsync here)."""
        self._turn = None
        with self._lock:
            if self._state != "open":
                lead = False
                group.error = "audit log is not open"
            elif self._committer is None and self.fsync != "always" and self._broken is None:
                # Under "always", or to recover from a failure (which reopens and fsyncs), the writer thread
                # commits instead, so that the loop never waits on the disk.
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

    def _refuse(self, record: Mapping[str, Any], reason: str) -> None:
        if not self.dev_fail_open:
            raise UnavailableError(reason=reason)
        log.warning("audit_write_failed_open", reason=reason, request_id=record.get("request_id"), file=str(self.path))

    @property
    def healthy(self) -> bool:
        """True while open and the last commit (or background fsync) succeeded."""
        return self._state == "open" and self._broken is None

    @property
    def seq(self) -> int:
        """The seq of the last committed record."""
        return self._head.seq

    def stats(self) -> AuditStats:
        """Counters for metrics."""
        return AuditStats(
            healthy=self.healthy,
            seq=self._head.seq,
            records_written=self.records_written,
            groups_written=self.groups_written,
            write_failures=self.write_failures,
            records_failed=self.records_failed,
            rotations=self.rotations,
        )

    # ------------------------------------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._committer != "writer" and not (self._state != "open" and self._committer is None):
                    self._wakeup.wait()
                group: _Group | None
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
                    self._group = _Group()
            if group is None:
                self._rotate_or_break()
            else:
                self._commit_and_release(group)

    def _rotation_due(self) -> bool:
        return self._broken is None and self._offset >= self._max_bytes

    def _commit_and_release(self, group: _Group, *, rotate: bool = True) -> None:
        """Commit one group as the committer and wake its callers, then rotate; on failure, first fail what queued
        behind it, so that a woken caller's next record starts a recovery instead of joining the failed queue."""
        try:
            committed = self._commit(group)
        except Exception as exc:  # a bug must not leave callers waiting forever or kill the writer
            log.exception("audit_write_failed", op="internal", file=str(self.path))
            committed = False
            self._set_broken(_Failure("internal", type(exc).__name__, time.monotonic()))
            group.error = "audit writer error"
        if not committed:
            self._fail_queued(group.error or "audit write failed")
        group.release()
        if committed and rotate and self._offset >= self._max_bytes:
            self._rotate_or_break()

    def _commit(self, group: _Group) -> bool:
        """Chain, write and make durable one group; on failure roll the chain back and mark the sink broken."""
        recovering = self._broken
        failures_seen = self._failures
        if recovering is not None:
            try:
                with self._io_lock:
                    self._reopen()
            except OSError as exc:
                self._fail_group(group, "reopen", exc)
                return False
        head = self._head
        seq, prev = head.seq, head.hash
        chain, fail_open = self.chain_id, self.dev_fail_open
        lines: list[bytes] = []
        for index, event in enumerate(group.records):
            event.pop("hash", None)  # reserved: a caller's own "hash" would shadow the chain's
            event["chain"], event["seq"], event["prev"] = chain, seq + 1, prev
            if fail_open:
                # A reader must know this trail may have gaps no check can see: calls went on while writes failed.
                event["dev_audit_fail_open"] = True
            try:
                line, digest = seal(event, self._digest)
            except (ValueError, TypeError, RecursionError) as exc:  # a key that is not a string, a cycle
                group.failed[index] = f"audit record not serializable: {exc}"
                continue
            lines.append(line)
            seq, prev = seq + 1, digest
        if not lines:
            return True
        data = b"".join(lines)
        op = "write"
        try:
            _write_all(self._fd, data)
            if self.fsync == "always":
                op = "fsync"
                with metrics.AUDIT_FSYNC_SECONDS.time():
                    os.fsync(self._fd)
            op = "stat"
            self._check_identity()
            if self.fsync != "batch":
                # Under "batch" the syncer writes the checkpoint after each fsync, so it never vouches for records
                # a power loss could take away (which would make the next start refuse, wrongly).
                op = "checkpoint"
                with self._io_lock:
                    self._write_checkpoint(_Head(seq, prev, self.path.name))
        except OSError as exc:
            self._fail_group(group, op, exc)
            return False
        self._offset += len(data)
        self._head = _Head(seq, prev, self.path.name)
        self.records_written += len(lines)
        self.groups_written += 1
        if self._metered:
            metrics.AUDIT_RECORDS.inc(len(lines))
            metrics.AUDIT_BYTES.inc(len(data))
            metrics.AUDIT_GROUP_SIZE.observe(len(lines))
        if recovering is not None and self._clear_broken(failures_seen):
            log.info(
                "audit_recovered",
                file=str(self.path),
                failed_op=recovering.op,
                down_s=round(time.monotonic() - recovering.since, 3),
                seq=seq,
            )
        return True

    def _check_identity(self) -> None:
        """The file at ``path`` must still be the one written to: a removed or replaced file is a failure."""
        st = os.stat(self.path)
        if (st.st_dev, st.st_ino) != self._identity:
            raise OSError(errno.ESTALE, "the audit log file was replaced")

    def _fail_group(self, group: _Group, op: str, exc: OSError) -> None:
        reason = f"audit {op} failed: {exc.strerror or exc}"
        group.error = reason
        self.write_failures += 1
        self.records_failed += len(group.records)
        self._set_broken(_Failure(op, str(exc), time.monotonic()), group_records=len(group.records))

    def _fail_queued(self, reason: str) -> None:
        """Fail everything queued behind a failed group: nothing is written past a failure unrecovered."""
        with self._lock:
            queued = [*self._handoff, self._group]
            self._handoff.clear()
            self._group = _Group()
        for group in queued:
            if group.records:
                group.error = reason
                self.records_failed += len(group.records)
                group.release()

    def _set_broken(self, failure: _Failure, *, group_records: int = 0) -> None:
        with self._io_lock:
            self._failures += 1
            previous = self._broken
            if previous is None:
                self._broken = failure
            else:  # keep the original "since" for audit_recovered's down_s
                self._broken = _Failure(failure.op, failure.error, previous.since)
        metrics.AUDIT_SINK_UP.set(0)
        now = time.monotonic()
        changed = previous is None or previous.op != failure.op
        if changed or now - self._last_failure_log >= _FAILURE_LOG_INTERVAL_S:
            self._last_failure_log = now
            log.error(
                "audit_write_failed",
                op=failure.op,
                error=failure.error,
                file=str(self.path),
                seq=self._head.seq,
                records=group_records,
                fail_open=self.dev_fail_open,
            )

    def _clear_broken(self, failures_seen: int) -> bool:
        with self._io_lock:
            if self._broken is None or self._failures != failures_seen:
                return False  # a newer failure (the syncer's) arrived meanwhile: the next group recovers from it
            self._broken = None
        metrics.AUDIT_SINK_UP.set(1)
        return True

    def _reopen(self) -> None:
        """Recover after a failure: the active file must be ours at the committed offset, else a new file starts.

        Called with ``_io_lock`` held. Raises OSError while the sink stays unusable.
        """
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        problem: str | None = None
        if self._identity is None:  # an interrupted rotation: a fresh, empty file is expected
            if st is not None and st.st_size > 0:
                problem = "replaced"
        elif st is None:
            problem = "removed"
        elif (st.st_dev, st.st_ino) != self._identity:
            problem = "replaced"
        elif st.st_size < self._offset:
            problem = "truncated"
        displaced: Path | None = None
        if problem is not None and st is not None:
            # Keep whatever is there as evidence, out of the way of the rotated-file names.
            displaced = self.path.with_name(f"{self.path.name}.displaced-{time.time_ns()}")
            os.rename(self.path, displaced)
        fd = os.open(self.path, _OPEN_FLAGS, _FILE_MODE)
        try:
            fst = os.fstat(fd)
            identity = (fst.st_dev, fst.st_ino)
            fresh = problem is not None or self._identity is None
            if not fresh:
                if identity != self._identity:
                    raise OSError(errno.ESTALE, "the audit log file changed during recovery")
                if fst.st_size > self._offset:
                    os.ftruncate(fd, self._offset)  # the failed group's partial bytes: never acknowledged
            if self.fsync != "none":
                os.fsync(fd)
                if fresh:
                    _fsync_dir(self.path.parent)
            self._write_checkpoint(self._head)
        except BaseException:
            os.close(fd)
            raise
        old, self._fd = self._fd, fd
        if old >= 0:
            with contextlib.suppress(OSError):  # the old descriptor is what failed; nothing more to learn from it
                os.close(old)
        if fresh:
            self._identity = identity
            self._offset = 0
            self._file_first_seq = self._head.seq + 1
        if problem is not None:
            # The verifier will report the break (a chain resuming mid-way, records missing): that is the point.
            log.error(
                "audit_file_replaced",
                file=str(self.path),
                problem=problem,
                displaced_to=str(displaced) if displaced else None,
                next_seq=self._head.seq + 1,
            )

    def _rotate_or_break(self) -> None:
        try:
            with self._io_lock:
                fd = self._open_next()
                if fd is not None:
                    self._rotate(fd)
        except OSError as exc:
            self._set_broken(_Failure("rotate", str(exc), time.monotonic()))

    def _open_next(self) -> int | None:
        """The next active file, created under a hidden name (the verifier skips dot files) before the full one is
        renamed, so that a rotation that cannot get a descriptor leaves the sink up on the full file; None then
        (retried at the next commit). The spare descriptor is given up for this open and taken back after it."""
        staged = self.path.with_name(f".{self.path.name}{_STAGED_SUFFIX}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)  # left by a crash between the two renames: empty, never acknowledged
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
        try:
            return os.open(staged, _OPEN_FLAGS | os.O_EXCL, _FILE_MODE)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            now = time.monotonic()
            if now - self._last_deferral_log >= _FAILURE_LOG_INTERVAL_S:
                self._last_deferral_log = now
                log.warning("audit_rotation_deferred", file=str(self.path), error=exc.strerror, size=self._offset)
            return None
        finally:
            with contextlib.suppress(OSError):
                self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _rotate(self, fd: int) -> None:
        """Rename the full active file to its seq range and put the staged one (``fd``) in its place; the chain runs
        on across files."""
        staged = self.path.with_name(f".{self.path.name}{_STAGED_SUFFIX}")
        first, last = self._file_first_seq, self._head.seq
        target = rotated_path(self.path, first, last)
        try:
            if self.fsync != "none":
                os.fsync(self._fd)  # a rotated file is complete and durable before it gets its final name
            self._check_identity()
            if target.exists():
                raise OSError(errno.EEXIST, f"rotation target {target} exists")
        except BaseException:
            os.close(fd)
            raise
        os.rename(self.path, target)
        # From here the old file is done; if the new one cannot take its name, recovery creates it (identity None).
        self._identity = None
        self._offset = 0
        self._file_first_seq = last + 1
        self._head = _Head(self._head.seq, self._head.hash, target.name)
        old, self._fd = self._fd, fd
        os.close(old)
        os.rename(staged, self.path)
        fst = os.fstat(fd)
        self._identity = (fst.st_dev, fst.st_ino)
        if self.fsync != "none":
            os.fsync(self._dir_fd)
        self._write_checkpoint(self._head)
        self.rotations += 1
        log.info("audit_rotated", file=str(target), first_seq=first, last_seq=last, next_file=str(self.path))

    # ------------------------------------------------------------------------------------------------ syncer thread

    def _sync_loop(self) -> None:
        """fsync policy "batch": fsync at most every ``batch_interval_s``, then checkpoint what is now durable."""
        while not self._stop_sync.wait(self._interval):
            self._sync_once()

    def _sync_once(self) -> None:
        with self._io_lock:
            head = self._head  # snapshot before the fsync: everything up to it is in the file already
            if self._broken is not None or head == self._checkpoint_head:
                return
            try:
                with metrics.AUDIT_FSYNC_SECONDS.time():
                    os.fsync(self._fd)
                self._check_identity()
                self._write_checkpoint(head)
                return
            except OSError as exc:
                failure = _Failure("fsync", str(exc), time.monotonic())
        self._set_broken(failure)

    # ------------------------------------------------------------------------------------------------ checkpoint

    def _write_checkpoint(self, head: _Head) -> None:
        """Rewrite the checkpoint in place (fixed size, one pwrite); callers hold ``_io_lock`` or run alone."""
        if head == self._checkpoint_head:
            return
        data = encode_checkpoint(Checkpoint(self.chain_id, head.seq, head.hash, head.file, utc_now()), self._digest)
        fd = self._checkpoint_fd
        held = os.fstat(fd) if fd >= 0 else None
        try:
            named: os.stat_result | None = os.stat(self.checkpoint_path)
        except FileNotFoundError:
            named = None
        if held is None or named is None or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            # The first write, or the file was removed or replaced behind our back: write it at its name again
            # (the only checkpoint that needs a new descriptor).
            fd = os.open(self.checkpoint_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
            if self._checkpoint_fd >= 0:
                os.close(self._checkpoint_fd)
            self._checkpoint_fd = fd
            held = os.fstat(fd)
        os.pwrite(fd, data, 0)
        if held.st_size != len(data):
            os.ftruncate(fd, len(data))
        self._checkpoint_head = head
