"""The audit trail end to end: one record per call whatever the outcome, field by field; a verifiable chain
under concurrent load; nothing secret in it; fail closed when the sink breaks; durable across SIGKILL."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import jwt
import numpy as np
import onnx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from onnx import TensorProto, helper

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway.audit import AuditLog, verify_files
from tests.conftest import wait_until
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub, tensor, trailer

X = np.zeros((1, 784), np.float32)
METHOD = "/gateway.v1.InferenceService/Predict"


def add_failing_model(models: Path) -> None:
    """A model whose signature accepts any length but whose Reshape fails at run time unless it divides by 3."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, None])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [3, -1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (models / "reshape3" / "1").mkdir(parents=True)
    onnx.save(model, models / "reshape3" / "1" / "model.onnx")


@pytest.fixture
def gw(start_gateway, model_repo):
    add_failing_model(model_repo)
    # Hundreds of refusals of one caller, each with its record: none blocked (limits.per_principal.max_refusals).
    return start_gateway(models=model_repo, overrides={"limits.per_principal.max_refusals": 0})


def call_with_id(gw, request, *, token, client="alice"):
    """Predict with a fresh request id; returns (response or RpcError, request id, the one record for it)."""
    request_id = uuid.uuid4().hex
    with gw.channel(client) as channel:
        md = (*auth(token), ("x-request-id", request_id))
        try:
            outcome = stub(channel).Predict(request, metadata=md, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            outcome = exc
    records = [r for r in gw.audit_records() if r["request_id"] == request_id]
    assert len(records) == 1, f"{len(records)} records for one call"
    return outcome, records[0]


def cert_sha256(pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def test_allowed_call_record_field_by_field(gw):
    token = gw.token(groups=["ml"], scopes=["predict", "read"])
    request = predict_request("mlp", {"input": X})
    response, record = call_with_id(gw, request, token=token)
    assert response.model_version == "2"
    claims = jwt.decode(token, options={"verify_signature": False})
    expected = {
        "event": "call",
        "method": METHOD,
        "cert_identity": "spiffe://gateway.local/client/alice",
        "cert_sha256": cert_sha256(gw.pki.read("alice.crt")),
        "sub": "alice",
        "iss": "https://gateway.local",
        "jti": claims["jti"],
        "groups": ["ml"],
        "scopes": ["predict", "read"],
        "model": "mlp",
        "requested_version": None,
        "version": "2",
        "version_reason": "default",
        "action": "predict",
        "decision": "allow",
        "rule": "alice-all",
        "code": "OK",
        "reason": None,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784]}],
        "bytes_in": request.ByteSize(),
        "bytes_out": response.ByteSize(),
        "chain": "main",
    }
    assert {key: record[key] for key in expected} == expected
    assert record["peer"].startswith("ipv4:127.0.0.1:")
    assert 0 < record["latency_ms"] < 10_000
    assert record["seq"] >= 1 and len(record["hash"]) == 64 and len(record["prev"]) == 64 and record["ts"]


@pytest.mark.parametrize(
    ("case", "code", "fields"),
    [
        (
            "unauthenticated",
            "UNAUTHENTICATED",
            {"sub": None, "reason": "token bound to another certificate", "decision": None, "model": None},
        ),
        (
            "permission_denied",
            "PERMISSION_DENIED",
            {"sub": "bob", "decision": "deny", "rule": None, "reason": "default deny", "model": "mlp", "version": "2"},
        ),
        (
            "not_found",
            "NOT_FOUND",
            {
                "sub": "alice",
                "decision": "allow",
                "rule": "alice-all",
                "model": "mlp",
                "requested_version": "7",
                "version": None,
                "reason": "model 'mlp' has no version 7",
            },
        ),
        (
            "invalid_argument",
            "INVALID_ARGUMENT",
            {"decision": "allow", "version": "2", "reason": "input 'input': datatype INT32, model expects FP32"},
        ),
        (
            "internal",
            "INTERNAL",
            {
                "decision": "allow",
                "model": "reshape3",
                "version": "1",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [4]}],
            },
        ),
    ],
)
def test_refused_and_failed_calls_leave_one_record_each(gw, case, code, fields):
    requests = {
        "unauthenticated": (predict_request("mlp", {"input": X}), gw.token(bind="bob"), "alice"),
        "permission_denied": (predict_request("mlp", {"input": X}), gw.token("bob", bind="bob"), "bob"),
        "not_found": (predict_request("mlp", {"input": X}, version="7"), gw.token(), "alice"),
        "invalid_argument": (predict_request("mlp", {"input": X.astype(np.int32)}), gw.token(), "alice"),
        "internal": (predict_request("reshape3", {"x": np.ones(4, np.float32)}), gw.token(), "alice"),
    }
    request, token, client = requests[case]
    outcome, record = call_with_id(gw, request, token=token, client=client)
    assert isinstance(outcome, grpc.RpcError) and outcome.code().name == code
    assert record["code"] == code
    for key, value in fields.items():
        assert record[key] == value, key
    if case == "internal":
        # The caller gets no internals, only the request id; the audit record keeps the cause.
        assert outcome.details() == (
            f"internal error (request id {record['request_id']}; see call_refused in the gateway's log)"
        )
        assert record["reason"].startswith("onnxruntime failed on reshape3:1")


