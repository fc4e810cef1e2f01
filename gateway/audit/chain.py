"""The audit trail's on-disk format: strict JSON records, the hash chain, checkpoints and file names.

Shared by the writer and the verifier so that both compute exactly the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import numbers
import os
import re
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from gateway.errors import StartupError

ZERO_HASH = "0" * 64
HASH_MISMATCH = "hash mismatch: record altered"
CHECKPOINT_SIZE = 512  # one sector: a crash leaves the old or the new checkpoint, never a mix (docs/audit.md)
CHECKPOINT_SUFFIX = ".checkpoint"
LOCK_SUFFIX = ".lock"  # an empty file whose flock marks the one process writing the chain
SEQ_DIGITS = 16
# The longest line a record may take, whatever its fields hold: a caller's text, an error's reason, many inputs.
MAX_RECORD_BYTES = 16 * 1024

# One encoder object: json.dumps with non-default options builds a new encoder on every call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
encode_canonical = _CANONICAL.encode

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Kubernetes keeps the names it generates (a Deployment's or a StatefulSet's pods) to 63 characters: any fits.
MAX_CHAIN_ID = 63
_CHAIN_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_CHAIN_ID}}}(-w[0-9]{{1,2}})?")  # with a worker's suffix
_ROTATED = re.compile(rf"(?P<base>.+)\.(?P<first>\d{{{SEQ_DIGITS}}})-(?P<last>\d{{{SEQ_DIGITS}}})")
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_SCALARS = frozenset({int, bool, type(None)})
_CHECKPOINT_KEYS = frozenset({"chain", "file", "hash", "mac", "seq", "ts"})
_MAX_BODY_BYTES = MAX_RECORD_BYTES - len(',"hash":""}\n') - 64
_CUT_CHARS = 256  # of each string in a record over the limit
_CUT_ITEMS = 16  # of each list and mapping in a record over the limit
# What is left of a record still over the limit once cut: the fields that say where it stands and what it was.
_KEPT_FIELDS = ("chain", "seq", "prev", "ts", "event", "request_id", "method", "code")


class AuditError(StartupError):
    """The audit trail cannot be continued safely (missing records, a bad checkpoint, a foreign file)."""


def validate_chain_id(chain_id: str) -> str:
    """``chain_id`` itself, or ValueError: it goes into every record and the checkpoint, so it stays short and plain;
    any pod name fits, and a worker's ``-w<index>`` after it."""
    if not _CHAIN_ID.fullmatch(chain_id):
        raise ValueError(
            f"chain_id must be 1 to {MAX_CHAIN_ID} letters, digits, '.', '_' or '-' (a pod name fits), got {chain_id!r}"
        )
    return chain_id


class Digester:
    """Hex SHA-256 of a message, or HMAC-SHA256 (RFC 2104) with the audit key, from the standard library.

    Each message copies one keyed ``hmac.HMAC`` object rather than calling ``hmac.digest``: the one-shot form
    releases the GIL on every call, which in the writer thread hands the GIL to one of the waiting handler
    threads per record (measured, 16 threads, fsync=always: 72 us per record with it, 47 without), while an
    HMAC object keeps it for messages under 2 KiB and its copy skips re-hashing the padded key.
    """

    __slots__ = ("_keyed", "keyed")

    def __init__(self, key: bytes | None) -> None:
        self.keyed = key is not None
        self._keyed = hmac.new(key, digestmod=hashlib.sha256) if key is not None else None

    def __call__(self, body: bytes) -> str:
        """The hex digest of ``body``."""
        if self._keyed is None:
            return hashlib.sha256(body).hexdigest()
        mac = self._keyed.copy()
        mac.update(body)
        return mac.hexdigest()


