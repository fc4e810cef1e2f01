"""The trail's active file: locked to one writer, resumed from disk, appended to at its committed offset,
recovered after a failure, and rotated (renamed to its seq range) when full.

The chain runs on across files; which records a file holds is the audit log's business, where they go is this
module's. See docs/audit.md for the layout on disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Literal

import structlog

from gateway.audit.chain import (
    ZERO_HASH,
    AuditError,
    Checkpoint,
    Digester,
    Head,
    check_line,
    lock_path,
    parse_rotated,
    rotated_path,
)
from gateway.audit.checkpoint import FILE_MODE, CheckpointFile

log = structlog.get_logger(__name__)

FsyncPolicy = Literal["always", "batch", "none"]

_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_TAIL_CHUNK = 64 * 1024
_STAGED_SUFFIX = ".next"  # .audit.log.next: the next active file, made before a rotation renames the full one
_DEFERRAL_LOG_INTERVAL_S = 10.0  # a rotation deferred for want of a descriptor is logged at most this often


def _write_all(fd: int, data: bytes) -> None:
    view: bytes | memoryview = data  # a view only once a write falls short: nearly every group takes one write
    while view:
        written = os.write(fd, view)
        if written <= 0:  # regular files report a full disk as a short write, then ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if written == len(view):
            return
        view = memoryview(view)[written:]


def _exclusive_lock(path: Path) -> int:
    """A descriptor holding an exclusive flock on ``path``; AuditError when another writer holds it.

    Two processes appending to one chain would interleave seqs and break it: a second gateway (or worker)
    configured with the same audit path must fail to start, not corrupt the trail.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
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


