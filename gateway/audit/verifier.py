"""Verification of audit files: each record's hash, the chain across active and rotated files, the checkpoints.

Files may be given in any order and may hold several chains (one per worker process, one per replica); each chain
is walked in seq order and its first bad record is named by file, line and seq. A trail is the files of one active
file name in one folder (the active file, its rotated files and its checkpoint, which the writer keeps together).
Two trails with the same chain id are never merged: each is verified on its own and the chain id is reported as
claimed twice (two replicas given one id, or a trail's files split across folders). Every trail needs a checkpoint
that names its chain (the one beside it, or one given): a trail without one fails unless the caller waives it for
that trail (``no_checkpoint``), since a cut tail is otherwise invisible; a checkpoint of another chain put beside a
trail is refused, never moved to the trail of its own chain.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
_TrailKey = tuple[str, str, str]  # chain id, real folder, active file name


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
    """What was read of one chain's trail (up to its first bad record, if any), and its first failure."""

    chain: str
    first_seq: int
    last_seq: int
    records: int
    files: tuple[str, ...]
    checkpoint_seq: int | None
    trail: str = ""  # the active file's path: folder and name
    first_ts: str | None = None
    last_ts: str | None = None
    error: Finding | None = None
    no_checkpoint: bool = False  # the caller said this trail has no checkpoint: its tail is unverified
    # (model, version, model_digest) of every verified record that ran a model: which bytes answered in this trail
    model_digests: frozenset[tuple[str, str, str]] = frozenset()

    @property
    def ok(self) -> bool:
        """True when this trail verified and no other trail claims its chain id."""
        return self.error is None

    def line(self) -> str:
        """One line: the chain, its verdict, what was read."""
        verdict = "OK" if self.error is None else f"FAILED ({self.error})"
        span = "" if self.first_ts is None else f", {self.first_ts} to {self.last_ts}"
        checkpoint = "" if self.checkpoint_seq is None else f", checkpoint at seq {self.checkpoint_seq}"
        if self.no_checkpoint:
            checkpoint = ", no checkpoint (--no-checkpoint): a cut tail cannot be detected"
        return (
            f"chain {self.chain}: {verdict}: seq {self.first_seq}..{self.last_seq}, {self.records} records{span}, "
            f"{len(self.files)} file(s) of {self.trail}{checkpoint}"
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``gateway audit verify --json``)."""
        return {
            "chain": self.chain,
            "ok": self.ok,
            "error": None if self.error is None else str(self.error),
            "trail": self.trail,
            "files": list(self.files),
            "records": self.records,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "checkpoint_seq": self.checkpoint_seq,
            "no_checkpoint": self.no_checkpoint,
            "model_digests": digests_by_model(self.model_digests),
        }


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
        out = [chain.line() for chain in self.chains]
        out.extend(f"note: {note}" for note in self.notes)
        out.extend(f"error: {error}" for error in self.errors)
        if self.ok:
            out.append(f"OK: {self.records} records in {len(self.chains)} chain(s) verified")
        else:
            out.append(f"FAILED: first bad record: {self.first_error}")
        return out

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``gateway audit verify --json``): the verdict, the chains, notes and failures."""
        seen = {ran for chain in self.chains for ran in chain.model_digests}
        return {
            "ok": self.ok,
            "records": self.records,
            "model_digests": digests_by_model(seen),
            "chains": [chain.as_dict() for chain in self.chains],
            "notes": list(self.notes),
            "errors": [str(error) for error in self.errors],
        }