def test_undecodable_and_unknown_method_calls_are_recorded(gw):
    with gw.channel() as channel:
        md = auth(gw.token())
        rpc_error(lambda: channel.unary_unary(METHOD)(b"\x0a\xff", metadata=md, timeout=TIMEOUT))
        exc = rpc_error(lambda: channel.unary_unary("/gateway.v1.Nope/Nothing")(b"", metadata=md, timeout=TIMEOUT))
    assert exc.code() == grpc.StatusCode.UNIMPLEMENTED
    *_, undecodable, unknown = gw.audit_records()
    assert (undecodable["code"], undecodable["method"]) == ("INVALID_ARGUMENT", METHOD)
    assert (unknown["code"], unknown["method"]) == ("UNIMPLEMENTED", "/gateway.v1.Nope/Nothing")


def test_unauthenticated_callers_are_refused_before_their_message_is_decoded_or_routed(gw):
    with gw.channel() as channel:
        garbage = rpc_error(lambda: channel.unary_unary(METHOD)(b"\x0a\xff", timeout=TIMEOUT))
        unknown = rpc_error(lambda: channel.unary_unary("/gateway.v1.Nope/Nothing")(b"", timeout=TIMEOUT))
    # Neither the message's shape nor which methods exist is told to a caller without a token.
    assert garbage.code() == unknown.code() == grpc.StatusCode.UNAUTHENTICATED
    *_, first, second = gw.audit_records()
    assert (first["method"], first["code"], first["reason"]) == (METHOD, "UNAUTHENTICATED", "missing token")
    assert (second["method"], second["code"]) == ("/gateway.v1.Nope/Nothing", "UNAUTHENTICATED")
    assert first["bytes_in"] == 0  # refused before its message was even read


def test_calls_over_the_concurrency_limit_are_refused_and_recorded(start_gateway):
    gw = start_gateway(overrides={"limits.max_concurrent_rpcs": 2})
    big = np.random.default_rng(0).random((8000, 784), dtype=np.float32)  # ~0.3 s each: the calls overlap
    codes: list[grpc.StatusCode] = []
    lock = threading.Lock()
    token = gw.token()

    def call() -> None:
        with gw.channel() as channel:
            try:
                stub(channel).Predict(predict_request("mlp", {"input": big}), metadata=auth(token), timeout=TIMEOUT)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert len(codes) == 8 and refused >= 1 and codes.count(grpc.StatusCode.OK) == 8 - refused, codes
    records = gw.audit_records()
    over = [r for r in records if r["reason"] == "concurrent call limit"]
    assert len(records) == 8 and len(over) == refused  # every call, refused or not, has its one record
    assert all(r["code"] == "RESOURCE_EXHAUSTED" and r["method"] == METHOD and r["sub"] == "alice" for r in over)


def test_stream_cancelled_by_the_client_leaves_one_closing_record_for_its_messages(gw):
    good = pb.PredictRequest(model_name="mlp", inputs=[tensor("input", X)])
    release = threading.Event()

    def requests():
        yield good
        release.wait(timeout=TIMEOUT)  # the server now waits for a second message that never comes

    with gw.channel() as channel:
        call = stub(channel).PredictStream(requests(), metadata=auth(gw.token()), timeout=TIMEOUT)
        assert next(call).WhichOneof("outcome") == "response"
        call.cancel()
        release.set()
    wait_until(lambda: gw.audit_records()[-1]["event"] == "stream", timeout_s=TIMEOUT)
    *earlier, message, closing = gw.audit_records()
    assert (message["event"], message["code"]) == ("stream_message", "OK")
    assert closing["messages"] == 1 and closing["request_id"] == message["request_id"]
    assert all(record["request_id"] != message["request_id"] for record in earlier)
    # grpcio ends a server's request iterator on a cancel either by raising or as if the client had closed
    # its side, depending on which of two completion events its poller handles first (see docs/audit.md).
    if closing["code"] == "OK":
        assert closing["reason"] is None
    else:
        assert closing["code"] == "CANCELLED" and closing["reason"].startswith("client cancelled")