def seal(record: dict[str, Any], digest: Digester, *, body: bytes | None = None) -> tuple[bytes, str]:
    """The record's line (canonical JSON with ``hash`` appended as the last key, newline included) and its hash.

    ``record`` must already carry ``chain``, ``seq`` and ``prev`` and no ``hash``. The hash covers the canonical
    JSON of everything else, which is the line itself minus the ``,"hash":"..."`` member. A record that is not
    strict JSON as it stands (NaN, a lone surrogate, a numpy scalar) is made so first, and one whose line would
    be longer than MAX_RECORD_BYTES is cut down (``bounded``); the common record is encoded once, with no
    Python-level walk over its values. ``body``: the record's canonical JSON, where the caller has it already.
    """
    if body is None:
        try:
            body = encode_canonical(record).encode("utf-8")
        except (ValueError, TypeError):
            body = encode_canonical(make_strict(record)).encode("utf-8")
    if len(body) > _MAX_BODY_BYTES:
        body = encode_canonical(bounded(record, len(body))).encode("utf-8")
    mac = digest(body)
    return body[:-1] + b',"hash":"' + mac.encode("ascii") + b'"}\n', mac


# ---------------------------------------------------------------------------------------------------------------
# Strict JSON: every value the trail holds must be readable by any JSON parser (RFC 8259 has no NaN or Infinity).


def _text(value: str) -> str:
    if value.isascii():  # O(1) in CPython: nearly every audit string takes this path
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (a JSON "\ud800" escape in a token claim) has no UTF-8 form: keep a marker instead.
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # U+FFFD marks each
    return value


def _is_clean(value: Any) -> bool:
    """True when ``value`` is already strict JSON made of plain types: checked without building anything."""
    kind = type(value)
    if kind is str:
        return value.isascii()
    if kind in _SCALARS:
        return True
    if kind is float:
        return value - value == 0.0  # NaN and +-Infinity give NaN
    if kind is list:
        return all(_is_clean(item) for item in value)
    if kind is dict:
        return all(type(key) is str and key.isascii() and _is_clean(item) for key, item in value.items())
    return False


def strict_value(value: Any) -> Any:
    """``value`` made strict-JSON-safe: non-finite floats become strings, odd types become plain ones."""
    kind = type(value)
    if kind is str:
        return _text(value)
    if kind in _SCALARS:
        return value
    if kind is float:
        return value if math.isfinite(value) else _NON_FINITE.get(value, "NaN")
    if kind is list or kind is tuple:
        return [strict_value(item) for item in value]
    if kind is dict:
        return _strict_mapping(value)
    return _plain(value)


def _strict_mapping(mapping: Mapping[Any, Any]) -> dict[str, Any]:
    return {
        (_text(key) if type(key) is str else str(strict_value(key))): strict_value(item)
        for key, item in mapping.items()
    }