def digests_by_model(seen: Iterable[tuple[str, str, str]]) -> dict[str, dict[str, list[str]]]:
    """``{model: {version: [digest, ...]}}``, sorted: the bytes each version was served from (more than one digest
    for a version means its files changed while the trail was written)."""
    nested: dict[str, dict[str, list[str]]] = {}
    for model, version, digest in sorted(seen):
        nested.setdefault(model, {}).setdefault(version, []).append(digest)
    return nested


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
    first_ts: str | None = None
    last_ts: str | None = None
    torn: str | None = None  # where the active file ends in an incomplete line
    ran: set[tuple[str, str, str]] = field(default_factory=set)

    def feed(self, path: Path, *, newest: bool) -> Finding | None:
        """Check every line of one file; the first failure, or None. ``newest``: the trail's active file, whose
        incomplete last line is a write cut by a crash (kept in ``torn``), not a failure."""
        try:
            handle = path.open("rb")
        except OSError as exc:
            return Finding(str(path), None, None, self.chain, f"cannot read: {exc.strerror}")
        with handle:
            for number, raw in enumerate(handle, 1):
                if not raw.endswith(b"\n"):
                    if newest:
                        self.torn = f"{path}:{number}"
                        return None
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
        self.last_seq, self.last_hash, self.last_ts = link.seq, link.hash, link.ts
        self.first_ts = self.first_ts if self.records else link.ts
        self.records += 1
        if link.ran is not None:
            self.ran.add(link.ran)
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
    no_checkpoint: Iterable[PathArg] = (),
) -> VerifyReport:
    """Verify a set of audit files (active, rotated, several chains, any order) and their checkpoints.

    ``checkpoint="auto"`` checks ``NAME.checkpoint`` beside each file's active name when it exists (and any
    ``*.checkpoint`` given in ``paths``); a path or list of paths checks exactly those; None checks none and
    requires none. Otherwise each trail must have a checkpoint of its own chain, except the trails
    named in ``no_checkpoint`` (a trail's active file, or a folder holding trails at any depth).
    ``allow_partial_start`` accepts a chain whose first given record is not seq 1 (older files archived).
    """
    errors: list[Finding] = []
    notes: list[str] = []
    logs, checkpoints = _classify(paths, checkpoint, errors, notes)
    if not logs and not errors:
        errors.append(Finding("", None, None, None, "no audit files given"))

    digest = Digester(hmac_key)
    trails: dict[_TrailKey, list[_LogFile]] = {}
    for path in logs:
        placed = _place(path, digest, errors, notes)
        if placed is not None:
            trails.setdefault((placed.chain, *_trail_of(path)), []).append(placed)

    points: dict[_TrailKey, list[tuple[Path, Checkpoint]]] = {}
    unreadable: dict[tuple[str, str], Finding] = {}  # by trail folder and name: they name no chain
    checkpoint_errors: list[Finding] = []
    for path in checkpoints:
        try:
            found = read_checkpoint(path, hmac_key)
        except ValueError as exc:
            found, problem = None, str(exc)
        else:
            problem = "checkpoint file not found" if found is None else ""
        if found is None:
            checkpoint_errors.append(Finding(str(path), None, None, None, problem))
            unreadable.setdefault(_trail_of(path), checkpoint_errors[-1])
            continue
        key = (found.chain, *_trail_of(path))
        beside = sorted(trail[0] for trail in trails if trail[1:] == key[1:])
        if beside and found.chain not in beside:
            # Another trail's genuine checkpoint put in this one's place (the key alone cannot tell): it vouches
            # for nothing here, and it is not moved over to the trail of its own chain either.
            checkpoint_errors.append(
                Finding(
                    str(path),
                    None,
                    found.seq,
                    beside[0],
                    f"checkpoint of chain {found.chain!r} beside the trail of chain {beside[0]!r}: a checkpoint "
                    "vouches only for its own chain (another trail's checkpoint put in this one's place?)",
                )
            )
            unreadable.setdefault(key[1:], checkpoint_errors[-1])
            continue
        same_chain = [trail for trail in trails if trail[0] == found.chain]
        if key not in trails and len(same_chain) == 1:  # given from elsewhere: it vouches for its chain's trail
            key = same_chain[0]
        points.setdefault(key, []).append((path, found))

    waived = _waived(trails, no_checkpoint, notes)

    claimed: dict[str, list[_TrailKey]] = {}
    for key in sorted(set(trails) | set(points)):
        claimed.setdefault(key[0], []).append(key)
    summaries: list[ChainSummary] = []
    total = 0
    for chain, keys in claimed.items():
        twice = _claimed_twice(chain, keys, trails, points) if len(keys) > 1 else None
        if twice is not None:
            errors.append(twice)
        for key in keys:
            files = sorted(trails.get(key, []), key=lambda item: (item.first_seq, item.path.name))
            summary, failure, point_errors = _verify_trail(
                key, files, points.get(key, []), digest, allow_partial_start, notes
            )
            errors.extend([failure] if failure else [])
            checkpoint_errors.extend(point_errors)
            missing = None
            if key in trails and key not in points and key[1:] not in unreadable and checkpoint is not None:
                if key in waived:
                    summary = dataclasses.replace(summary, no_checkpoint=True)
                else:
                    missing = _no_checkpoint(key, summary)
                    checkpoint_errors.append(missing)
            first = twice or failure or next(iter(point_errors), None) or unreadable.get(key[1:]) or missing
            summaries.append(dataclasses.replace(summary, error=first))
            total += summary.records
    errors.extend(checkpoint_errors)
    return VerifyReport(records=total, chains=tuple(summaries), errors=tuple(errors), notes=tuple(notes))


