"""The audit writer encodes the boundary's records with orjson: byte for byte the canonical JSON (docs/audit.md).

The verifier re-encodes every parsed record with the standard library and requires the line to be identical, so
any difference here would be a valid trail reported as tampered. These tests hold orjson (the locked release, and
the newest one in ``make test-latest``) to that for every value a call's record can hold.
"""

from __future__ import annotations

import json
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from gateway.audit import AuditLog, verify_files
from gateway.audit.chain import MAX_RECORD_BYTES, encode_canonical, utc_now
from gateway.audit.record import CallRecord, build
from gateway.audit.writer import _fast_canonical
from gateway.auth.certs import PeerCertificate
from gateway.auth.principal import Principal
from gateway.context import Call, Outcome
from gateway.tracing import CallTrace

KEY = b"k" * 32
_SURROGATES = range(0xD800, 0xE000)


def call_record(**fields: object) -> CallRecord:
    record = CallRecord(
        event="call",
        request_id="r",
        method="/gateway.v1.InferenceService/Predict",
        groups=["ml"],
        inputs=[{"name": "input", "datatype": "FP32", "shape": [1, 784]}],
        latency_ms=0.123,
        model=None,
        bytes_in=3150,
    )
    record.update(fields)
    return record


def every_code_point_in_pieces(piece_chars: int) -> list[str]:
    """Every Unicode scalar value (U+0000 to U+10FFFF, surrogates excepted), in strings of ``piece_chars``."""
    points = [chr(c) for c in range(sys.maxunicode + 1) if c not in _SURROGATES]
    return ["".join(points[i : i + piece_chars]) for i in range(0, len(points), piece_chars)]


def test_every_character_is_written_as_the_standard_encoder_writes_it() -> None:
    for piece in every_code_point_in_pieces(4096):
        record = call_record(reason=piece, inputs=[{"name": piece, "datatype": "FP32", "shape": [1]}])
        fast = _fast_canonical(record)
        assert fast is not None
        assert fast == encode_canonical(record).encode("utf-8")


def test_rounded_durations_are_written_as_the_standard_encoder_writes_them() -> None:
    rng = random.Random(7)
    values = [0.0, 0.0004, 0.0005, 0.001, 0.01, 0.999, 1.0, 59999.999, 1e6, 1e15, 1e16, 1.7e17]
    values += [rng.uniform(0, 10.0 ** rng.randint(0, 12)) for _ in range(20000)]
    for value in values:
        latency = round(value, 3)  # as audit/record.py and the backend exchange make them
        record = call_record(latency_ms=latency, backend={"name": "b", "code": "OK", "latency_ms": latency})
        assert _fast_canonical(record) == encode_canonical(record).encode("utf-8"), latency


def test_integers_and_booleans_are_written_as_the_standard_encoder_writes_them() -> None:
    for value in (0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, True, False, None):
        record = call_record(bytes_in=value, inputs=[{"name": "x", "datatype": "INT64", "shape": [value]}])
        assert _fast_canonical(record) == encode_canonical(record).encode("utf-8"), value


def test_what_orjson_refuses_takes_the_standard_path(tmp_path: Path) -> None:
    """A lone surrogate (from a token claim) and an integer past 64 bits: the standard encoder writes them, as
    for any record (the surrogate as U+FFFD), and the trail verifies."""
    surrogate, huge = call_record(sub="a\ud800b"), call_record(bytes_in=2**70)
    assert _fast_canonical(surrogate) is None and _fast_canonical(huge) is None
    path = tmp_path / "audit.log"
    with AuditLog(path, fsync="none", hmac_key=KEY) as audit:
        audit.write(surrogate)
        audit.write(huge)
    first, second = (json.loads(line) for line in path.read_bytes().splitlines())
    assert first["sub"] == "a\ufffdb" and second["bytes_in"] == 2**70
    assert verify_files([path], hmac_key=KEY).ok


def test_other_records_keep_the_standard_encoder() -> None:
    assert _fast_canonical({"event": "call", "latency_ms": float("nan")}) is None  # orjson would write null


@pytest.mark.parametrize("fsync", ["none", "batch"])
def test_a_trail_of_every_character_verifies(tmp_path: Path, fsync: str) -> None:
    """Written by the writer (its fast path) and read back by the verifier, which requires every line to be
    byte-identical to the standard encoder's canonical form."""
    path = tmp_path / "audit.log"
    pieces = every_code_point_in_pieces(2048)  # each record under MAX_RECORD_BYTES: written as it is, not cut
    with AuditLog(path, fsync=fsync, hmac_key=KEY) as audit:  # type: ignore[arg-type]
        for piece in pieces:
            audit.write(call_record(reason=piece))
    lines = path.read_bytes().splitlines()
    assert len(lines) == len(pieces) and max(map(len, lines)) < MAX_RECORD_BYTES
    assert [json.loads(line)["reason"] for line in lines] == pieces
    report = verify_files([path], hmac_key=KEY)
    assert report.ok, report.first_error


def _values(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [item for key, inner in value.items() for item in (key, *_values(inner))]
    if isinstance(value, list):
        return [item for inner in value for item in _values(inner)]
    return [value]


def test_a_record_as_build_makes_it_holds_only_the_values_these_tests_hold_orjson_to() -> None:
    """A tripwire: a field added to the record, or a new kind of value in one, must be checked here first (orjson
    writes small floats, NaN, enums and dataclasses otherwise than the canonical form)."""
    now = datetime.now(UTC)
    peer = PeerCertificate("spiffe://example.org/alice", "ab" * 32, "x5t", now, now, 1, x509.Name([]))
    principal = Principal("spiffe://example.org/alice", "ab" * 32, "alice", "https://issuer", "jti", frozenset("ba"))
    trace = CallTrace(tracer=None, span=None, context=None, trace_id="0af7651916cd43dd8448eb211c80319c")
    call = Call(
        "r" * 32, "/gateway.v1.InferenceService/PredictStream", "ipv4:127.0.0.1:5", time.perf_counter(), "k" * 16, trace
    )
    call = call.admitted(principal, peer).for_message(3)
    exchange = {"name": "b", "address": "127.0.0.1:1", "code": "OK", "latency_ms": round(0.0123456, 3)}
    inputs = ({"name": "input", "datatype": "FP32", "shape": [1, 784]},)
    outcome = Outcome("stream", "mlp", "2", "2", "d" * 64, "CPUExecutionProvider", "requested", "allow", "r", exchange)
    outcome = outcome.finished(inputs, model_ran=True)
    record = build(call, outcome, event="stream_message", code="OK", reason=None, bytes_in=1, bytes_out=2, messages=5)
    assert type(record) is CallRecord
    assert set(record) == {
        "event", "request_id", "method", "peer", "cert_identity", "cert_sha256", "sub", "iss", "jti", "groups",
        "scopes", "model", "requested_version", "version", "model_digest", "version_reason", "execution_provider",
        "action", "decision", "rule", "code", "reason", "latency_ms", "inputs", "bytes_in", "bytes_out", "trace_id",
        "backend", "message_index", "messages",
    }  # fmt: skip
    for value in _values(record):
        kind = type(value)
        assert kind in (str, int, bool, type(None)) or (kind is float and value >= 0 and value == round(value, 3))
    record.update(ts=utc_now(), chain="main", seq=1, prev="0" * 64)
    assert _fast_canonical(record) == encode_canonical(record).encode("utf-8")