def _plain(value: Any) -> Any:
    """Subclasses and foreign scalars (enums, numpy numbers, paths, sets) as the plain JSON value they stand for."""
    if isinstance(value, str):
        return _text(str.__str__(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return strict_value(float(value))
    if isinstance(value, Mapping):
        return _strict_mapping(value)
    if isinstance(value, set | frozenset):
        return [strict_value(item) for item in sorted(value, key=repr)]
    if isinstance(value, list | tuple):
        return [strict_value(item) for item in value]
    return _text(str(value))


def make_strict(record: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Make every value of ``record`` strict JSON in place (NaN, Infinity and -Infinity as strings); keys stay."""
    for key, value in record.items():
        if not _is_clean(value):
            record[key] = strict_value(value)
    return record


def _cut(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= _CUT_CHARS else value[:_CUT_CHARS] + "..."
    if isinstance(value, list | tuple):
        return [_cut(item) for item in value[:_CUT_ITEMS]]
    if isinstance(value, Mapping):
        return {_cut(key): _cut(item) for key, item in list(value.items())[:_CUT_ITEMS]}
    return value


def _small(value: Any) -> bool:
    return isinstance(value, str) or (type(value) is int and abs(value) < 2**63)


def bounded(record: Mapping[str, Any], size: int) -> dict[str, Any]:
    """A strict-JSON record whose body of ``size`` bytes is over the limit, cut to fit: every string to 256
    characters and every list or mapping to 16 items; if that is not enough, only the fields that place and name
    it. ``truncated`` holds the size it had."""
    cut = {key: _cut(value) for key, value in record.items()}
    cut["truncated"] = size
    if len(encode_canonical(cut).encode("utf-8")) <= _MAX_BODY_BYTES:
        return cut
    # At most 8 fields of at most 259 characters, 6 bytes each when escaped: well under the limit.
    kept = {key: cut[key] for key in _KEPT_FIELDS if _small(cut.get(key))}
    kept["truncated"] = size
    return kept


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_strict(text: str | bytes) -> Any:
    """``json.loads`` that refuses NaN and Infinity, as every other JSON parser does."""
    return json.loads(text, parse_constant=_reject_constant)


class Head(NamedTuple):
    """The last committed record of a chain: what the next record chains to, and what a checkpoint may vouch for
    (``file``: the file that holds it)."""

    seq: int
    hash: str
    file: str


# ---------------------------------------------------------------------------------------------------------------
# Records as read back.


@dataclass(frozen=True, slots=True)
class Link:
    """The chain fields of one record as read back from a file."""

    chain: str
    seq: int
    prev: str
    hash: str
    ts: str | None = None  # when it was written, as the record says (a summary shows it; nothing checks it)
    ran: tuple[str, str, str] | None = None  # model, version and model_digest of a record whose call ran them


def check_line(raw: bytes, digest: Digester) -> tuple[Link | None, str | None]:
    """Parse one line (without its newline) and check its own hash: ``(link, None)`` or ``(link or None, reason)``."""
    try:
        record = parse_strict(raw)
    except ValueError:  # UnicodeDecodeError included
        return None, "not a JSON record (garbage or a truncated line)"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    stored, chain, seq, prev = record.pop("hash", None), record.get("chain"), record.get("seq"), record.get("prev")
    if not (isinstance(stored, str) and _HEX64.fullmatch(stored)):
        return None, "missing or malformed hash field"
    if not isinstance(chain, str) or type(seq) is not int or seq < 1:
        return None, "missing or malformed chain or seq field"
    if not (isinstance(prev, str) and _HEX64.fullmatch(prev)):
        return None, "missing or malformed prev field"
    ts = record.get("ts")
    link = Link(chain=chain, seq=seq, prev=prev, hash=stored, ts=ts if isinstance(ts, str) else None, ran=_ran(record))
    body = encode_canonical(record).encode("utf-8")
    # Byte equality with the canonical form rejects edits that leave the parsed values alone (duplicate keys,
    # reordered keys, whitespace, escapes): a reader must see exactly what was hashed.
    if raw != body[:-1] + b',"hash":"' + stored.encode("ascii") + b'"}':
        return link, "line is not in canonical form (reformatted, reordered or duplicated keys)"
    if not hmac.compare_digest(digest(body), stored):
        return link, HASH_MISMATCH
    return link, None


_RUNS = frozenset({"predict", "stream"})  # the actions that run a model (gateway.policy.Action)


def _ran(record: dict[str, Any]) -> tuple[str, str, str] | None:
    """(model, version, model_digest) of a record whose call ran that version and answered OK. A refusal (denied,
    malformed inputs) or a metadata call names the version it resolved too, but no bytes answered it."""
    if record.get("code") != "OK" or record.get("action") not in _RUNS:
        return None
    fields = (record.get("model"), record.get("version"), record.get("model_digest"))
    return fields if all(isinstance(value, str) for value in fields) else None  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: the chain head, MAC-protected, rewritten in place at a fixed size.


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The last committed record of a chain, as the writer vouches for it."""

    chain: str
    seq: int
    hash: str
    file: str
    ts: str


def _checkpoint_fields(checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "chain": checkpoint.chain,
        "seq": checkpoint.seq,
        "hash": checkpoint.hash,
        "file": checkpoint.file,
        "ts": checkpoint.ts,
    }


def encode_checkpoint(checkpoint: Checkpoint, digest: Digester) -> bytes:
    """The checkpoint file's exact bytes: one JSON object with its ``mac``, space-padded to CHECKPOINT_SIZE."""
    fields = _checkpoint_fields(checkpoint)
    fields["mac"] = digest(encode_canonical(fields).encode("utf-8"))
    data = encode_canonical(fields).encode("utf-8")
    if len(data) >= CHECKPOINT_SIZE:
        raise ValueError(f"checkpoint of {len(data)} bytes does not fit in {CHECKPOINT_SIZE}")
    # Fixed size, rewritten in place: one pwrite of one sector, no rename (see docs/audit.md for the numbers).
    return data + b" " * (CHECKPOINT_SIZE - 1 - len(data)) + b"\n"


def decode_checkpoint(data: bytes, digest: Digester) -> Checkpoint:
    """A checkpoint from its file's bytes, or ValueError naming what is wrong (bad MAC: forged or corrupt)."""
    try:
        fields = parse_strict(data)
    except ValueError as exc:
        raise ValueError("checkpoint is not a JSON object (empty, torn or garbage)") from exc
    if not isinstance(fields, dict) or set(fields) != _CHECKPOINT_KEYS:
        raise ValueError("checkpoint does not have exactly the fields chain, file, hash, mac, seq, ts")
    mac = fields.pop("mac")
    seq, hash_ = fields["seq"], fields["hash"]
    if type(seq) is not int or seq < 0 or not isinstance(hash_, str) or not _HEX64.fullmatch(hash_):
        raise ValueError("checkpoint has a malformed seq or hash")
    if not all(isinstance(fields[name], str) for name in ("chain", "file", "ts")) or not isinstance(mac, str):
        raise ValueError("checkpoint has a malformed chain, file, ts or mac")
    if not hmac.compare_digest(digest(encode_canonical(fields).encode("utf-8")), mac):
        raise ValueError("checkpoint MAC mismatch: forged or corrupt checkpoint, or the wrong key")
    return Checkpoint(chain=fields["chain"], seq=seq, hash=hash_, file=fields["file"], ts=fields["ts"])


def read_checkpoint(path: Path, key: bytes | None, *, attempts: int = 3) -> Checkpoint | None:
    """The checkpoint at ``path`` (None when there is none), or ValueError when it does not verify.

    A reader racing the writer's in-place rewrite can see a torn copy; a few re-reads tell that apart from a file
    that really is bad.
    """
    for attempt in range(attempts):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_checkpoint(data, Digester(key))
        except ValueError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.002)
    return None  # unreachable: the last attempt returns or raises


def utc_now() -> str:
    """The current UTC time as ISO 8601 with a ``Z``, to the microsecond: ``2026-12-07T07:14:33.123456Z``."""
    return utc_stamp(time.time_ns())


_second: tuple[int, str] = (-1, "")  # the last second stamped, and its date and time of day


def utc_stamp(ns: int) -> str:
    """``ns`` (nanoseconds since the epoch) as ``utc_now`` writes it: what ``datetime.isoformat`` writes for that
    microsecond, ``Z`` for its ``+00:00`` (no fraction when it is zero). Every record is stamped, so the date and time
    of day are formatted once a second, not once a record."""
    global _second  # one (second, text) pair, read and swapped whole: safe from any thread
    second, micro = divmod(ns // 1000, 1_000_000)
    cached, prefix = _second
    if second != cached:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, prefix)
    return f"{prefix}.{micro:06d}Z" if micro else prefix + "Z"


# ---------------------------------------------------------------------------------------------------------------
# File names.


def checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """The checkpoint file beside an active file: ``audit.log`` -> ``audit.log.checkpoint``."""
    path = Path(path)
    return path.with_name(path.name + CHECKPOINT_SUFFIX)


def lock_path(path: str | os.PathLike[str]) -> Path:
    """The lock file beside an active file: ``audit.log`` -> ``audit.log.lock``."""
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


def rotated_path(path: str | os.PathLike[str], first: int, last: int) -> Path:
    """The name a full active file is renamed to: ``audit.log.0000000000000001-0000000000004200``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{first:0{SEQ_DIGITS}d}-{last:0{SEQ_DIGITS}d}")


def parse_rotated(name: str) -> tuple[str, int, int] | None:
    """``(active file name, first seq, last seq)`` for a rotated file name, else None."""
    match = _ROTATED.fullmatch(name)
    if match is None:
        return None
    return match["base"], int(match["first"]), int(match["last"])


def worker_path(path: str | os.PathLike[str], worker_index: int) -> Path:
    """The active file of one worker process: ``audit.log`` -> ``audit-w1.log`` (each worker writes its own chain)."""
    if worker_index < 0:
        raise ValueError("worker_index must be >= 0")
    path = Path(path)
    return path.with_name(f"{path.stem}-w{worker_index}{path.suffix}")


def worker_chain_id(chain_id: str, worker_index: int) -> str:
    """The chain id of one worker process: ``main`` -> ``main-w1``."""
    return validate_chain_id(f"{chain_id}-w{worker_index}")
