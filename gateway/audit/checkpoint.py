"""The checkpoint file: the chain head the writer vouches for, rewritten in place at a fixed size.

One ``pwrite`` of one sector, no rename: a crash leaves the old checkpoint or the new one, never a mix (the format
and its MAC are in ``chain.py``; docs/audit.md has the numbers).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from gateway.audit.chain import AuditError, Checkpoint, Digester, Head, encode_checkpoint, read_checkpoint, utc_now

FILE_MODE = 0o600  # the trail names callers and what they did: owner-only, like the keys


class CheckpointFile:
    """The checkpoint of one chain, held open from its first write until ``close`` (staying up needs no new
    descriptor, unless the file is removed or replaced behind the writer's back)."""

    def __init__(self, path: Path, *, chain_id: str, digest: Digester, key: bytes | None) -> None:
        self.path = path
        self._chain_id = chain_id
        self._digest = digest
        self._key = key
        self._fd = -1
        self.head: Head | None = None  # what the file says now

    def read(self) -> Checkpoint | None:
        """The checkpoint on disk (None when there is none), remembered as what the file says; AuditError when it
        does not verify."""
        try:
            checkpoint = read_checkpoint(self.path, self._key)
        except ValueError as exc:
            raise AuditError(f"{self.path}: {exc}; an operator must look (gateway audit verify)") from exc
        self.head = Head(checkpoint.seq, checkpoint.hash, checkpoint.file) if checkpoint is not None else None
        return checkpoint

    def vouch(self, head: Head) -> None:
        """Rewrite the checkpoint for ``head`` (nothing when it says so already); callers order this against the
        other writers of the trail's files."""
        if head == self.head:
            return
        data = encode_checkpoint(Checkpoint(self._chain_id, head.seq, head.hash, head.file, utc_now()), self._digest)
        fd = self._fd
        held = os.fstat(fd) if fd >= 0 else None
        try:
            named: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            named = None
        if held is None or named is None or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            # The first write, or the file was removed or replaced behind our back: write it at its name again
            # (the only checkpoint that needs a new descriptor).
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = fd
            held = os.fstat(fd)
        os.pwrite(fd, data, 0)
        if held.st_size != len(data):
            os.ftruncate(fd, len(data))
        self.head = head

    def close(self) -> None:
        """Give up the descriptor."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
