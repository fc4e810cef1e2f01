"""Tamper-evident audit trail: hash-chained JSON lines, a group-commit writer, checkpoints and verification.

One job per module: ``record`` (the record's shape, from a call's facts and outcome), ``chain`` (format, hash,
sealing), ``commit`` (groups and the committer), ``active`` (the active file: resume, recovery, rotation),
``checkpoint``, ``writer`` (AuditLog, joining them), ``verifier``.

The trail is the gateway's second log stream, separate from operational logs; its format, durability and threat
model are in docs/audit.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.audit.chain import (
    CHECKPOINT_SIZE,
    ZERO_HASH,
    AuditError,
    Checkpoint,
    checkpoint_path,
    read_checkpoint,
    rotated_path,
    worker_chain_id,
    worker_path,
)
from gateway.audit.verifier import ChainSummary, Finding, VerifyReport, verify_files

if TYPE_CHECKING:
    from gateway.audit.writer import FSYNC_POLICIES, AuditLog, AuditStats, FsyncPolicy

# The writer logs with structlog, a server dependency; the chain and its verification need nothing beyond the
# standard library, so `gateway audit verify` and the client commands run in an SDK-only install (PEP 562).
_WRITER_NAMES = frozenset({"FSYNC_POLICIES", "AuditLog", "AuditStats", "FsyncPolicy"})

__all__ = [
    "CHECKPOINT_SIZE",
    "FSYNC_POLICIES",
    "ZERO_HASH",
    "AuditError",
    "AuditLog",
    "AuditStats",
    "ChainSummary",
    "Checkpoint",
    "Finding",
    "FsyncPolicy",
    "VerifyReport",
    "checkpoint_path",
    "read_checkpoint",
    "rotated_path",
    "verify_files",
    "worker_chain_id",
    "worker_path",
]


def __getattr__(name: str) -> Any:
    if name not in _WRITER_NAMES:
        raise AttributeError(f"module 'gateway.audit' has no attribute {name!r}")
    from gateway.audit import writer

    return getattr(writer, name)
