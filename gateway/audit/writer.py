"""The durable audit writer: records from the event loop (``append``) or from threads (``write``), committed in
groups, each chained, written with one ``os.write`` and made durable per the fsync policy before its callers wake.

One job per class: the format and sealing are ``chain.py``'s, the queueing of records into groups and the writer
thread ``commit.py``'s (GroupCommit), the active file, its recovery and rotation ``active.py``'s (ActiveFile), the
checkpoint ``checkpoint.py``'s (CheckpointFile). AuditLog holds the chain head, commits one group (chain, write,
make durable), keeps the sink's health (fail closed, recover at the next group) and runs the batch fsync. See
docs/audit.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import structlog

from gateway import metrics
from gateway.audit.active import ActiveFile, FsyncPolicy
from gateway.audit.chain import (
    ZERO_HASH,
    Checkpoint,
    Digester,
    Head,
    checkpoint_path,
    encode_checkpoint,
    rotated_path,
    seal,
    utc_now,
    validate_chain_id,
)
from gateway.audit.checkpoint import CheckpointFile
from gateway.audit.commit import Group, GroupCommit
from gateway.audit.record import CallRecord
from gateway.errors import InternalError, UnavailableError

log = structlog.get_logger(__name__)


FSYNC_POLICIES: tuple[str, ...] = ("always", "batch", "none")
MIB = 1024 * 1024

_FAILURE_LOG_INTERVAL_S = 10.0  # while the sink stays down, repeat audit_write_failed at most this often


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


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why the sink is down, and since when (for audit_recovered's down_s)."""

    op: str
    error: str
    since: float