class ActiveFile:
    """The active file of one chain and the descriptors held with it while open: the lock (one writer per file,
    whatever the process), the folder (fsynced after a rotation) and a spare given up for the one open a rotation
    needs, so that staying up needs no new descriptor (issue 27: a peer flood that uses up the process's
    descriptors must not take the sink down). Callers order the fd swaps (recovery, rotation, close) against the
    other users of the descriptor."""

    def __init__(
        self,
        path: Path,
        *,
        fsync: FsyncPolicy,
        chain_id: str,
        digest: Digester,
        max_bytes: int,
        checkpoint: CheckpointFile,
    ) -> None:
        self.path = path
        self._path_text = os.fspath(path)  # stat'ed per group or per background fsync: converted once
        self._fsync = fsync
        self._chain_id = chain_id
        self._digest = digest
        self._max_bytes = max_bytes
        self._checkpoint = checkpoint
        self.fd = -1  # tests point it at /dev/full to make writes fail for real
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the active file; None between files
        self.offset = 0  # committed size of the active file: bytes beyond it belong to a failed group
        self._first_seq = 1
        self._lock_fd = -1
        self._dir_fd = -1
        self._spare_fd = -1
        self._last_deferral_log = 0.0
        self._retired: tuple[Path, int, int] = (path, 0, 0)  # the last file retired, its first and last seq
        self.rotations = 0

    @property
    def full(self) -> bool:
        """Whether the committed records have reached the size that rotates the file."""
        return self.offset >= self._max_bytes

    # ------------------------------------------------------------------------------------------------ lifecycle

    def open(self) -> Head:
        """Take the lock, continue from the files on disk (checked against the checkpoint, a torn last line
        dropped) and vouch for the head found: the head. AuditError if that is unsafe."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = _exclusive_lock(lock_path(self.path))
        try:
            checkpoint = self._checkpoint.read()
            # The checkpoint file is opened at its first write, so that a start refused before it leaves no empty
            # checkpoint behind.
            self._dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            fd = os.open(self.path, _OPEN_FLAGS, FILE_MODE)
        except BaseException:
            self.release()
            raise
        try:
            head = self._resume(fd, checkpoint)
            if self._fsync != "none":
                os.fsync(fd)
                os.fsync(self._dir_fd)  # the file's name, if open() just created it
            self._checkpoint.vouch(head)
        except BaseException:
            os.close(fd)
            self.fd = -1
            self.release()
            raise
        return head

    def close(self) -> None:
        """Close the active file (the caller has made it durable)."""
        os.close(self.fd)
        self.fd = -1

    def release(self) -> None:
        """Close the descriptors held while open: the checkpoint's, then the lock's last (closing it drops the
        flock)."""
        self._checkpoint.close()
        for name in ("_dir_fd", "_spare_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)

    def _resume(self, fd: int, checkpoint: Checkpoint | None) -> Head:
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
        self.fd = fd
        self._identity = (st.st_dev, st.st_ino)
        self.offset = end
        self._first_seq = first if first is not None else head.seq + 1
        return head

    def _head_from_line(self, line: bytes, name: str) -> Head:
        link, reason = check_line(line, self._digest)
        if link is None or reason is not None:
            raise AuditError(
                f"{self.path.parent / name}: a record does not verify ({reason}); wrong hmac key or an altered "
                "file; an operator must look (gateway audit verify)"
            )
        if link.chain != self._chain_id:
            raise AuditError(
                f"{self.path.parent / name} holds chain {link.chain!r}, configured chain is {self._chain_id!r}"
            )
        return Head(link.seq, link.hash, name)

    def _head_from_rotated(self) -> Head:
        """The head when the active file holds no record yet: the last record of the newest rotated file."""
        newest: tuple[int, Path] | None = None
        for entry in self.path.parent.iterdir():
            parsed = parse_rotated(entry.name)
            if parsed is not None and parsed[0] == self.path.name and (newest is None or parsed[1] > newest[0]):
                newest = (parsed[1], entry)
        if newest is None:
            return Head(0, ZERO_HASH, self.path.name)
        with newest[1].open("rb") as handle:
            end, last = _read_tail(handle.fileno(), os.fstat(handle.fileno()).st_size)
            if last is None or end != os.fstat(handle.fileno()).st_size:
                raise AuditError(f"{newest[1]}: rotated file does not end with a complete record")
        return self._head_from_line(last, newest[1].name)

    def _check_against(self, checkpoint: Checkpoint, head: Head) -> None:
        if checkpoint.chain != self._chain_id:
            raise AuditError(
                f"{self._checkpoint.path} is for chain {checkpoint.chain!r}, configured chain is {self._chain_id!r}"
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

    # ------------------------------------------------------------------------------------------------ writing

    def write(self, data: bytes) -> None:
        """Append ``data`` (one group's lines) with as few writes as the kernel allows; ``advance`` once the group
        is committed."""
        _write_all(self.fd, data)

    def advance(self, size: int) -> None:
        """Count ``size`` more bytes as committed."""
        self.offset += size

    def sync(self) -> None:
        """fsync the active file."""
        os.fsync(self.fd)

    def check_identity(self) -> None:
        """The file at ``path`` must still be the one written to: a removed or replaced file is a failure."""
        st = os.stat(self._path_text)
        if (st.st_dev, st.st_ino) != self._identity:
            raise OSError(errno.ESTALE, "the audit log file was replaced")

    # ------------------------------------------------------------------------------------------------ recovery

    def reopen(self, head: Head) -> None:
        """Recover after a failure: the active file must be ours at the committed offset, else a new file starts
        (the failed group's partial bytes are cut off either way); the checkpoint vouches for ``head``.

        Raises OSError while the sink stays unusable.
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
        elif st.st_size < self.offset:
            problem = "truncated"
        displaced: Path | None = None
        if problem is not None and st is not None:
            # Keep whatever is there as evidence, out of the way of the rotated-file names.
            displaced = self.path.with_name(f"{self.path.name}.displaced-{time.time_ns()}")
            os.rename(self.path, displaced)
        fd = os.open(self.path, _OPEN_FLAGS, FILE_MODE)
        try:
            fst = os.fstat(fd)
            identity = (fst.st_dev, fst.st_ino)
            fresh = problem is not None or self._identity is None
            if not fresh:
                if identity != self._identity:
                    raise OSError(errno.ESTALE, "the audit log file changed during recovery")
                if fst.st_size > self.offset:
                    os.ftruncate(fd, self.offset)  # the failed group's partial bytes: never acknowledged
            if self._fsync != "none":
                os.fsync(fd)
                if fresh:
                    _fsync_dir(self.path.parent)
            self._checkpoint.vouch(head)
        except BaseException:
            os.close(fd)
            raise
        old, self.fd = self.fd, fd
        if old >= 0:
            with contextlib.suppress(OSError):  # the old descriptor is what failed; nothing more to learn from it
                os.close(old)
        if fresh:
            self._identity = identity
            self.offset = 0
            self._first_seq = head.seq + 1
        if problem is not None:
            # The verifier will report the break (a chain resuming mid-way, records missing): that is the point.
            log.error(
                "audit_file_replaced",
                file=str(self.path),
                problem=problem,
                displaced_to=str(displaced) if displaced else None,
                next_seq=head.seq + 1,
            )

    # ------------------------------------------------------------------------------------------------ rotation

    def open_next(self) -> int | None:
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
            return os.open(staged, _OPEN_FLAGS | os.O_EXCL, FILE_MODE)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            now = time.monotonic()
            if now - self._last_deferral_log >= _DEFERRAL_LOG_INTERVAL_S:
                self._last_deferral_log = now
                log.warning("audit_rotation_deferred", file=str(self.path), error=exc.strerror, size=self.offset)
            return None
        finally:
            with contextlib.suppress(OSError):
                self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def retire(self, staged_fd: int, head: Head) -> str:
        """Make the full file durable and rename it to its seq range (``head`` is its last record): the name it now
        has. On failure nothing was renamed and ``staged_fd`` (from ``open_next``) is closed."""
        target = rotated_path(self.path, self._first_seq, head.seq)
        try:
            if self._fsync != "none":
                os.fsync(self.fd)  # a rotated file is complete and durable before it gets its final name
            self.check_identity()
            if target.exists():
                raise OSError(errno.EEXIST, f"rotation target {target} exists")
        except BaseException:
            os.close(staged_fd)
            raise
        os.rename(self.path, target)
        # From here the old file is done; if the new one cannot take its name, recovery creates it (identity None).
        self._identity = None
        self.offset = 0
        self._retired = (target, self._first_seq, head.seq)
        self._first_seq = head.seq + 1
        return target.name

    def install(self, staged_fd: int, head: Head) -> None:
        """Put the staged file in the active file's place and vouch for ``head`` (naming the retired file)."""
        old, self.fd = self.fd, staged_fd
        os.close(old)
        os.rename(self.path.with_name(f".{self.path.name}{_STAGED_SUFFIX}"), self.path)
        fst = os.fstat(staged_fd)
        self._identity = (fst.st_dev, fst.st_ino)
        if self._fsync != "none":
            os.fsync(self._dir_fd)
        self._checkpoint.vouch(head)
        self.rotations += 1
        target, first, last = self._retired
        log.info("audit_rotated", file=str(target), first_seq=first, last_seq=last, next_file=str(self.path))
