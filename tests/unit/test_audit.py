"""Tests for gateway.audit: the hash chain, tamper detection, checkpoints, restart, rotation, concurrency and
fail-closed behaviour, all against real files (write failures are made real with /dev/full and a vanished
directory, since the tests run as root and file modes do not stop root)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import os
import random
import re
import threading
from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.audit import (
    CHECKPOINT_SIZE,
    ZERO_HASH,
    AuditError,
    AuditLog,
    checkpoint_path,
    read_checkpoint,
    verify_files,
    worker_chain_id,
    worker_path,
)
from gateway.audit.chain import MAX_RECORD_BYTES, encode_canonical, parse_rotated, utc_now, utc_stamp
from gateway.errors import InternalError, UnavailableError
from tests.conftest import wait_until

KEY = b"k" * 32


def record(i: int, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event": "call",
        "request_id": f"req-{i}",
        "method": "/gateway.v1.InferenceService/Predict",
        "peer": "ipv4:127.0.0.1:5000",
        "sub": "alice",
        "groups": ["ml"],
        "model": "mlp",
        "version": "1",
        "action": "predict",
        "decision": "allow",
        "code": "OK",
        "latency_ms": 1.5,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4]}],
    }
    base.update(extra)
    return base


def strict_loads(line: str | bytes) -> Any:
    def reject(name: str) -> Any:
        raise ValueError(f"non-standard constant {name}")

    return json.loads(line, parse_constant=reject)


def read_records(path: Path) -> list[dict[str, Any]]:
    return [strict_loads(line) for line in path.read_bytes().splitlines()]


def write_n(path: Path, n: int, **options: Any) -> None:
    with AuditLog(path, **options) as audit:
        for i in range(n):
            audit.write(record(i + 1))


def edit_lines(path: Path, edit: Any) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(edit(lines)))


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.log"


@pytest.fixture
def captured() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as logs:
        yield logs


def events(logs: list[MutableMapping[str, Any]]) -> list[str]:
    return [entry["event"] for entry in logs]


# ------------------------------------------------------------------------------------------------ chain format


def test_records_carry_chain_fields_and_a_clean_log_verifies(log_path: Path) -> None:
    write_n(log_path, 3)
    records = read_records(log_path)
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert {r["chain"] for r in records} == {"main"}
    assert records[0]["prev"] == ZERO_HASH
    for previous, current in itertools.pairwise(records):
        assert current["prev"] == previous["hash"]
    for raw, parsed in zip(log_path.read_bytes().splitlines(), records, strict=True):
        assert raw.endswith(b',"hash":"' + parsed["hash"].encode() + b'"}')  # hash is the last key
        body = dict(parsed)
        stored = body.pop("hash")
        assert hashlib.sha256(encode_canonical(body).encode()).hexdigest() == stored
        assert parsed["ts"].endswith("Z") and parsed["request_id"].startswith("req-")
    report = verify_files([log_path])
    assert report.ok, report.lines()
    assert report.records == 3 and [c.chain for c in report.chains] == ["main"]
    assert report.chains[0].checkpoint_seq == 3
    assert report.lines()[-1].startswith("OK")


def test_caller_record_is_left_unchanged_and_reserved_hash_is_dropped(log_path: Path) -> None:
    mine = record(1, hash="forged", seq=99)
    snapshot = dict(mine)
    with AuditLog(log_path) as audit:
        audit.write(mine)
    assert mine == snapshot
    (written,) = read_records(log_path)
    assert written["seq"] == 1 and written["hash"] != "forged"
    assert verify_files([log_path]).ok


def test_timestamps_are_utc_iso_8601_to_the_microsecond_as_datetime_writes_them() -> None:
    second = 1_765_000_000 * 10**9
    rng = random.Random(7)
    moments = [0, second, second + 999, second + 1_000, second + 999_999_999, second + 10**9]
    moments += [rng.randrange(0, 4 * 10**18) for _ in range(2000)]  # in random order: the cached second changes
    for ns in moments:
        written = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1000)).isoformat()
        assert utc_stamp(ns) == written.replace("+00:00", "Z")
    stamps = [utc_now() for _ in range(2000)]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stamp) for stamp in stamps)
    moments_read = [datetime.fromisoformat(stamp) for stamp in stamps]
    assert moments_read == sorted(moments_read)  # in order (the clock is not stepped back during a test)
    assert moments_read[0].utcoffset() == timedelta(0)
    assert abs(moments_read[-1] - datetime.now(UTC)) < timedelta(minutes=1)  # the current time, not a cached one


def test_non_finite_floats_become_strings_and_the_file_is_strict_json(log_path: Path) -> None:
    odd = record(
        1,
        latency_ms=float("nan"),
        score=float("inf"),
        inputs=[{"name": "x", "datatype": "FP32", "shape": [1, 4], "range": [float("-inf"), 0.5]}],
        sub="bad\ud800claim",  # a lone surrogate from a JSON "\ud800" escape in a token claim
    )
    with AuditLog(log_path) as audit:
        audit.write(odd)
        audit.write(record(2))
    first, second = read_records(log_path)
    assert first["latency_ms"] == "NaN" and first["score"] == "Infinity"
    assert first["inputs"][0]["range"] == ["-Infinity", 0.5]
    assert first["sub"] == "bad\ufffdclaim"
    assert second["seq"] == 2
    assert verify_files([log_path]).ok


def _huge_fields(count: int) -> dict[str, Any]:
    return {f"field_{i}_" + "k" * 300: "\x00" * 5000 for i in range(count)}


@pytest.mark.parametrize(
    ("extra", "kept"),
    [
        ({"reason": "r" * 1_000_000}, {"reason": "r" * 256 + "...", "model": "mlp"}),
        ({"inputs": [{"name": f"in{i}", "datatype": "FP32", "shape": [1]} for i in range(5000)]}, {"model": "mlp"}),
        (_huge_fields(100), {"request_id": "req-1", "code": "OK"}),  # still too long once cut: the identity only
    ],
    ids=["long-string", "many-items", "many-long-fields"],
)
def test_a_record_over_the_size_limit_is_cut_to_fit_and_still_verifies(
    log_path: Path, extra: dict[str, Any], kept: dict[str, Any]
) -> None:
    with AuditLog(log_path, hmac_key=KEY) as audit:
        audit.write(record(1, **extra))
        audit.write(record(2))
    lines = log_path.read_bytes().splitlines(keepends=True)
    first, second = read_records(log_path)
    assert len(lines[0]) <= MAX_RECORD_BYTES < first["truncated"]
    assert {key: first[key] for key in kept} == kept
    assert len(first.get("inputs", [])) <= 16 and "truncated" not in second
    assert verify_files([log_path], hmac_key=KEY).ok


# ------------------------------------------------------------------------------------------------ tampering


def _alter(lines: list[bytes]) -> list[bytes]:
    lines[2] = lines[2].replace(b'"request_id":"req-3"', b'"request_id":"req-X"')
    return lines


def _remove(lines: list[bytes]) -> list[bytes]:
    return lines[:2] + lines[3:]


def _duplicate(lines: list[bytes]) -> list[bytes]:
    return [*lines[:3], lines[1], *lines[3:]]


def _fabricate(lines: list[bytes]) -> list[bytes]:
    fake = strict_loads(lines[2])  # a well-formed record with a made-up hash: only the key could make it fit
    fake.pop("hash")
    fake["request_id"] = "req-fake"
    return [*lines[:3], encode_canonical(fake).encode()[:-1] + b',"hash":"' + b"f" * 64 + b'"}\n', *lines[3:]]


def _reorder(lines: list[bytes]) -> list[bytes]:
    lines[2], lines[3] = lines[3], lines[2]
    return lines


def _garbage(lines: list[bytes]) -> list[bytes]:
    lines[2] = b"this is not json\n"
    return lines


def _reformat(lines: list[bytes]) -> list[bytes]:
    lines[2] = json.dumps(strict_loads(lines[2]), indent=None).encode() + b"\n"  # same values, other bytes
    return lines


def _truncate(lines: list[bytes]) -> list[bytes]:
    return [*lines[:-1], lines[-1][:40]]


@pytest.mark.parametrize(
    ("tamper", "line", "seq", "reason"),
    [
        (_alter, 3, 3, "hash mismatch"),
        (_remove, 3, 4, "expected seq 3, found 4"),
        (_duplicate, 4, 2, "expected seq 4, found 2"),
        (_fabricate, 4, 3, "hash mismatch"),
        (_reorder, 3, 4, "expected seq 3, found 4"),
        (_garbage, 3, None, "not a JSON record"),
        (_reformat, 3, 3, "canonical"),
    ],
    ids=["altered", "removed", "duplicated", "inserted", "reordered", "garbage", "reformatted"],
)
def test_tampering_names_the_first_bad_record(
    log_path: Path, tamper: Any, line: int, seq: int | None, reason: str
) -> None:
    write_n(log_path, 6)
    assert verify_files([log_path]).ok
    edit_lines(log_path, tamper)
    report = verify_files([log_path])
    assert not report.ok
    error = report.first_error
    assert error is not None
    assert (error.file, error.line, error.seq, error.chain) == (str(log_path), line, seq, "main"), report.lines()
    assert reason in error.reason
    assert report.lines()[-1].startswith("FAILED")


def test_a_truncated_acknowledged_record_is_missing_for_its_checkpoint(log_path: Path) -> None:
    write_n(log_path, 6)
    edit_lines(log_path, _truncate)
    report = verify_files([log_path])
    assert not report.ok
    assert "records 6..6 are missing" in report.first_error.reason, report.lines()


def test_a_write_cut_by_a_crash_is_a_note_not_a_failure(log_path: Path) -> None:
    """SIGKILL can cut a write between pages: the active file then ends in part of a record that was never
    acknowledged and that no checkpoint vouches for (the writer drops it at its next start)."""
    write_n(log_path, 6)
    with log_path.open("ab") as trail:
        trail.write(b'{"ts":"2026-12-07T00:00:00Z","seq":7,"pr')
    report = verify_files([log_path])
    assert report.ok, report.lines()
    assert [note for note in report.notes if "incomplete last line after seq 6" in note], report.notes


def test_an_incomplete_line_in_a_rotated_file_is_a_failure(log_path: Path) -> None:
    write_n(log_path, 30, max_bytes=1500, fsync="none")
    rotated = sorted(p for p in log_path.parent.iterdir() if parse_rotated(p.name))
    assert rotated
    rotated[0].write_bytes(rotated[0].read_bytes()[:-5])
    report = verify_files([log_path.parent])
    assert not report.ok
    assert "incomplete last line" in report.first_error.reason, report.lines()


def test_a_cut_rotated_file_is_a_failure_even_when_it_is_the_newest_file(log_path: Path) -> None:
    write_n(log_path, 30, max_bytes=1500, fsync="none")
    log_path.unlink()  # the active file gone: the newest rotated file ends the trail, and was complete when rotated
    newest = max((p for p in log_path.parent.iterdir() if parse_rotated(p.name)), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:-5])
    report = verify_files([log_path.parent], checkpoint=None)
    assert not report.ok
    assert "incomplete last line" in report.first_error.reason, report.lines()


REMOVE = object()  # as a field value for _forged: drop the field


def _forged(line: bytes, **changes: Any) -> bytes:
    """``line`` with ``changes`` and its SHA-256 hash recomputed: what anyone can do to a trail without a key."""
    fields = strict_loads(line)
    fields.pop("hash")
    for key, value in changes.items():
        if value is REMOVE:
            del fields[key]
        else:
            fields[key] = value
    body = encode_canonical(fields).encode()
    return body[:-1] + b',"hash":"' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def test_a_record_replaced_by_a_forgery_with_its_hash_recomputed_breaks_the_next_link(log_path: Path) -> None:
    # Without a key, the forged record verifies on its own and the checkpoint (at seq 5) still matches: only the
    # next record's prev, which names the original, tells.
    write_n(log_path, 5)
    edit_lines(log_path, lambda lines: [*lines[:2], _forged(lines[2], code="PERMISSION_DENIED"), *lines[3:]])
    error = verify_files([log_path]).first_error
    assert error is not None and (error.line, error.seq) == (4, 4)
    assert error.reason.startswith("prev does not match the hash of seq 3")


def test_a_first_record_forged_to_follow_another_is_refused(log_path: Path) -> None:
    write_n(log_path, 1)
    edit_lines(log_path, lambda lines: [_forged(lines[0], prev="1" * 64)])
    error = verify_files([log_path], checkpoint=None).first_error  # the checkpoint removed too
    assert error is not None and (error.line, error.seq) == (1, 1)
    assert "first record (seq 1) has a prev that is not all zeros" in error.reason


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda line: line[: line.rindex(b',"hash"')] + b"}\n", "missing or malformed hash field"),
        (lambda line: line[:-3] + b'00"}\n', "missing or malformed hash field"),
        (lambda line: _forged(line, chain=5), "missing or malformed chain or seq field"),
        (lambda line: _forged(line, seq=REMOVE), "missing or malformed chain or seq field"),
        (lambda line: _forged(line, seq=True), "missing or malformed chain or seq field"),
        (lambda line: _forged(line, seq=2.0), "missing or malformed chain or seq field"),
        (lambda line: _forged(line, seq=0), "missing or malformed chain or seq field"),
        (lambda line: _forged(line, prev="a" * 63), "missing or malformed prev field"),
    ],
    ids=["no-hash", "long-hash", "chain-number", "no-seq", "seq-bool", "seq-float", "seq-zero", "short-prev"],
)
def test_a_record_with_a_malformed_chain_field_is_named_so(log_path: Path, edit: Any, reason: str) -> None:
    write_n(log_path, 3)
    edit_lines(log_path, lambda lines: [lines[0], edit(lines[1]), *lines[2:]])
    error = verify_files([log_path]).first_error
    assert error is not None and (error.line, error.reason) == (2, reason)


@pytest.mark.parametrize("value", [b"[]", b'"a string"', b"42", b"null"])
def test_a_line_that_is_json_but_no_object_is_named_so(log_path: Path, value: bytes) -> None:
    write_n(log_path, 3)
    edit_lines(log_path, lambda lines: [lines[0], value + b"\n", *lines[2:]])
    error = verify_files([log_path]).first_error
    assert error is not None and (error.line, error.reason) == (2, "not a JSON object")


def test_a_record_of_another_chain_spliced_in_is_named_so(log_path: Path) -> None:
    for worker in (1, 2):
        write_n(worker_path(log_path, worker), 3, chain_id=worker_chain_id("main", worker))
    stranger = worker_path(log_path, 2).read_bytes().splitlines(keepends=True)[1]
    edit_lines(worker_path(log_path, 1), lambda lines: [lines[0], stranger, *lines[1:]])
    error = verify_files([worker_path(log_path, 1)], checkpoint=None).first_error
    assert error is not None and (error.line, error.chain) == (2, "main-w1")
    assert error.reason == "record of chain 'main-w2' among the records of chain 'main-w1': inserted"


def test_a_file_with_no_readable_record_is_refused_not_skipped(log_path: Path) -> None:
    write_n(log_path, 3)
    garbage = log_path.with_name("audit.log.0000000000000001-0000000000000009")
    garbage.write_bytes(b"not a record\n" * 3)
    error = verify_files([log_path, garbage]).first_error
    assert error is not None and (error.file, error.line) == (str(garbage), 1)
    assert error.reason == "no readable audit record in this file"


def test_missing_or_no_files_are_refused(log_path: Path, tmp_path: Path) -> None:
    write_n(log_path, 1)
    error = verify_files([log_path, tmp_path / "gone.log"]).first_error
    assert error is not None and (error.file, error.reason) == (str(tmp_path / "gone.log"), "file not found")
    (tmp_path / "empty").mkdir()
    for given in ([], [tmp_path / "empty"]):
        error = verify_files(given).first_error
        assert error is not None and error.reason == "no audit files given"


def test_hmac_chain_recomputed_without_the_key_is_detected(log_path: Path) -> None:
    write_n(log_path, 4, hmac_key=KEY)
    assert verify_files([log_path], hmac_key=KEY).ok

    # The attacker alters record 2 and recomputes every later hash and prev with plain SHA-256, and the checkpoint.
    records = read_records(log_path)
    records[1]["model"] = "other"
    prev = records[0]["hash"]
    out = log_path.read_bytes().splitlines(keepends=True)[:1]
    for rec in records[1:]:
        rec.pop("hash")
        rec["prev"] = prev
        body = encode_canonical(rec).encode()
        prev = hashlib.sha256(body).hexdigest()
        out.append(body[:-1] + b',"hash":"' + prev.encode() + b'"}\n')
    log_path.write_bytes(b"".join(out))
    fields = strict_loads(checkpoint_path(log_path).read_bytes())
    fields.pop("mac")
    fields["hash"] = prev
    fields["mac"] = hashlib.sha256(encode_canonical(fields).encode()).hexdigest()
    checkpoint_path(log_path).write_bytes(encode_canonical(fields).encode().ljust(CHECKPOINT_SIZE - 1) + b"\n")

    report = verify_files([log_path], hmac_key=KEY)
    assert report.first_error is not None
    assert (report.first_error.line, report.first_error.seq) == (2, 2)
    assert "hash mismatch" in report.first_error.reason
    assert any("checkpoint MAC mismatch" in e.reason for e in report.errors)


@pytest.mark.parametrize("key", [KEY, b"a long key, longer than the 64-byte block of SHA-256 " * 2])
def test_hmac_records_match_the_standard_construction(log_path: Path, key: bytes) -> None:
    write_n(log_path, 2, hmac_key=key)
    for raw in log_path.read_bytes().splitlines():
        body = strict_loads(raw)
        stored = body.pop("hash")
        assert hmac.new(key, encode_canonical(body).encode(), hashlib.sha256).hexdigest() == stored
    assert verify_files([log_path], hmac_key=key).ok


@pytest.mark.parametrize(
    ("written_with", "verified_with", "reason"),
    [
        (KEY, None, "no record's hash matches without a key: the trail is HMAC-keyed, pass its key (--hmac-key)"),
        (None, KEY, "no record's hash matches with this key: the wrong key, or the trail is not keyed"),
        (KEY, b"another key of 32 bytes, or more", "no record's hash matches with this key: the wrong key"),
    ],
    ids=["keyed-without-key", "unkeyed-with-key", "wrong-key"],
)
def test_a_trail_verified_with_the_wrong_key_or_none_says_so(
    log_path: Path, written_with: bytes | None, verified_with: bytes | None, reason: str
) -> None:
    write_n(log_path, 3, hmac_key=written_with)
    report = verify_files([log_path], hmac_key=verified_with, checkpoint=None)
    assert report.first_error is not None and (report.first_error.line, report.first_error.seq) == (1, 1)
    assert report.first_error.reason.startswith(reason)
    assert "record altered" not in report.first_error.reason


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_an_altered_first_record_is_an_edit_not_a_key_question(log_path: Path, key: bytes | None) -> None:
    write_n(log_path, 3, hmac_key=key)
    edit_lines(log_path, lambda lines: [lines[0].replace(b'"request_id":"req-1"', b'"request_id":"req-X"'), *lines[1:]])
    report = verify_files([log_path], hmac_key=key, checkpoint=None)
    assert report.first_error is not None and report.first_error.reason == "hash mismatch: record altered"


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_audit_opened_says_whether_the_trail_is_keyed(
    log_path: Path, captured: list[MutableMapping[str, Any]], key: bytes | None
) -> None:
    write_n(log_path, 1, hmac_key=key)
    (opened,) = [entry for entry in captured if entry["event"] == "audit_opened"]
    assert opened["keyed"] is (key is not None)


# ------------------------------------------------------------------------------------------------ checkpoint


def test_checkpoint_is_fixed_size_and_names_the_head(log_path: Path) -> None:
    write_n(log_path, 5, hmac_key=KEY)
    data = checkpoint_path(log_path).read_bytes()
    assert len(data) == CHECKPOINT_SIZE
    point = read_checkpoint(checkpoint_path(log_path), KEY)
    assert point is not None
    assert (point.chain, point.seq, point.file) == ("main", 5, "audit.log")
    assert point.hash == read_records(log_path)[-1]["hash"]
    expected = hmac.digest(
        KEY, encode_canonical({k: v for k, v in strict_loads(data).items() if k != "mac"}).encode(), "sha256"
    )
    assert strict_loads(data)["mac"] == expected.hex()


def test_removed_tail_is_detected_by_the_checkpoint(log_path: Path) -> None:
    write_n(log_path, 6)
    edit_lines(log_path, lambda lines: lines[:4])  # a clean cut: the chain alone looks intact
    assert verify_files([log_path], checkpoint=None).ok
    report = verify_files([log_path])
    error = report.first_error
    assert error is not None
    assert (error.file, error.line, error.seq) == (str(checkpoint_path(log_path)), None, 6)
    assert "records 5..6 are missing" in error.reason


def test_rewritten_record_at_checkpoint_seq_is_detected(log_path: Path) -> None:
    write_n(log_path, 3)
    point = read_checkpoint(checkpoint_path(log_path), None)
    assert point is not None
    # Replace the last record by a freshly chained one (possible without a key): the chain verifies, the
    # checkpoint does not.
    records = read_records(log_path)
    last = records[-1]
    last.pop("hash")
    last["code"] = "PERMISSION_DENIED"
    body = encode_canonical(last).encode()
    lines = log_path.read_bytes().splitlines(keepends=True)
    lines[-1] = body[:-1] + b',"hash":"' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'
    log_path.write_bytes(b"".join(lines))
    report = verify_files([log_path])
    assert report.first_error is not None and report.first_error.seq == 3
    assert "differs from the checkpoint" in report.first_error.reason


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_forged_checkpoint_is_detected(log_path: Path, key: bytes | None) -> None:
    write_n(log_path, 3, hmac_key=key)
    ckpt = checkpoint_path(log_path)
    ckpt.write_bytes(ckpt.read_bytes().replace(b'"seq":3', b'"seq":2'))
    report = verify_files([log_path], hmac_key=key)
    assert report.first_error is not None and report.first_error.file == str(ckpt)
    assert "MAC mismatch" in report.first_error.reason
    with pytest.raises(AuditError, match="MAC mismatch"):
        AuditLog(log_path, hmac_key=key).open()


def _forged_checkpoint(path: Path, **changes: Any) -> None:
    """Rewrite the checkpoint at ``path`` with ``changes`` and its unkeyed MAC recomputed."""
    fields = strict_loads(path.read_bytes())
    fields.pop("mac")
    for key, value in changes.items():
        if value is REMOVE:
            del fields[key]
        else:
            fields[key] = value
    fields["mac"] = hashlib.sha256(encode_canonical(fields).encode()).hexdigest()
    path.write_bytes(encode_canonical(fields).encode().ljust(CHECKPOINT_SIZE - 1) + b"\n")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"note": "x"}, "does not have exactly the fields"),
        ({"file": REMOVE}, "does not have exactly the fields"),
        ({"seq": -1}, "malformed seq or hash"),
        ({"seq": "3"}, "malformed seq or hash"),
        ({"hash": "A" * 64}, "malformed seq or hash"),
        ({"ts": 5}, "malformed chain, file, ts or mac"),
    ],
    ids=["extra-field", "missing-field", "negative-seq", "seq-text", "hash-uppercase", "ts-number"],
)
def test_a_checkpoint_with_malformed_fields_is_refused(log_path: Path, change: dict[str, Any], reason: str) -> None:
    write_n(log_path, 3)
    _forged_checkpoint(checkpoint_path(log_path), **change)
    error = verify_files([log_path]).first_error
    assert error is not None and error.file == str(checkpoint_path(log_path)) and reason in error.reason
    with pytest.raises(AuditError, match=reason):
        AuditLog(log_path).open()


def test_a_named_checkpoint_that_does_not_exist_is_refused(log_path: Path, tmp_path: Path) -> None:
    write_n(log_path, 1)
    error = verify_files([log_path], checkpoint=tmp_path / "gone.checkpoint").first_error
    assert error is not None and error.reason == "checkpoint file not found"


def test_a_fresh_trail_with_no_record_yet_verifies(log_path: Path) -> None:
    with AuditLog(log_path):
        pass
    assert read_checkpoint(checkpoint_path(log_path), None) is not None  # at seq 0
    report = verify_files([log_path.parent])
    assert report.ok and report.records == 0, report.lines()


def test_an_old_checkpoint_copy_before_the_archived_start_is_a_note(log_path: Path, tmp_path: Path) -> None:
    write_n(log_path, 3, fsync="none")
    shipped = tmp_path / "shipped.checkpoint"  # a copy kept elsewhere, as docs/audit.md advises
    shipped.write_bytes(checkpoint_path(log_path).read_bytes())
    with AuditLog(log_path, max_bytes=1500, fsync="none") as audit:
        for i in range(4, 31):
            audit.write(record(i))
    files = sorted(p for p in log_path.parent.iterdir() if parse_rotated(p.name))
    kept = [*files[1:], log_path]  # the oldest file, with seq 1..3, archived
    report = verify_files(kept, checkpoint=[shipped, checkpoint_path(log_path)], allow_partial_start=True)
    assert report.ok, report.lines()
    assert any("checkpoint seq 3 precedes the first record given" in note for note in report.notes)


# ------------------------------------------------------------------------------------------------ restart


def test_restart_continues_the_chain(log_path: Path) -> None:
    write_n(log_path, 3)
    first_life = read_records(log_path)
    write_n(log_path, 2)
    records = read_records(log_path)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3]["prev"] == first_life[-1]["hash"]
    assert verify_files([log_path]).ok


def test_restart_discards_a_partial_last_line(log_path: Path, captured: list[MutableMapping[str, Any]]) -> None:
    write_n(log_path, 2)
    intact = log_path.read_bytes()
    with log_path.open("ab") as handle:
        handle.write(b'{"chain":"main","event":"call","prev":"')  # a crash in the middle of a write
    with AuditLog(log_path) as audit:
        assert audit.seq == 2
        assert log_path.read_bytes() == intact
        audit.write(record(3))
    assert "audit_partial_record_discarded" in events(captured)
    assert [r["seq"] for r in read_records(log_path)] == [1, 2, 3]
    assert verify_files([log_path]).ok


def test_restart_refuses_a_trail_shorter_than_its_checkpoint(log_path: Path) -> None:
    write_n(log_path, 4)
    edit_lines(log_path, lambda lines: lines[:3])
    with pytest.raises(AuditError, match=r"checkpoint .* vouches for seq 4"):
        AuditLog(log_path).open()
    assert len(read_records(log_path)) == 3  # nothing was touched


def test_restart_refuses_a_last_record_that_does_not_verify(log_path: Path) -> None:
    write_n(log_path, 2, hmac_key=KEY)
    with pytest.raises(AuditError, match="wrong key"):
        AuditLog(log_path, hmac_key=b"another key, 32 bytes long......").open()
    with pytest.raises(AuditError, match="chain"):
        AuditLog(log_path, hmac_key=KEY, chain_id="other").open()
    checkpoint_path(log_path).unlink()  # without a checkpoint, the last record itself is checked
    with pytest.raises(AuditError, match="does not verify"):
        AuditLog(log_path, hmac_key=b"another key, 32 bytes long......").open()


# ------------------------------------------------------------------------------------------------ rotation


def test_rotation_by_size_keeps_the_chain_verifiable_across_files(log_path: Path) -> None:
    write_n(log_path, 40, max_bytes=2000, fsync="none")
    write_n(log_path, 10, max_bytes=2000, fsync="none")  # a restart after rotations continues the chain
    files = sorted(p for p in log_path.parent.iterdir() if parse_rotated(p.name))
    assert len(files) >= 5
    ranges = [parse_rotated(p.name) for p in files]
    assert ranges[0] is not None and ranges[0][1] == 1
    for path, parsed in zip(files, ranges, strict=True):
        assert parsed is not None
        seqs = [r["seq"] for r in read_records(path)]
        assert (seqs[0], seqs[-1]) == (parsed[1], parsed[2])
    shuffled = [*files, log_path]
    random.Random(7).shuffle(shuffled)
    report = verify_files(shuffled)
    assert report.ok, report.lines()
    assert report.records == 50 and report.chains[0].last_seq == 50
    assert verify_files([log_path.parent]).ok  # a directory means every file in it


def test_missing_middle_file_and_archived_start(log_path: Path) -> None:
    write_n(log_path, 30, max_bytes=1500, fsync="none")
    files = sorted(p for p in log_path.parent.iterdir() if parse_rotated(p.name))
    assert len(files) >= 3
    rest = [p for p in files if p != files[1]] + [log_path]
    report = verify_files(rest)
    error = report.first_error
    assert error is not None and (error.file, error.line) == (str(files[2]), 1)
    assert "a file may be missing" in error.reason

    archived = [*files[1:], log_path]
    report = verify_files(archived)
    assert report.first_error is not None and "starts at seq" in report.first_error.reason
    assert verify_files(archived, allow_partial_start=True).ok


def test_missing_last_file_is_detected_by_the_checkpoint(log_path: Path) -> None:
    write_n(log_path, 30, max_bytes=1500, fsync="none")
    with AuditLog(log_path, max_bytes=1500, fsync="none") as audit:
        audit.write(record(31))  # the active file now holds seq 31 only
    rotated = [p for p in log_path.parent.iterdir() if parse_rotated(p.name)]
    report = verify_files(rotated)  # the active file is "lost"; its checkpoint is found from the rotated names
    assert report.first_error is not None and report.first_error.seq == 31
    assert "missing" in report.first_error.reason


# ------------------------------------------------------------------------------------------------ concurrency


def test_concurrent_writers_get_one_gapless_chain(log_path: Path) -> None:
    threads_n, per_thread = 16, 500
    with AuditLog(log_path, fsync="batch") as audit:

        def work(t: int) -> None:
            for i in range(per_thread):
                audit.write(record(i, request_id=f"t{t}-{i}"))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stats = audit.stats()
    records = read_records(log_path)
    assert [r["seq"] for r in records] == list(range(1, threads_n * per_thread + 1))
    assert len({r["request_id"] for r in records}) == threads_n * per_thread
    assert stats.records_written == threads_n * per_thread and stats.healthy
    assert stats.groups_written < stats.records_written  # group commit did group
    assert verify_files([log_path]).ok


@pytest.mark.parametrize("policy", ["none", "batch", "always"])
async def test_records_of_one_loop_turn_are_committed_as_one_group(log_path: Path, policy: str) -> None:
    committers: list[int] = []
    with AuditLog(log_path, fsync=policy) as audit:  # type: ignore[arg-type]
        commit = audit._commit

        def spy(group: Any) -> bool:
            committers.append(threading.get_ident())
            return commit(group)

        audit._commit = spy  # type: ignore[method-assign]
        await asyncio.gather(*(audit.append(record(i, request_id=f"a-{i}")) for i in range(50)))
        await asyncio.gather(*(audit.append(record(i, request_id=f"b-{i}")) for i in range(50)))
        stats = audit.stats()
    assert stats.groups_written == 2 and stats.records_written == 100
    # The loop never waits on an fsync: under "always" the writer thread commits; otherwise the loop, in place.
    on_loop = [ident == threading.get_ident() for ident in committers]
    assert on_loop == ([False, False] if policy == "always" else [True, True])
    records = read_records(log_path)
    assert [r["seq"] for r in records] == list(range(1, 101))
    assert [r["request_id"] for r in records[:50]] == [f"a-{i}" for i in range(50)]
    assert verify_files([log_path]).ok


@pytest.mark.parametrize("policy", ["none", "batch"])
async def test_a_record_appended_alone_is_committed_without_waiting_a_loop_turn(log_path: Path, policy: str) -> None:
    turns: list[int] = []
    with AuditLog(log_path, fsync=policy) as audit:  # type: ignore[arg-type]
        asyncio.get_running_loop().call_soon(turns.append, 1)  # runs once the loop turns
        await audit.append(record(1), alone=True)
        assert not turns  # committed, and its caller answered, within the caller's step
        await audit.append(record(2))  # others may join this turn's group: it waits for the turn to end
        assert turns == [1]
        stats = audit.stats()
    assert stats.groups_written == 2
    assert [r["request_id"] for r in read_records(log_path)] == ["req-1", "req-2"]
    assert verify_files([log_path]).ok


async def test_loop_and_thread_writers_share_one_gapless_chain(log_path: Path) -> None:
    with AuditLog(log_path, fsync="batch") as audit:

        def work(t: int) -> None:
            for i in range(200):
                audit.write(record(i, request_id=f"t{t}-{i}"))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for turn in range(100):
            await asyncio.gather(*(audit.append(record(i, request_id=f"loop-{turn}-{i}")) for i in range(8)))
        for thread in threads:
            thread.join()
    records = read_records(log_path)
    assert [r["seq"] for r in records] == list(range(1, 4 * 200 + 100 * 8 + 1))
    assert verify_files([log_path]).ok


async def test_a_cancelled_caller_does_not_stop_its_group(log_path: Path) -> None:
    with AuditLog(log_path, fsync="always") as audit:
        with audit._io_lock:  # the writer thread holds the group at its checkpoint step until the cancel is in
            tasks = [asyncio.create_task(audit.append(record(i))) for i in range(3)]
            await asyncio.sleep(0.05)  # all three appended, their group handed to the writer thread
            assert audit._groups._committer == "writer"
            tasks[1].cancel()
            await asyncio.sleep(0)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert outcomes[0] is None and outcomes[2] is None and isinstance(outcomes[1], asyncio.CancelledError)
    assert len(read_records(log_path)) == 3  # committed: a cancelled caller's record is still in the trail


@pytest.mark.parametrize("policy", ["none", "always"])
async def test_a_cancelled_first_caller_still_commits_its_turns_group(log_path: Path, policy: str) -> None:
    # The turn's first caller commits its group: cancelled while the rest of the turn runs, it must commit anyway.
    with AuditLog(log_path, fsync=policy) as audit:  # type: ignore[arg-type]
        tasks = [asyncio.create_task(audit.append(record(i))) for i in range(3)]
        await asyncio.sleep(0)  # all three have appended; the first waits for the rest of the turn
        tasks[0].cancel()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        stats = audit.stats()
    assert isinstance(outcomes[0], asyncio.CancelledError) and outcomes[1:] == [None, None]
    assert stats.groups_written == 1
    assert [r["request_id"] for r in read_records(log_path)] == ["req-0", "req-1", "req-2"]


@pytest.mark.parametrize("policy", ["none", "always"])
async def test_loop_appends_fail_closed_and_recover(log_path: Path, policy: str) -> None:
    with AuditLog(log_path, fsync=policy) as audit:  # type: ignore[arg-type]
        await audit.append(record(1))
        _point_at_dev_full(audit)
        outcomes = await asyncio.gather(*(audit.append(record(i)) for i in (2, 3)), return_exceptions=True)
        assert all(isinstance(e, UnavailableError) for e in outcomes)
        assert not audit.healthy
        await audit.append(record(4))  # recovery reopens the file by its path
        assert audit.healthy
    assert [r["request_id"] for r in read_records(log_path)] == ["req-1", "req-4"]


async def test_loop_append_times_out_when_the_sink_hangs(log_path: Path) -> None:
    with AuditLog(log_path, fsync="always", write_timeout_s=0.05) as audit:
        # Holding the lock, the writer thread hangs at its checkpoint step, as on a hung disk.
        with audit._io_lock, pytest.raises(UnavailableError) as timed_out:
            await audit.append(record(1))
        assert timed_out.value.reason == "audit write timed out"


def test_close_flushes_everything_and_later_writes_are_refused(log_path: Path) -> None:
    audit = AuditLog(log_path, fsync="batch", batch_interval_s=60).open()  # the syncer never runs before close
    for i in range(20):
        audit.write(record(i))
    audit.close()
    point = read_checkpoint(checkpoint_path(log_path), None)
    assert point is not None and point.seq == 20
    assert len(read_records(log_path)) == 20
    with pytest.raises(UnavailableError):
        audit.write(record(21))
    audit.close()  # idempotent


# ------------------------------------------------------------------------------------------------ fail closed


def _point_at_dev_full(audit: AuditLog) -> None:
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, audit._file.fd)  # the log's own descriptor now reports ENOSPC
    finally:
        os.close(full)


@pytest.mark.parametrize("policy", ["none", "batch", "always"])
def test_failed_writes_fail_closed_and_recover(
    log_path: Path, captured: list[MutableMapping[str, Any]], policy: str
) -> None:
    directory = log_path.parent
    moved = directory.with_name("moved")
    with AuditLog(log_path, fsync=policy, batch_interval_s=0.01) as audit:  # type: ignore[arg-type]
        audit.write(record(1))
        audit.write(record(2))
        _point_at_dev_full(audit)
        with pytest.raises(UnavailableError) as failed:
            audit.write(record(3))
        assert "failed" in (failed.value.reason or "")
        assert not audit.healthy and audit.stats().write_failures >= 1

        os.rename(directory, moved)  # reopening now fails with ENOTDIR
        directory.write_text("not a directory")
        with pytest.raises(UnavailableError):
            audit.write(record(4))
        assert not audit.healthy

        directory.unlink()
        os.rename(moved, directory)
        audit.write(record(5))
        assert audit.healthy
        audit.write(record(6))
    assert "audit_write_failed" in events(captured) and "audit_recovered" in events(captured)
    records = read_records(log_path)
    assert [r["seq"] for r in records] == [1, 2, 3, 4]  # failed records consumed no seq
    assert [r["request_id"] for r in records] == ["req-1", "req-2", "req-5", "req-6"]
    assert verify_files([log_path]).ok


def test_partial_bytes_of_a_failed_group_are_truncated_on_recovery(log_path: Path) -> None:
    with AuditLog(log_path, fsync="none") as audit:
        audit.write(record(1))
        _point_at_dev_full(audit)
        with pytest.raises(UnavailableError):
            audit.write(record(2))
        with log_path.open("ab") as handle:  # what a short write before ENOSPC leaves behind
            handle.write(b'{"chain":"main","event":"call","pr')
        audit.write(record(3))
    assert [r["seq"] for r in read_records(log_path)] == [1, 2]
    assert verify_files([log_path]).ok


class _ShortWrites:
    """``os`` as the audit's active file sees it, but each ``write`` takes at most ``limit`` bytes (0: none)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls = 0

    def write(self, fd: int, data: Any) -> int:
        self.calls += 1
        return os.write(fd, bytes(data[: self.limit])) if self.limit else 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_a_group_written_in_short_writes_is_written_whole(log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.audit import active

    short = _ShortWrites(limit=100)
    with AuditLog(log_path, fsync="none") as audit:
        monkeypatch.setattr(active, "os", short)
        audit.write(record(1, pad="x" * 500))
        monkeypatch.undo()
        audit.write(record(2))
    assert short.calls > 5  # the group took several writes, each continuing where the last stopped
    assert [r["request_id"] for r in read_records(log_path)] == ["req-1", "req-2"]
    assert verify_files([log_path]).ok


def test_a_write_that_takes_nothing_fails_closed_as_a_full_disk(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.audit import active

    with AuditLog(log_path, fsync="none") as audit:
        monkeypatch.setattr(active, "os", _ShortWrites(limit=0))
        with pytest.raises(UnavailableError) as refused:
            audit.write(record(1))
        monkeypatch.undo()
        assert "No space left on device" in str(refused.value.reason)
        audit.write(record(2))  # recovered at the next group
    assert [r["request_id"] for r in read_records(log_path)] == ["req-2"]


@pytest.mark.parametrize("policy", ["none", "always"])
def test_moved_directory_fails_closed_although_the_descriptor_still_works(log_path: Path, policy: str) -> None:
    with AuditLog(log_path, fsync=policy) as audit:  # type: ignore[arg-type]
        audit.write(record(1))
        moved = log_path.parent.with_name("moved")
        os.rename(log_path.parent, moved)
        with pytest.raises(UnavailableError):
            audit.write(record(2))  # the file is no longer where the trail is expected
        os.rename(moved, log_path.parent)
        audit.write(record(3))
    assert [r["request_id"] for r in read_records(log_path)] == ["req-1", "req-3"]
    assert verify_files([log_path]).ok


@pytest.mark.parametrize("policy", ["none", "always"])
def test_removed_file_continues_the_chain_in_a_new_file(
    log_path: Path, captured: list[MutableMapping[str, Any]], policy: str
) -> None:
    with AuditLog(log_path, fsync=policy) as audit:  # type: ignore[arg-type]
        audit.write(record(1))
        audit.write(record(2))
        log_path.unlink()
        with pytest.raises(UnavailableError):
            audit.write(record(3))  # written into the removed file: refused, not acknowledged
        audit.write(record(4))
        assert audit.healthy
    assert "audit_file_replaced" in events(captured)
    records = read_records(log_path)
    assert [(r["seq"], r["request_id"]) for r in records] == [(3, "req-4")]
    report = verify_files([log_path])  # the break is reported where the new file starts
    assert report.first_error is not None
    assert (report.first_error.file, report.first_error.line, report.first_error.seq) == (str(log_path), 1, 3)
    assert verify_files([log_path], allow_partial_start=True).ok


# Under "batch" the file's identity is checked where records become durable, after each background fsync (the
# syncer's turn is taken by hand here: an interval of 60 s keeps its thread out of the way). A record acknowledged
# before that is in the file's keeping as the batch contract has it: a power loss could have taken it too.


def test_under_batch_a_moved_directory_fails_closed_at_the_next_fsync(
    log_path: Path, captured: list[MutableMapping[str, Any]]
) -> None:
    moved = log_path.parent.with_name("moved")
    with AuditLog(log_path, fsync="batch", batch_interval_s=60) as audit:
        audit.write(record(1))
        os.rename(log_path.parent, moved)
        audit.write(record(2))  # acknowledged before the fsync: written into the moved file, kept there
        audit._sync_once()
        assert not audit.healthy and audit.stats().write_failures == 0
        failed = [e for e in captured if e["event"] == "audit_write_failed"]
        assert [e["op"] for e in failed] == ["stat"]  # found by the identity check, before the checkpoint's write
        with pytest.raises(UnavailableError):
            audit.write(record(3))  # no file at the trail's path: refused until the directory is back
        os.rename(moved, log_path.parent)
        audit.write(record(4))
        assert audit.healthy
    assert [r["request_id"] for r in read_records(log_path)] == ["req-1", "req-2", "req-4"]
    assert verify_files([log_path]).ok


def test_under_batch_a_removed_file_is_refused_at_the_next_fsync(
    log_path: Path, captured: list[MutableMapping[str, Any]]
) -> None:
    with AuditLog(log_path, fsync="batch", batch_interval_s=60) as audit:
        audit.write(record(1))
        log_path.unlink()
        audit.write(record(2))  # acknowledged before the fsync into the removed file: lost with it
        audit._sync_once()
        assert not audit.healthy
        audit.write(record(3))  # recovered: the chain goes on in a new file
        assert audit.healthy
    failed = [e for e in captured if e["event"] == "audit_write_failed"]
    assert [e["op"] for e in failed] == ["stat"]
    assert "audit_file_replaced" in events(captured)
    assert [(r["seq"], r["request_id"]) for r in read_records(log_path)] == [(3, "req-3")]
    assert verify_files([log_path], allow_partial_start=True).ok


def test_write_times_out_when_the_sink_hangs(log_path: Path) -> None:
    with AuditLog(log_path, fsync="none", write_timeout_s=0.05) as audit:
        # Holding the lock blocks whoever commits at its checkpoint step, as a hung disk would. The first caller
        # commits its own record and hangs there; a caller queued behind it gives up after write_timeout_s.
        with audit._io_lock:
            first = threading.Thread(target=audit.write, args=(record(1),))
            first.start()
            wait_until(lambda: audit._groups._committer == "leader")
            with pytest.raises(UnavailableError) as timed_out:
                audit.write(record(2))
        first.join(timeout=10)
        assert timed_out.value.reason == "audit write timed out"
    # The queued record was committed after its caller gave up: the trail may hold a refused call, never lose
    # an acknowledged one.
    assert [r["request_id"] for r in read_records(log_path)] == ["req-1", "req-2"]


def test_unencodable_record_is_an_internal_error(log_path: Path) -> None:
    looping = record(1)
    looping["self"] = looping
    with AuditLog(log_path, fsync="none") as audit:
        with pytest.raises(InternalError):
            audit.write(looping)
        with pytest.raises(InternalError):
            audit.write({1: "not a string key"})  # type: ignore[dict-item]
        audit.write(record(2))
    assert [r["seq"] for r in read_records(log_path)] == [1]


def test_dev_fail_open_logs_and_returns(log_path: Path, captured: list[MutableMapping[str, Any]]) -> None:
    with AuditLog(log_path, fsync="none", dev_fail_open=True) as audit:
        audit.write(record(1))
        _point_at_dev_full(audit)
        audit.write(record(2))  # no exception
        assert not audit.healthy
    assert "audit_fail_open_enabled" in events(captured)
    failed_open = [e for e in captured if e["event"] == "audit_write_failed_open"]
    assert failed_open and failed_open[0]["request_id"] == "req-2" and failed_open[0]["log_level"] == "warning"


# ------------------------------------------------------------------------------------------------ several processes


def test_worker_files_hold_separate_chains_and_verify_together(log_path: Path) -> None:
    assert worker_path(log_path, 1).name == "audit-w1.log"
    for worker in (1, 2):
        write_n(worker_path(log_path, worker), 3 + worker, chain_id=worker_chain_id("main", worker), max_bytes=800)
    files = [p for p in log_path.parent.iterdir() if not p.name.endswith(".checkpoint")]
    report = verify_files(files)
    assert report.ok, report.lines()
    assert {c.chain: c.last_seq for c in report.chains} == {"main-w1": 4, "main-w2": 5}

    edit_lines(worker_path(log_path, 2), lambda lines: [lines[0].replace(b'"code":"OK"', b'"code":"NO"'), *lines[1:]])
    report = verify_files(files)
    assert report.first_error is not None and report.first_error.chain == "main-w2"


def test_a_second_writer_on_the_same_file_is_refused_until_the_first_closes(log_path: Path) -> None:
    with AuditLog(log_path, fsync="none") as first:
        first.write(record(1))
        with pytest.raises(AuditError, match="in use by another process"):
            AuditLog(log_path, fsync="none").open()
        first.write(record(2))  # the refused opener left the chain alone
    with AuditLog(log_path, fsync="none") as later:
        later.write(record(3))
    assert [r["seq"] for r in read_records(log_path)] == [1, 2, 3]
    assert verify_files([log_path.parent]).ok  # the lock file is not mistaken for a trail file


def test_invalid_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync"):
        AuditLog(tmp_path / "a.log", fsync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chain_id"):
        AuditLog(tmp_path / "a.log", chain_id="bad chain\n")
    with pytest.raises(ValueError, match="hmac_key"):
        AuditLog(tmp_path / "a.log", hmac_key=b"short")


# Kubernetes generates pod names (a Deployment's, a StatefulSet's) of at most 63 characters: its generator cuts the
# base name to 58 and adds 5 random ones.
LONGEST_POD_NAME = "g" * 46 + "-5d8f9c7b6f-x2x7q"
POD_NAMES = ["gateway-5d8f9c7b6-x2x7q", "gateway-0", "a", "web.v2-canary-7", LONGEST_POD_NAME]


@pytest.mark.parametrize("pod", POD_NAMES)
def test_every_pod_name_is_a_chain_id_and_so_is_it_with_a_workers_suffix(tmp_path: Path, pod: str) -> None:
    assert len(LONGEST_POD_NAME) == 63
    path = tmp_path / ("x" * 100) / ("audit-" + "y" * 60 + ".log")  # a long file name must fit in the checkpoint too
    path.parent.mkdir()
    for index, chain in ((None, pod), (63, worker_chain_id(pod, 63))):
        active = path if index is None else worker_path(path, index)
        write_n(active, 3, chain_id=chain, max_bytes=600)  # rotated: the longest file name the checkpoint holds
        report = verify_files([active.parent])
        assert report.ok, report.lines()
        assert chain in {summary.chain for summary in report.chains}


@pytest.mark.parametrize("chain", ["a" * 64, "", "pod name", "pod/name", "a" * 63 + "-w640"])
def test_chain_ids_beyond_a_pod_names_grammar_are_refused(tmp_path: Path, chain: str) -> None:
    with pytest.raises(ValueError, match="chain_id must be 1 to 63 letters"):
        AuditLog(tmp_path / "audit.log", chain_id=chain)


def replica_trails(root: Path, chains: dict[str, str], records: int = 5) -> dict[str, Path]:
    """Each replica's trail in its own folder (folder -> chain id), keyed and rotated every few records, as the
    pods of a Deployment write them; the active file of each."""
    trails = {}
    for folder, chain in chains.items():
        trails[folder] = root / folder / "audit.log"
        trails[folder].parent.mkdir(parents=True)
        write_n(trails[folder], records, chain_id=chain, hmac_key=KEY, max_bytes=900)
    return trails


PODS = {
    "gateway-7d9f-a1": "gateway-7d9f-a1",
    "gateway-7d9f-b2": "gateway-7d9f-b2",
    "gateway-7d9f-c3": "gateway-7d9f-c3",
}


def test_replicas_trails_are_verified_per_chain_across_their_rotated_files(tmp_path: Path) -> None:
    replica_trails(tmp_path, PODS)
    report = verify_files([tmp_path], hmac_key=KEY)  # one folder of the replicas' folders
    assert report.ok, report.lines()
    assert [chain.chain for chain in report.chains] == sorted(PODS)
    for chain in report.chains:
        assert chain.ok and chain.error is None
        assert (chain.records, chain.first_seq, chain.last_seq, chain.checkpoint_seq) == (5, 1, 5, 5)
        assert len(chain.files) > 1  # rotated: the chain runs across its files
        assert chain.first_ts is not None and chain.first_ts <= chain.last_ts
        assert chain.trail == str(tmp_path / chain.chain / "audit.log")
    assert report.records == 15
    assert report.lines()[0].startswith("chain gateway-7d9f-a1: OK: seq 1..5, 5 records, ")


def test_a_tampered_replica_fails_its_own_chain_alone(tmp_path: Path) -> None:
    trails = replica_trails(tmp_path, PODS)
    rotated = sorted(p for p in trails["gateway-7d9f-b2"].parent.iterdir() if parse_rotated(p.name))[-1]
    edit_lines(rotated, lambda lines: [lines[0].replace(b'"sub":"alice"', b'"sub":"mallory"'), *lines[1:]])
    report = verify_files([tmp_path / pod for pod in PODS], hmac_key=KEY)
    assert not report.ok
    verdicts = {chain.chain: chain.error for chain in report.chains}
    assert verdicts["gateway-7d9f-a1"] is None and verdicts["gateway-7d9f-c3"] is None
    failed = verdicts["gateway-7d9f-b2"]
    assert failed is not None and failed.file == str(rotated) and "hash mismatch" in failed.reason
    assert report.first_error == failed


def test_two_trails_claiming_one_chain_id_fail_and_are_not_merged(tmp_path: Path) -> None:
    # Two pods given the same chain id by mistake: two trails of seq 1..5 each.
    replica_trails(tmp_path, {"pod-a": "gateway", "pod-b": "gateway", "pod-c": "gateway-c"})
    report = verify_files([tmp_path], hmac_key=KEY)
    assert not report.ok
    twice = [chain for chain in report.chains if chain.chain == "gateway"]
    assert [chain.trail for chain in twice] == [
        str(tmp_path / "pod-a" / "audit.log"),
        str(tmp_path / "pod-b" / "audit.log"),
    ]
    for chain in twice:  # each verified on its own: its records, its checkpoint
        assert (chain.records, chain.last_seq, chain.checkpoint_seq) == (5, 5, 5)
        assert chain.error is not None and "2 trails claim this chain id" in chain.error.reason
    assert report.first_error is not None and report.first_error.chain == "gateway"
    assert len(report.errors) == 1  # nothing else is wrong with either trail
    (other,) = [chain for chain in report.chains if chain.chain == "gateway-c"]
    assert other.ok


def test_verify_report_as_json_has_the_verdict_and_a_summary_per_chain(tmp_path: Path) -> None:
    replica_trails(tmp_path, {"pod-a": "pod-a"})
    data = json.loads(json.dumps(verify_files([tmp_path], hmac_key=KEY).as_dict()))
    assert set(data) == {"ok", "records", "model_digests", "chains", "notes", "errors"} and data["ok"] is True
    (chain,) = data["chains"]
    assert set(chain) == {
        "chain", "ok", "error", "trail", "files", "records", "first_seq", "last_seq", "first_ts", "last_ts",
        "checkpoint_seq", "no_checkpoint", "model_digests",
    }  # fmt: skip
    assert (chain["chain"], chain["ok"], chain["error"], chain["records"]) == ("pod-a", True, None, 5)


# Run in a child process: it lowers its own descriptor limit and takes every descriptor left, as a flood of
# connections would, then writes across several rotations and checkpoints.
_WRITE_WITH_NO_DESCRIPTOR_LEFT = """
import errno, json, os, resource, sys, time
from gateway.audit import AuditLog
log = AuditLog(sys.argv[1], fsync=sys.argv[2], hmac_key=b"k" * 32, max_bytes=2000, batch_interval_s=0.05).open()
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
taken = []
while True:
    try:
        taken.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE, exc
        break
refused = 0
for i in range(40):
    try:
        log.write({"event": "call", "request_id": f"req-{i}", "detail": "x" * 200})
    except Exception:
        refused += 1
time.sleep(0.5)  # the batch syncer's checkpoint
result = {"refused": refused, "healthy": log.healthy, "seq": log.seq, "rotations": log.rotations}
for fd in taken:
    os.close(fd)
log.close()
print(json.dumps(result))
"""


@pytest.mark.parametrize("fsync", ["batch", "always"])
def test_the_sink_stays_up_with_no_descriptor_left_to_open(log_path: Path, fsync: str) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    child = subprocess.run(
        [sys.executable, "-c", _WRITE_WITH_NO_DESCRIPTOR_LEFT, str(log_path), fsync],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=False,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.splitlines()[-1])
    assert result == {"refused": 0, "healthy": True, "seq": 40, "rotations": result["rotations"]}
    assert result["rotations"] >= 3  # each rotation opened its next file with no descriptor to spare
    checkpoint = read_checkpoint(checkpoint_path(log_path), KEY)
    assert checkpoint is not None and checkpoint.seq == 40
    report = verify_files([log_path.parent], hmac_key=KEY)
    assert report.ok, report.lines()