def _stamped(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with ``ts``, the moment it was submitted: a CallRecord (made by audit/record.py's ``build`` for
    this one append) as it is, any other mapping copied first (the caller's is left alone)."""
    event = record if isinstance(record, CallRecord) else dict(record)
    event["ts"] = utc_now()
    return event


def _fast_canonical(event: dict[str, Any]) -> bytes | None:
    """The canonical JSON of a call's record (audit/record.py's CallRecord, with the chain's fields), written by
    orjson: byte for byte what chain.encode_canonical writes for such values (tests/unit/test_audit_encoding.py
    holds it to that), several times faster. None for any other record, or one orjson refuses (a lone surrogate,
    an integer past 64 bits): the standard encoder, and its strict path, then take it."""
    if type(event) is not CallRecord:
        return None
    try:
        return orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError
        return None


class AuditLog:
    """The audit trail of one process: one hash chain, one active file, one writer thread.

    ``write()`` may be called from any number of threads, ``append()`` from the event loop; each returns once the
    record is committed under the fsync policy and raises ``UnavailableError`` when it could not be (fail closed).
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
        self._file_name = self.path.name  # the active file's, which every committed head names
        self.checkpoint_path = checkpoint_path(self.path)
        self.chain_id = validate_chain_id(chain_id)
        self.fsync: FsyncPolicy = fsync
        self.dev_fail_open = dev_fail_open
        self._digest = Digester(hmac_key)
        self._interval = batch_interval_s
        self._metered = metered
        # Fail at configuration time, not at the first rotation, if the names cannot fit in a checkpoint.
        encode_checkpoint(
            Checkpoint(
                self.chain_id, 10**16 - 1, ZERO_HASH, rotated_path(self.path, 10**16 - 1, 10**16 - 1).name, utc_now()
            ),
            self._digest,
        )
        self._checkpoint = CheckpointFile(
            self.checkpoint_path, chain_id=self.chain_id, digest=self._digest, key=hmac_key
        )
        self._file = ActiveFile(
            self.path,
            fsync=fsync,
            chain_id=self.chain_id,
            digest=self._digest,
            max_bytes=max_bytes,
            checkpoint=self._checkpoint,
        )
        self._groups = GroupCommit(
            commit=self._commit_group,
            rotation_due=self._rotation_due,
            rotate=self._rotate_or_break,
            commits_on_loop=self._commits_on_loop,
            name=self.chain_id,
            write_timeout_s=write_timeout_s,
        )
        # ``_io_lock`` orders the descriptor swaps (rotation, recovery, close) against the background fsync and
        # the checkpoint writes; the hot path (chaining, os.write) runs in one committer at a time and needs none.
        self._io_lock = threading.Lock()
        self._head = Head(0, ZERO_HASH, self._file_name)
        self._broken: _Failure | None = None
        self._failures = 0  # bumped under _io_lock by every failure: recovery clears only what it recovered from
        self._last_failure_log = 0.0
        self._syncer: threading.Thread | None = None
        self._stop_sync = threading.Event()
        self.records_written = 0
        self.groups_written = 0
        self.write_failures = 0
        self.records_failed = 0

    # ------------------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> AuditLog:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> AuditLog:
        """Continue the chain from the files on disk (or start it) and start the writer; AuditError if unsafe."""
        self._groups.check_startable()
        self._head = self._file.open()
        self._broken = None
        self._stop_sync.clear()
        self._groups.start()
        metrics.AUDIT_SINK_UP.set(1)
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
        if not self._groups.stop():
            return
        self._stop_sync.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._io_lock:
            try:
                if self._broken is None:
                    self._file.sync()  # every policy, "none" included: a clean shutdown loses nothing
                    self._checkpoint.vouch(self._head)
            except OSError as exc:
                log.error("audit_write_failed", op="close", error=str(exc), file=str(self.path))
            finally:
                self._file.close()
        self._file.release()
        self._groups.stopped()
        metrics.AUDIT_SINK_UP.set(0)
        log.info("audit_closed", file=str(self.path), chain=self.chain_id, seq=self._head.seq)

    # ------------------------------------------------------------------------------------------------ callers

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record; return once it is committed, else raise UnavailableError (fail closed)."""
        try:
            event = _stamped(record)
        except Exception as exc:
            raise InternalError(reason=f"audit record not serializable: {type(exc).__name__}") from exc
        refusal = self._groups.write(event)
        if refusal is not None:
            self._refuse(record, refusal)

    async def append(self, record: Mapping[str, Any], *, alone: bool = False) -> None:
        """On the event loop: append one record, return once it is committed, else raise UnavailableError.

        Every record appended during one loop turn is committed at the end of that turn, as one group; ``alone``:
        nothing else is in flight that could join it, so it is committed at once (``GroupCommit.append``).
        """
        try:
            event = _stamped(record)
        except Exception as exc:
            raise InternalError(reason=f"audit record not serializable: {type(exc).__name__}") from exc
        refusal = await self._groups.append(event, alone=alone)
        if refusal is not None:
            self._refuse(record, refusal)

    def _refuse(self, record: Mapping[str, Any], reason: str) -> None:
        if not self.dev_fail_open:
            raise UnavailableError(reason=reason)
        log.warning("audit_write_failed_open", reason=reason, request_id=record.get("request_id"), file=str(self.path))

    @property
    def healthy(self) -> bool:
        """True while open and the last commit (or background fsync) succeeded."""
        return self._groups.accepting and self._broken is None

    @property
    def rotations(self) -> int:
        """How many times the active file was rotated since the log was made."""
        return self._file.rotations

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
            records_failed=self.records_failed + self._groups.records_failed,
            rotations=self.rotations,
        )

    # ------------------------------------------------------------------------------------------------ committing

    def _commits_on_loop(self) -> bool:
        # Under "always", or to recover from a failure (which reopens and fsyncs), the writer thread commits
        # instead, so that the loop never waits on the disk.
        return self.fsync != "always" and self._broken is None

    def _rotation_due(self) -> bool:
        return self._broken is None and self._file.full

    def _commit_group(self, group: Group) -> bool:
        """``_commit``, where a bug must not leave callers waiting forever or kill the writer thread."""
        try:
            return self._commit(group)
        except Exception as exc:
            log.exception("audit_write_failed", op="internal", file=str(self.path))
            self._set_broken(_Failure("internal", type(exc).__name__, time.monotonic()))
            group.error = "audit writer error"
            return False

    def _commit(self, group: Group) -> bool:
        """Chain, write and make durable one group; on failure roll the chain back and mark the sink broken."""
        recovering = self._broken
        failures_seen = self._failures
        if recovering is not None:
            try:
                with self._io_lock:
                    self._file.reopen(self._head)
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
                line, digest = seal(event, self._digest, body=_fast_canonical(event))
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
            self._file.write(data)
            if self.fsync == "always":
                op = "fsync"
                with metrics.AUDIT_FSYNC_SECONDS.time():
                    self._file.sync()
            if self.fsync != "batch":
                # Under "batch" the syncer does both after each fsync (``_sync_once``): it never vouches for
                # records a power loss could take away (which would make the next start refuse, wrongly), and a
                # file removed, replaced or moved is refused within the same window in which an acknowledged
                # record may still be lost to a power loss (docs/audit.md, "Durability").
                op = "stat"
                self._file.check_identity()
                op = "checkpoint"
                with self._io_lock:
                    self._checkpoint.vouch(Head(seq, prev, self._file_name))
        except OSError as exc:
            self._fail_group(group, op, exc)
            return False
        self._file.advance(len(data))
        self._head = Head(seq, prev, self._file_name)
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

    def _rotate_or_break(self) -> None:
        """Rotate the full active file (the chain head then names the retired file); the sink breaks if that
        fails, and the next group recovers."""
        try:
            with self._io_lock:
                staged = self._file.open_next()
                if staged is not None:
                    retired = self._file.retire(staged, self._head)
                    self._head = Head(self._head.seq, self._head.hash, retired)
                    self._file.install(staged, self._head)
        except OSError as exc:
            self._set_broken(_Failure("rotate", str(exc), time.monotonic()))

    # ------------------------------------------------------------------------------------------------ health

    def _fail_group(self, group: Group, op: str, exc: OSError) -> None:
        reason = f"audit {op} failed: {exc.strerror or exc}"
        group.error = reason
        self.write_failures += 1
        self.records_failed += len(group.records)
        self._set_broken(_Failure(op, str(exc), time.monotonic()), group_records=len(group.records))

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

    # ------------------------------------------------------------------------------------------------ syncer thread

    def _sync_loop(self) -> None:
        """fsync policy "batch": fsync at most every ``batch_interval_s``, then checkpoint what is now durable."""
        while not self._stop_sync.wait(self._interval):
            self._sync_once()

    def _sync_once(self) -> None:
        with self._io_lock:
            head = self._head  # snapshot before the fsync: everything up to it is in the file already
            if self._broken is not None or head == self._checkpoint.head:
                return
            op = "fsync"
            try:
                with metrics.AUDIT_FSYNC_SECONDS.time():
                    self._file.sync()
                op = "stat"  # the file at the trail's path must still be the one written to (see _commit)
                self._file.check_identity()
                op = "checkpoint"
                self._checkpoint.vouch(head)
                return
            except OSError as exc:
                failure = _Failure(op, str(exc), time.monotonic())
        self._set_broken(failure)
