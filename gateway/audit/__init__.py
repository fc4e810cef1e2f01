"""Tamper-evident audit trail: hash-chained JSON lines, a group-commit writer, checkpoints and verification.

The trail is the gateway's second log stream, separate from operational logs; its format, durability and threat
model are in docs/audit.md.
"""

from __future__ import annotations

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
from gateway.audit.writer import FSYNC_POLICIES, AuditLog, AuditStats, FsyncPolicy

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