def test_stream_gets_a_record_per_message_and_one_for_the_stream(gw):
    good = pb.PredictRequest(model_name="mlp", inputs=[tensor("input", X)])
    bad = pb.PredictRequest(model_name="mlp", inputs=[tensor("input", np.zeros((1, 3), np.float32))])
    with gw.channel() as channel:
        replies = list(stub(channel).PredictStream(iter([good, bad, good]), metadata=auth(gw.token()), timeout=TIMEOUT))
    assert len(replies) == 3
    *_, first, second, third, closing = gw.audit_records()
    assert [r["event"] for r in (first, second, third)] == ["stream_message"] * 3
    assert [r["message_index"] for r in (first, second, third)] == [0, 1, 2]
    assert [r["code"] for r in (first, second, third)] == ["OK", "INVALID_ARGUMENT", "OK"]
    assert all(r["action"] == "stream" for r in (first, second, third))
    assert closing["event"] == "stream" and closing["messages"] == 3 and closing["code"] == "OK"
    assert closing["request_id"] == first["request_id"]
    assert closing["bytes_in"] == 2 * good.ByteSize() + bad.ByteSize()


def test_concurrent_mixed_calls_leave_exactly_one_record_each_and_the_chain_verifies(gw):
    tokens = {"alice": gw.token(), "bob": gw.token("bob", bind="bob")}
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with gw.channel("alice") as alice, gw.channel("bob") as bob:
            for _ in range(125):
                kind = rng.choice(["ok", "ok", "denied", "invalid", "not_found", "unauthenticated", "list"])
                channel, token = (bob, tokens["bob"]) if kind == "denied" else (alice, tokens["alice"])
                if kind == "unauthenticated":
                    token = "not-a-token"
                try:
                    if kind == "list":
                        stub(channel).ListModels(pb.ListModelsRequest(), metadata=auth(token), timeout=TIMEOUT)
                    else:
                        x = X.astype(np.int32) if kind == "invalid" else X
                        model = "nope" if kind == "not_found" else "mlp"
                        stub(channel).Predict(
                            predict_request(model, {"input": x}), metadata=auth(token), timeout=TIMEOUT
                        )
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    outcomes.append(code)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    records = gw.audit_records()
    assert len(outcomes) == 2000 and len(records) == 2000
    assert sorted(r["code"] for r in records) == sorted(outcomes)
    assert [r["seq"] for r in records] == list(range(1, 2001))
    report = verify_files([gw.audit_path], hmac_key=gw.pki.read("audit-hmac.key").strip())
    assert report.ok, report.lines()


def test_no_token_or_tensor_value_reaches_the_audit_trail_or_the_logs(gw, capfd):
    token = gw.token()
    marker = np.full((1, 784), 4242.4242, np.float32)
    with gw.channel() as channel:
        client = stub(channel)
        client.Predict(predict_request("mlp", {"input": marker}), metadata=auth(token), timeout=TIMEOUT)
        client.Predict(
            pb.PredictRequest(model_name="mlp", input_data=marker.ravel()), metadata=auth(token), timeout=TIMEOUT
        )
        rpc_error(
            lambda: client.Predict(
                predict_request("mlp", {"input": marker}), metadata=auth(token + "x"), timeout=TIMEOUT
            )
        )
        rpc_error(
            lambda: client.Predict(
                predict_request("reshape3", {"x": np.full(4, 4242.4242, np.float32)}),
                metadata=auth(token),
                timeout=TIMEOUT,
            )
        )
    audit_text = gw.audit_path.read_text()
    logs = capfd.readouterr()
    assert "call_refused" in logs.out + logs.err  # the refusals were logged, with their reasons
    signature = token.split(".")[2]
    for text in (audit_text, logs.out, logs.err):
        assert signature not in text and token.split(".")[1] not in text
        assert "4242.42" not in text
        assert marker.tobytes()[:8].hex() not in text


def _point_at_dev_full(audit) -> None:
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, audit._file.fd)  # the trail's own descriptor now fails with ENOSPC, as on a full disk
    finally:
        os.close(full)


