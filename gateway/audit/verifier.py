"""Verification of audit files: each record's hash, the chain across active and rotated files, the checkpoints.

Files may be given in any order and may hold several chains (one per worker process); each chain is walked in
seq order and its first bad record is named by file, line and seq.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.audit.chain import (
    CHECKPOINT_SUFFIX,
    HASH_MISMATCH,
    LOCK_SUFFIX,
    ZERO_HASH,
    Checkpoint,
    Digester,
    Link,
    check_line,
    parse_rotated,
    read_checkpoint,
)

PathArg = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class Finding:
    """One verification failure: the file, the 1-based line (None for a whole file), the record's seq, why."""

    file: str
    line: int | None
    seq: int | None
    chain: str | None
    reason: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        record = "" if self.seq is None else f" seq {self.seq}"
        chain = "" if self.chain is None else f" (chain {self.chain})"
        return f"{where}:{record}{chain}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ChainSummary:
    """What was read of one chain (up to its first bad record, if any)."""

    chain: str
    first_seq: int
    last_seq: int
    records: int
    files: tuple[str, ...]
    checkpoint_seq: int | None


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of ``verify_files``: ``ok``, counts, per-chain summaries and the failures, first one first."""

    records: int
    chains: tuple[ChainSummary, ...]
    errors: tuple[Finding, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every record and checkpoint verified."""
        return not self.errors

    @property
    def first_error(self) -> Finding | None:
        """The first bad record (or file, or checkpoint), None when intact."""
        return self.errors[0] if self.errors else None

    def lines(self) -> list[str]:
        """Human-readable report, one line per chain, note and failure; the last line is the verdict."""
        out: list[str] = []
        for chain in self.chains:
            checkpoint = "" if chain.checkpoint_seq is None else f", checkpoint at seq {chain.checkpoint_seq}"
            out.append(
                f"chain {chain.chain}: seq {chain.first_seq}..{chain.last_seq}, {chain.records} records "
                f"in {len(chain.files)} file(s){checkpoint}"
            )
        out.extend(f"note: {note}" for note in self.notes)
        out.extend(f"error: {error}" for error in self.errors)
        if self.ok:
            out.append(f"OK: {self.records} records in {len(self.chains)} chain(s) verified")
        else:
            out.append(f"FAILED: first bad record: {self.first_error}")
        return out


@dataclass(slots=True)
class _LogFile:
    path: Path
    chain: str
    first_seq: int


@dataclass(slots=True)
class _Walk:
    """Walks one chain through its files in seq order, stopping at the first bad record."""

    chain: str
    digest: Digester
    allow_partial_start: bool
    wanted: set[int]  # seqs named by checkpoints: their hashes are kept
    hashes: dict[int, str] = field(default_factory=dict)
    first_seq: int | None = None
    last_seq: int = 0
    last_hash: str = ZERO_HASH
    records: int = 0

    def feed(self, path: Path) -> Finding | None:
        """Check every line of one file; the first failure, or None."""
        try:
            handle = path.open("rb")
        except OSError as exc:
            return Finding(str(path), None, None, self.chain, f"cannot read: {exc.strerror}")
        with handle:
            for number, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    return Finding(
                        str(path), number, None, self.chain, "incomplete last line: a torn write or a truncated file"
                    )
                link, reason = check_line(raw[:-1], self.digest)
                if reason == HASH_MISMATCH and self.records == 0:
                    reason = _key_mismatch(path, self.digest) or reason
                if link is None or reason is not None:
                    return Finding(str(path), number, link.seq if link else None, self.chain, reason or "bad record")
                problem = self._follow(link, first_in_file=number == 1)
                if problem is not None:
                    return Finding(str(path), number, link.seq, self.chain, problem)
        return None

    def _follow(self, link: Link, *, first_in_file: bool) -> str | None:
        if link.chain != self.chain:
            return f"record of chain {link.chain!r} among the records of chain {self.chain!r}: inserted"
        expected = self.last_seq + 1
        if self.first_seq is None:
            if link.seq == 1 and link.prev != ZERO_HASH:
                return "the chain's first record (seq 1) has a prev that is not all zeros"
            if link.seq > 1 and not self.allow_partial_start:
                return (
                    f"the chain starts at seq {link.seq}, not 1: records 1..{link.seq - 1} are not in the set "
                    "(removed, or older files archived: then pass allow_partial_start)"
                )
            self.first_seq = link.seq
        elif link.seq > expected:
            missing = f"{expected}" if link.seq == expected + 1 else f"{expected}..{link.seq - 1}"
            hint = " (a file may be missing from the set)" if first_in_file else ""
            return f"expected seq {expected}, found {link.seq}: record(s) {missing} removed or moved{hint}"
        elif link.seq < expected:
            return f"expected seq {expected}, found {link.seq}: a record was inserted, duplicated or moved"
        elif link.prev != self.last_hash:
            return f"prev does not match the hash of seq {link.seq - 1}: a record was removed, inserted or replaced"
        self.last_seq, self.last_hash = link.seq, link.hash
        self.records += 1
        if link.seq in self.wanted:
            self.hashes[link.seq] = link.hash
        return None