def _waived(trails: Iterable[_TrailKey], no_checkpoint: Iterable[PathArg], notes: list[str]) -> set[_TrailKey]:
    """The trails the caller says have no checkpoint: named by their active file or by a folder above it."""
    waived: set[_TrailKey] = set()
    for given in no_checkpoint:
        real = os.path.realpath(given)
        named = {
            key
            for key in trails
            if real in (key[1], os.path.join(key[1], key[2])) or key[1].startswith(real.rstrip(os.sep) + os.sep)
        }
        if not named:
            notes.append(f"{given}: no trail there (no_checkpoint)")
        waived |= named
    return waived


def _no_checkpoint(key: _TrailKey, summary: ChainSummary) -> Finding:
    return Finding(
        str(Path(summary.trail).with_name(key[2] + CHECKPOINT_SUFFIX)),
        None,
        None,
        key[0],
        "no checkpoint for this trail: a cut tail or a missing last file cannot be detected (restore the "
        "checkpoint or a copy of it; if this trail really has none, say so with --no-checkpoint TRAIL)",
    )


def _trail_of(path: Path) -> tuple[str, str]:
    """The trail a file or checkpoint belongs to: its real folder and its active file's name."""
    return os.path.realpath(path.parent), _active_name(path.name.removesuffix(CHECKPOINT_SUFFIX))


def _trail_name(key: _TrailKey, files: list[_LogFile], points: list[tuple[Path, Checkpoint]]) -> str:
    """The trail's active file as the caller spelled its folder."""
    given = files[0].path if files else points[0][0]
    return str(given.with_name(key[2]))


def _claimed_twice(
    chain: str,
    keys: list[_TrailKey],
    trails: dict[_TrailKey, list[_LogFile]],
    points: dict[_TrailKey, list[tuple[Path, Checkpoint]]],
) -> Finding:
    names = [_trail_name(key, trails.get(key, []), points.get(key, [])) for key in keys]
    return Finding(
        ", ".join(names),
        None,
        None,
        chain,
        f"{len(keys)} trails claim this chain id, each verified on its own: two writers were given the same "
        "chain id (two replicas?), or one trail's files were split across folders (keep them together)",
    )


def _verify_trail(
    key: _TrailKey,
    files: list[_LogFile],
    points: list[tuple[Path, Checkpoint]],
    digest: Digester,
    allow_partial_start: bool,
    notes: list[str],
) -> tuple[ChainSummary, Finding | None, list[Finding]]:
    """Walk one trail's files in seq order, then check its checkpoints: its summary, its first bad record (or
    file), and what its checkpoints found (checked only when every record verified)."""
    chain = key[0]
    walk = _Walk(chain, digest, allow_partial_start, {point.seq for _, point in points})
    failure = None
    for item in files:
        # Only the active file itself may end mid-record: a rotated file was complete when it was rotated.
        failure = walk.feed(item.path, newest=item is files[-1] and item.path.name == key[2])
        if failure is not None:
            break
    if walk.torn is not None:
        # A SIGKILL can cut a write between pages (generic_perform_write checks for fatal signals). The record was
        # never acknowledged (the answer leaves after the write returns), no checkpoint vouches for it, and the
        # gateway truncates it at its next start (writer: audit_partial_record_discarded).
        notes.append(
            f"{walk.torn}: incomplete last line after seq {walk.last_seq}: a write cut by a crash, never acknowledged"
        )
    point_errors = [] if failure else _check_points(chain, walk, points, notes)
    checked = [point.seq for _, point in points]
    summary = ChainSummary(
        chain=chain,
        first_seq=walk.first_seq or 0,
        last_seq=walk.last_seq,
        records=walk.records,
        files=tuple(str(item.path) for item in files),
        checkpoint_seq=max(checked) if checked else None,
        trail=_trail_name(key, files, points),
        first_ts=walk.first_ts,
        last_ts=walk.last_ts,
        model_digests=frozenset(walk.ran),
    )
    return summary, failure, point_errors


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
    """Split the arguments into log files and checkpoint files (directories: every visible file under them, so a
    folder of replicas' folders is one argument)."""
    auto = isinstance(checkpoint, str) and checkpoint == "auto"
    seen: set[str] = set()
    logs: list[Path] = []
    named_points: list[Path] = []
    for given in paths:
        path = Path(given)
        expanded = sorted(_visible_files(path)) if path.is_dir() else [path]
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
    else:
        explicit = [checkpoint] if isinstance(checkpoint, str | os.PathLike) else list(checkpoint)
        points.extend(Path(p) for p in explicit)
        points.extend(named_points)
    unique: dict[str, Path] = {}
    for point in points:
        unique.setdefault(os.path.realpath(point), point)
    return logs, list(unique.values())


def _visible_files(folder: Path) -> Iterable[Path]:
    """The files under ``folder``, at any depth, but none whose name or folder's name starts with a dot."""
    for item in folder.rglob("*"):
        if item.is_file() and not any(part.startswith(".") for part in item.relative_to(folder).parts):
            yield item


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