def test_unwritable_sink_fails_closed_and_the_gateway_recovers_by_itself(gw):
    token = gw.token()
    request = predict_request("mlp", {"input": X})
    delivered: list[str] = []  # request ids of every response the clients received
    refused: list[tuple[str, str | None]] = []

    def call(channel) -> None:
        request_id = uuid.uuid4().hex
        try:
            stub(channel).Predict(request, metadata=(*auth(token), ("x-request-id", request_id)), timeout=TIMEOUT)
            delivered.append(request_id)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            refused.append((request_id, trailer(exc, "x-retry-safe")))

    directory = gw.audit_path.parent
    moved = directory.with_name("audit-moved")
    with gw.channel() as channel:
        for _ in range(5):
            call(channel)
        _point_at_dev_full(gw.gateway.audit)
        os.rename(directory, moved)  # and reopening fails too (ENOTDIR), for as long as the outage lasts
        directory.write_text("not a directory")
        for _ in range(10):
            call(channel)
        assert len(refused) == 10 and not gw.gateway.audit.healthy
        # After the first failure the gateway refuses before running any model (the client may retry those).
        assert all(safe == "true" for _, safe in refused[1:])
        directory.unlink()
        os.rename(moved, directory)
        wait_until(lambda: (call(channel), gw.gateway.audit.healthy)[1], timeout_s=10)
        for _ in range(5):
            call(channel)
    recorded = {r["request_id"] for r in gw.audit_records()}
    assert set(delivered) <= recorded  # every response a client received has its record
    assert len(delivered) >= 10
    assert verify_files([gw.audit_path], hmac_key=gw.pki.read("audit-hmac.key").strip()).ok


@pytest.mark.parametrize("fsync", ["always", "batch"])
def test_sigkill_under_load_leaves_a_verifiable_chain_with_every_delivered_call(pki, demo_models, tmp_path, fsync):
    from tests.e2e.test_lifecycle import free_port

    port = free_port()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "all.yaml").write_text(
        "rules:\n  - id: all\n    effect: allow\n    principals: {subjects: [alice]}\n    models: ['*']\n    actions: '*'\n"
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(f"audit: {{fsync: {fsync}}}\n")
    audit_log = tmp_path / "audit" / "audit.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config),
            "--certs",
            str(pki.server_dir),
            "--models",
            str(demo_models),
            "--policies",
            str(policies),
            "--listen",
            f"127.0.0.1:{port}",
            "--audit-log",
            str(audit_log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from tests.conftest import RunningGateway

    client = RunningGateway(None, port, pki, audit_log, policies)
    token = client.token()
    delivered: list[str] = []
    stop = threading.Event()

    def worker() -> None:
        with client.channel() as channel:
            while not stop.is_set():
                request_id = uuid.uuid4().hex
                try:
                    stub(channel).Predict(
                        predict_request("mlp", {"input": X}),
                        metadata=(*auth(token), ("x-request-id", request_id)),
                        timeout=5,
                    )
                    delivered.append(request_id)
                except grpc.RpcError:
                    return  # the server is gone

    threads = [threading.Thread(target=worker) for _ in range(8)]
    try:
        with client.channel() as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        for thread in threads:
            thread.start()
        wait_until(lambda: len(delivered) > 300, timeout_s=60)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        stop.set()
        process.kill()
        for thread in threads:
            thread.join(timeout=30)
    key = pki.read("audit-hmac.key").strip()
    # A process crash loses nothing the kernel has: the checkpoint never vouches for more than the file holds.
    report = verify_files([audit_log.parent], hmac_key=key)
    assert report.ok, report.lines()
    lines = audit_log.read_text().splitlines()
    recorded = {line.split('"request_id":"')[1].split('"')[0] for line in lines}
    missing = set(delivered) - recorded
    assert not missing, f"{len(missing)} delivered calls without a record ({fsync})"
    # The next start continues the same chain (the dead process's file lock went with it).
    with AuditLog(audit_log, fsync=fsync, hmac_key=key) as restarted:
        restarted.write({"event": "call", "request_id": "after-restart"})
    report = verify_files([audit_log.parent], hmac_key=key)
    assert report.ok, report.lines()
    assert report.records == len(lines) + 1


def test_every_record_written_under_dev_audit_fail_open_is_marked(start_gateway):
    # Records written under a fail-open sink may have gaps that no one will ever see: each says so itself.
    gw = start_gateway(overrides={"dev_audit_fail_open": True})
    with gw.channel("alice") as channel:
        stub(channel).Predict(predict_request("mlp", {"input": X}), metadata=auth(gw.token()), timeout=TIMEOUT)
        with pytest.raises(grpc.RpcError):
            stub(channel).Predict(predict_request("mlp", {"input": X}), timeout=TIMEOUT)  # no token
    records = gw.audit_records()
    assert [r["code"] for r in records] == ["OK", "UNAUTHENTICATED"]
    assert all(r["dev_audit_fail_open"] is True for r in records)
    assert verify_files([gw.audit_path], hmac_key=gw.pki.read("audit-hmac.key").strip()).ok


def test_records_of_a_gateway_without_dev_options_carry_no_dev_mark(gw):
    with gw.channel("alice") as channel:
        stub(channel).Predict(predict_request("mlp", {"input": X}), metadata=auth(gw.token()), timeout=TIMEOUT)
    (record,) = gw.audit_records()
    assert "dev_audit_fail_open" not in record