def _key_mismatch(path: Path, digest: Digester) -> str | None:
    """Why the first record of a chain fails its hash check when every record of its file fails it alike: not an
    edit (which breaks the records it touches), but the wrong key or none."""
    with path.open("rb") as handle:
        for raw in handle:
            link, reason = check_line(raw.rstrip(b"\n"), digest)
            if link is None or reason != HASH_MISMATCH:
                return None
    if digest.keyed:
        return "no record's hash matches with this key: the wrong key, or the trail is not keyed"
    return "no record's hash matches without a key: the trail is HMAC-keyed, pass its key (--hmac-key)"


def verify_files(
    paths: Iterable[PathArg],
    *,
    hmac_key: bytes | None = None,
    checkpoint: Literal["auto"] | PathArg | Sequence[PathArg] | None = "auto",
    allow_partial_start: bool = False,
) -> VerifyReport:
    """Verify a set of audit files (active, rotated, several chains, any order) and their checkpoints.

    ``checkpoint="auto"`` checks ``NAME.checkpoint`` beside each file's active name when it exists (and any
    ``*.checkpoint`` given in ``paths``); a path or list of paths checks exactly those; None checks none.
    ``allow_partial_start`` accepts a chain whose first given record is not seq 1 (older files archived).
    """
    errors: list[Finding] = []
    notes: list[str] = []
    logs, checkpoints = _classify(paths, checkpoint, errors, notes)
    if not logs and not errors:
        errors.append(Finding("", None, None, None, "no audit files given"))

    digest = Digester(hmac_key)
    by_chain: dict[str, list[_LogFile]] = {}
    for path in logs:
        placed = _place(path, digest, errors, notes)
        if placed is not None:
            by_chain.setdefault(placed.chain, []).append(placed)

    loaded: dict[str, list[tuple[Path, Checkpoint]]] = {}
    checkpoint_errors: list[Finding] = []
    for path in checkpoints:
        try:
            found = read_checkpoint(path, hmac_key)
        except ValueError as exc:
            checkpoint_errors.append(Finding(str(path), None, None, None, str(exc)))
            continue
        if found is None:
            checkpoint_errors.append(Finding(str(path), None, None, None, "checkpoint file not found"))
        else:
            loaded.setdefault(found.chain, []).append((path, found))

    summaries: list[ChainSummary] = []
    total = 0
    for chain in sorted(set(by_chain) | set(loaded)):
        files = sorted(by_chain.get(chain, []), key=lambda item: (item.first_seq, item.path.name))
        points = loaded.get(chain, [])
        walk = _Walk(chain, digest, allow_partial_start, {point.seq for _, point in points})
        failure = None
        for item in files:
            failure = walk.feed(item.path)
            if failure is not None:
                errors.append(failure)
                break
        total += walk.records
        if failure is None:
            checkpoint_errors.extend(_check_points(chain, walk, points, notes))
        checked = [point.seq for _, point in points]
        summaries.append(
            ChainSummary(
                chain=chain,
                first_seq=walk.first_seq or 0,
                last_seq=walk.last_seq,
                records=walk.records,
                files=tuple(str(item.path) for item in files),
                checkpoint_seq=max(checked) if checked else None,
            )
        )
    errors.extend(checkpoint_errors)
    return VerifyReport(records=total, chains=tuple(summaries), errors=tuple(errors), notes=tuple(notes))


def _check_points(chain: str, walk: _Walk, points: list[tuple[Path, Checkpoint]], notes: list[str]) -> list[Finding]:
    """A checkpoint vouches for (seq, hash): the records must reach that seq and carry that hash there."""
    found: list[Finding] = []
    for path, point in points:
        if point.seq == 0:
            continue
        if walk.first_seq is None or point.seq > walk.last_seq:
            last = walk.last_seq
            found.append(
                Finding(
                    str(path),
                    None,
                    point.seq,
                    chain,
                    f"the checkpoint of {point.ts} vouches for seq {point.seq} ({point.file}) but the records end at "
                    f"seq {last}: records {last + 1}..{point.seq} are missing (tail removed or the last file missing)",
                )
            )
        elif point.seq < walk.first_seq:
            notes.append(f"{path}: checkpoint seq {point.seq} precedes the first record given (seq {walk.first_seq})")
        elif walk.hashes.get(point.seq) != point.hash:
            found.append(
                Finding(
                    str(path),
                    None,
                    point.seq,
                    chain,
                    f"the record at seq {point.seq} differs from the checkpoint's hash: the chain was rewritten",
                )
            )
    return found


def _classify(
    paths: Iterable[PathArg],
    checkpoint: Literal["auto"] | PathArg | Sequence[PathArg] | None,
    errors: list[Finding],
    notes: list[str],
) -> tuple[list[Path], list[Path]]:
    """Split the arguments into log files and checkpoint files (directories: every visible file in them)."""
    auto = isinstance(checkpoint, str) and checkpoint == "auto"
    seen: set[str] = set()
    logs: list[Path] = []
    named_points: list[Path] = []
    for given in paths:
        path = Path(given)
        expanded = (
            sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
        )
        for item in expanded:
            real = os.path.realpath(item)
            if real in seen:
                continue
            seen.add(real)
            if item.name.endswith(LOCK_SUFFIX):
                continue  # the writer's lock file holds no records
            if item.name.endswith(CHECKPOINT_SUFFIX):
                named_points.append(item)
            elif not item.exists():
                errors.append(Finding(str(item), None, None, None, "file not found"))
            else:
                logs.append(item)

    points: list[Path] = []
    if checkpoint is None:
        notes.extend(f"{p}: checkpoint not checked (checkpoint=None)" for p in named_points)
    elif auto:
        points.extend(named_points)
        for log_path in logs:
            candidate = log_path.with_name(_active_name(log_path.name) + CHECKPOINT_SUFFIX)
            if candidate.exists():
                points.append(candidate)
        if not points and logs:
            notes.append("no checkpoint found: a removed tail or a missing last file cannot be detected")
    else:
        explicit = [checkpoint] if isinstance(checkpoint, str | os.PathLike) else list(checkpoint)
        points.extend(Path(p) for p in explicit)
        points.extend(named_points)
    unique: dict[str, Path] = {}
    for point in points:
        unique.setdefault(os.path.realpath(point), point)
    return logs, list(unique.values())


def _active_name(name: str) -> str:
    """The active file name a file belongs to: rotated and displaced files carry it as a prefix."""
    rotated = parse_rotated(name)
    if rotated is not None:
        return rotated[0]
    base, sep, _ = name.rpartition(".displaced-")
    return base if sep else name


def _place(path: Path, digest: Digester, errors: list[Finding], notes: list[str]) -> _LogFile | None:
    """The chain and first seq of a file, from its first readable record (lines before it count back)."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        errors.append(Finding(str(path), None, None, None, f"cannot read: {exc.strerror}"))
        return None
    with handle:
        first_bad: int | None = None
        for number, raw in enumerate(handle, 1):
            link, _ = check_line(raw.rstrip(b"\n"), digest)
            if link is not None:
                # A garbage line before it still belongs here: the walk then names that line as the first bad one.
                return _LogFile(path, link.chain, link.seq - (number - 1))
            first_bad = first_bad or number
    if first_bad is None:
        notes.append(f"{path}: empty file")
        return None
    errors.append(Finding(str(path), first_bad, None, None, "no readable audit record in this file"))
    return None
