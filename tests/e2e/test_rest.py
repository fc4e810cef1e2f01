"""The Open Inference Protocol's REST binding over real mutual TLS, driven by curl (--cert/--key/--cacert) and a
raw TLS socket: every endpoint, each refusal with its status, body and headers, and the one audit record of each.

The module's gateway serves REST on a port of its own, with small limits so that the oversized body, the slow
body and the connection cap can be shown quickly.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from gateway.errors import split_sent_message
from tests.e2e.helpers import closed_by_server

if shutil.which("curl") is None:
    pytest.skip("curl is not installed", allow_module_level=True)

MAX_BODY = 256 * 1024
MAX_CONNECTIONS = 6
INFER = "/v2/models/{model}/infer"


@pytest.fixture(scope="module")
def gw(start_gateway_module):
    return start_gateway_module(
        overrides={
            "http.listen": "127.0.0.1:0",
            "http.max_connections": MAX_CONNECTIONS,
            "limits.max_message_bytes": MAX_BODY,
            "limits.message_timeout_s": 1.0,
            "limits.per_principal.max_refusals": 0,  # this module is refused on purpose, many times
        }
    )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def curl(gw, path: str, *args: str, client: str | None = "alice", token: str | None = "") -> Answer:
    """One request with curl; ``token=""``: a valid token of ``client`` bound to its certificate."""
    pki = gw.pki
    tls = ["--cacert", str(pki.path("ca.crt"))]
    if client:
        tls += ["--cert", str(pki.path(f"{client}.crt")), "--key", str(pki.path(f"{client}.key"))]
    if token == "":
        token = gw.token(client or "alice", bind=client or "alice")
    auth = ["-H", f"Authorization: Bearer {token}"] if token else []
    done = subprocess.run(
        [
            "curl",
            "-sS",
            "--http1.1",
            "--max-time",
            "20",
            "-i",
            *tls,
            *auth,
            *args,
            f"https://localhost:{gw.gateway.http_port}{path}",
        ],
        capture_output=True,
        timeout=30,
    )
    if done.returncode != 0:
        return Answer(-done.returncode, {}, done.stderr)
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Answer(int(lines[0].split()[1]), headers, body)


def last_record(gw) -> dict:
    return gw.audit_records()[-1]


def reference(models: Path, name: str, version: int, feeds: dict) -> list[np.ndarray]:
    path = models / name / str(version) / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


X = np.random.default_rng(5).random((1, 784), dtype=np.float32)


def infer_json(data=None, **extra) -> str:
    values = X.ravel().tolist() if data is None else data
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": values}], **extra})


def test_health_needs_a_certificate_and_no_token_and_leaves_no_record(gw):
    before = len(gw.audit_records())
    for path, key in (("/v2/health/live", "live"), ("/v2/health/ready", "ready")):
        answer = curl(gw, path, token=None)
        assert (answer.status, answer.json()) == (200, {key: True})
    assert curl(gw, "/v2/health/live", client=None, token=None).status < 0  # no certificate: no handshake
    assert len(gw.audit_records()) == before


def test_every_endpoint_answers_as_the_protocol_says(gw, demo_models):
    server = curl(gw, "/v2")
    assert server.status == 200 and server.json()["name"] == "gateway"
    assert len(server.headers["x-request-id"]) == 32
    metadata = curl(gw, "/v2/models/mlp").json()
    assert (metadata["name"], metadata["versions"], metadata["inputs"][0]["shape"]) == ("mlp", ["1", "2"], [-1, 784])
    assert curl(gw, "/v2/models/mlp/versions/1").json()["name"] == "mlp"
    assert curl(gw, "/v2/models/mlp/ready").json() == {"name": "mlp", "ready": True}
    assert curl(gw, "/v2/models/mlp/versions/1/ready").status == 200
    assert curl(gw, "/v2/models/mlp/config").json()["input"][0] == {
        "name": "input",
        "data_type": "TYPE_FP32",
        "dims": [-1, 784],
    }
    index = curl(gw, "/v2/repository/index", "-X", "POST").json()
    assert {"name": "mlp", "version": "1", "state": "READY"} in index
    for path, version in (("/v2/models/mlp/infer", 2), ("/v2/models/mlp/versions/1/infer", 1)):
        answer = curl(gw, path, "-H", "content-type: application/json", "-d", infer_json(id="q-1"))
        assert answer.status == 200, answer.body
        body = answer.json()
        assert (body["model_name"], body["model_version"], body["id"]) == ("mlp", str(version), "q-1")
        (output,) = body["outputs"]
        (expected,) = reference(demo_models, "mlp", version, {"input": X})
        assert (output["name"], output["datatype"], output["shape"]) == ("output", "FP32", [1, 10])
        np.testing.assert_allclose(np.array(output["data"]).reshape(1, 10), expected, rtol=1e-5)
    record = last_record(gw)
    assert (record["method"], record["code"], record["model"], record["version"], record["sub"]) == (
        "POST /v2/models/{model}/versions/{version}/infer",
        "OK",
        "mlp",
        "1",
        "alice",
    )
    assert record["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [1, 784]}]
    assert record["peer"].startswith("ipv4:127.0.0.1:") and record["cert_identity"].endswith("/client/alice")


def test_the_binary_extension_round_trips_with_curl(gw, demo_models, tmp_path):
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 784], "parameters": {"binary_data_size": X.nbytes}}
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    (tmp_path / "body").write_bytes(header + X.tobytes())
    answer = curl(
        gw,
        INFER.format(model="mlp"),
        "-H",
        f"Inference-Header-Content-Length: {len(header)}",
        "-H",
        "content-type: application/octet-stream",
        "--data-binary",
        f"@{tmp_path / 'body'}",
    )
    assert answer.status == 200, answer.body
    length = int(answer.headers["inference-header-content-length"])
    document = json.loads(answer.body[:length])
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 40}
    (expected,) = reference(demo_models, "mlp", 2, {"input": X})
    np.testing.assert_allclose(np.frombuffer(answer.body[length:], np.float32).reshape(1, 10), expected, rtol=1e-5)


REFUSALS = {
    # name: (curl arguments, status, the record's code, what the error says)
    "malformed json": (("-d", "{not json"), 400, "INVALID_ARGUMENT", "malformed JSON"),
    "wrong shape": (("-d", infer_json(data=[0.0] * 10)), 400, "INVALID_ARGUMENT", "10 values in data"),
    "wrong datatype": (
        ("-d", json.dumps({"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 784], "data": [0.0] * 784}]})),
        400,
        "INVALID_ARGUMENT",
        "model expects FP32",
    ),
    "truncating value": (
        ("-d", infer_json(data=["1"] * 784)),
        400,
        "INVALID_ARGUMENT",
        "FP32 data holds string values",
    ),
    "unknown model (allowed caller)": (("-d", infer_json()), 404, "NOT_FOUND", "no-such"),
    "oversized body": (("--data-binary", "@BIG"), 413, "RESOURCE_EXHAUSTED", "over the limit"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_malformed_requests_are_refused_with_their_status_and_audited(gw, case, tmp_path):
    args, status, code, message = REFUSALS[case]
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_BODY + 1))
    args = tuple(f"@{big}" if arg == "@BIG" else arg for arg in args)
    model = "no-such" if "unknown model" in case else "mlp"
    answer = curl(gw, INFER.format(model=model), "-H", "content-type: application/json", *args)
    assert answer.status == status, answer.body
    assert message in answer.json()["error"]
    record = last_record(gw)
    assert (record["method"], record["code"], record["sub"]) == ("POST /v2/models/{model}/infer", code, "alice")
    assert record["request_id"] == answer.headers["x-request-id"]


def test_token_failures_are_401_with_the_bearer_challenge_and_audited(gw):
    bobs_token = gw.token("alice", bind="bob")  # a valid token, bound to another certificate
    for token, error, term in (
        (None, "invalid_request", "missing token"),
        ("not-a-jwt", "invalid_token", "malformed token"),
        (bobs_token, "invalid_token", "token bound to another certificate"),
    ):
        answer = curl(gw, "/v2/models/mlp", token=token)
        assert answer.status == 401
        # RFC 6750 3: the challenge, as the gRPC trailer gives it; the body says the term and what to do.
        challenge = f'Bearer realm="gateway", error="{error}", error_description="{term}"'
        assert answer.headers["www-authenticate"] == challenge
        message, request_id = split_sent_message(answer.json()["error"])
        assert message.startswith(f"{term}: ") and request_id == answer.headers["x-request-id"]
        record = last_record(gw)
        assert (record["method"], record["code"], record["sub"]) == ("GET /v2/models/{model}", "UNAUTHENTICATED", None)
        assert record["cert_identity"].endswith("/client/alice") and record["reason"].startswith(term)


def test_a_caller_the_policy_denies_learns_nothing_about_what_exists(gw):
    answers = []
    for model in ("mlp", "no-such-model"):
        for path, args in ((f"/v2/models/{model}", ()), (INFER.format(model=model), ("-d", infer_json()))):
            answer = curl(gw, path, *args, client="bob")
            assert answer.status == 403
            answers.append(split_sent_message(answer.json()["error"])[0].replace(model, "MODEL"))
            record = last_record(gw)
            assert (record["code"], record["decision"], record["sub"], record["model"]) == (
                "PERMISSION_DENIED",
                "deny",
                "bob",
                model,
            )
            assert record["inputs"] == []  # decided before the body was parsed
    # The same answers whether the model exists or not (but for the name the caller sent).
    assert (
        answers[:2] == answers[2:] and answers[0] == "no rule lets you 'metadata' on model 'MODEL' (it may not exist)"
    )


def test_unknown_paths_and_methods_are_refused_after_authentication(gw):
    assert curl(gw, "/v2/nothing/here", token=None).status == 401
    answer = curl(gw, "/v2/nothing/here")
    assert answer.status == 404
    assert (last_record(gw)["method"], last_record(gw)["code"]) == ("HTTP (unknown path)", "UNIMPLEMENTED")
    assert curl(gw, "/v2/models/mlp/infer").status == 405  # GET on a POST endpoint


def tls_socket(gw, client: str = "alice") -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(gw.pki.path("ca.crt")))
    context.load_cert_chain(gw.pki.path(f"{client}.crt"), gw.pki.path(f"{client}.key"))
    raw = socket.create_connection(("127.0.0.1", gw.gateway.http_port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def test_a_body_that_does_not_arrive_in_time_is_408_and_audited(gw):
    token = gw.token()
    with tls_socket(gw) as s:
        s.sendall(
            f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
            'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inp'.encode()
        )
        reply = s.recv(65536).decode()  # the gateway answers once limits.message_timeout_s (1 s) has passed
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "Connection: close" in reply
    record = last_record(gw)
    assert (record["code"], record["reason"]) == ("DEADLINE_EXCEEDED", "request body not received in time")


def test_a_connection_that_sends_no_complete_request_head_is_closed(start_gateway):
    running = start_gateway(overrides={"http.listen": "127.0.0.1:0", "http.idle_timeout_s": 0.5})
    running.extra = {}
    with tls_socket(type("G", (), {"pki": running.pki, "gateway": running.gateway})()) as s:
        s.sendall(b"GET /v2 HTTP/1.1\r\nHost: loc")  # and never the rest
        s.settimeout(10)
        assert s.recv(65536) == b""  # closed by the server, nothing answered
    assert running.audit_records() == []


def test_connections_past_the_cap_are_closed_at_accept(gw):
    refused = gw.gateway.rest.refused_connections
    held = [tls_socket(gw) for _ in range(MAX_CONNECTIONS)]
    try:
        extra = socket.create_connection(("127.0.0.1", gw.gateway.http_port), timeout=10)
        # Closed at accept: long before limits.handshake_timeout_s (5 s) would close a connection that sends nothing.
        deadline = time.monotonic() + 3
        while not closed_by_server(extra) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert closed_by_server(extra)
        assert gw.gateway.rest.refused_connections == refused + 1
        extra.close()
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10  # the slots come back once the held connections are gone
    while curl(gw, "/v2/health/live", token=None).status != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert curl(gw, "/v2/health/live", token=None).status == 200


def test_rest_answers_the_same_outputs_as_grpc_model_infer(gw):
    from gateway._pb.inference import grpc_service_pb2 as oip_pb
    from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
    from tests.e2e.helpers import TIMEOUT, auth

    request = oip_pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=X.shape)
    request.raw_input_contents.append(X.tobytes())
    with gw.channel() as channel:
        reply = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=auth(gw.token()), timeout=TIMEOUT
        )
    over_grpc = np.frombuffer(reply.raw_output_contents[0], np.float32)
    (output,) = curl(gw, INFER.format(model="mlp"), "-d", infer_json()).json()["outputs"]
    np.testing.assert_array_equal(
        np.array(output["data"], np.float32), over_grpc
    )  # bit for bit: JSON floats round-trip


def test_a_blocked_caller_gets_429_with_retry_after_and_a_draining_gateway_503(start_gateway):
    running = start_gateway(overrides={"http.listen": "127.0.0.1:0", "limits.per_principal.max_refusals": 2})
    for _ in range(2):  # two refusals counted against alice: she is blocked
        assert curl(running, "/v2/models/no-such-model").status == 404
    blocked = curl(running, "/v2/models/mlp")
    assert blocked.status == 429 and blocked.headers["retry-after"] == "1"
    assert "too many refused requests" in blocked.json()["error"]
    assert running.audit_records()[-1]["code"] == "RESOURCE_EXHAUSTED"
    running.gateway.boundary.close()  # what the shutdown does once its drain has passed
    draining = curl(running, "/v2", client="bob")
    assert draining.status == 503 and draining.headers["x-retry-safe"] == "true"
    assert split_sent_message(draining.json()["error"]) == (
        "the gateway is shutting down",
        draining.headers["x-request-id"],
    )
    record = running.audit_records()[-1]
    assert (record["method"], record["code"], record["cert_identity"].rsplit("/", 1)[1]) == (
        "GET /v2",
        "UNAVAILABLE",
        "bob",
    )


def test_the_rest_port_serves_a_rotated_server_certificate_without_restart(start_gateway, pki_copy):
    from cryptography import x509

    from tests.conftest import ROOT, run_script, wait_until

    running = start_gateway(use_pki=pki_copy, overrides={"http.listen": "127.0.0.1:0", "tls.reload_interval_s": 0.05})

    def serial() -> int:
        with tls_socket(running) as s:
            return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number

    first = serial()
    with tls_socket(running) as kept:  # a connection opened before the rotation keeps its certificate and works
        run_script(ROOT / "scripts/gen_certs.sh", "--server", pki_copy.dir)
        wait_until(lambda: serial() != first)
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    assert curl(running, "/v2").status == 200  # a new connection, on the rotated certificate


def test_rest_calls_are_counted_with_the_labels_grpc_calls_get(start_gateway):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    running = start_gateway(overrides={"http.listen": "127.0.0.1:0", "metrics.listen": "127.0.0.1:0"})
    url = f"http://127.0.0.1:{running.gateway.metrics.port}/metrics"

    def calls() -> dict[tuple[str, str, str], float]:
        with urllib.request.urlopen(url, timeout=10) as response:
            families = text_string_to_metric_families(response.read().decode())
            return {
                (s.labels["method"], s.labels["model"], s.labels["code"]): s.value
                for family in families
                for s in family.samples
                if s.name == "gateway_calls_total"
            }

    before = calls()
    assert curl(running, INFER.format(model="mlp"), "-d", infer_json()).status == 200
    assert curl(running, "/v2/models/mlp", client="bob").status == 403
    assert curl(running, "/v2/no/such/path/like/this").status == 404  # a caller's path is never a label
    after = calls()
    moved = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert moved == {
        ("POST /v2/models/{model}/infer", "mlp", "OK"): 1,
        ("GET /v2/models/{model}", "mlp", "PERMISSION_DENIED"): 1,
        ("HTTP (unknown path)", "-", "UNIMPLEMENTED"): 1,
    }


def test_a_client_that_expects_100_continue_gets_it_once_admitted_and_only_then(gw):
    body = infer_json().encode()
    head = (
        "POST /v2/models/mlp/infer HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    with tls_socket(gw) as s:
        s.sendall(f"{head}Authorization: Bearer {gw.token()}\r\n\r\n".encode())
        assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 OK")
    with tls_socket(gw) as s:  # no token: refused at once, no invitation to send the body
        s.sendall(f"{head}\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 401")


def test_a_call_past_limits_max_call_s_is_504_and_audited(start_gateway):
    # The body's wait alone (limits.message_timeout_s, 30 s) would hold it longer: the call's own cap ends it.
    running = start_gateway(
        overrides={"http.listen": "127.0.0.1:0", "limits.max_call_s": 1.0, "limits.message_timeout_s": 30.0}
    )
    started = time.monotonic()
    with tls_socket(running) as s:
        s.sendall(
            f"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {running.token()}\r\n"
            "x-request-id: held-rest\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
        )
        reply = s.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 504"), reply
    assert "limits.max_call_s" in reply
    assert time.monotonic() - started < 20  # the server's cap, not the socket's timeout
    (record,) = [r for r in running.audit_records() if r["request_id"] == "held-rest"]
    assert (record["method"], record["code"], record["reason"]) == (
        "POST /v2/models/{model}/infer",
        "DEADLINE_EXCEEDED",
        "call time limit",
    )


def test_a_revoked_client_certificate_is_401_with_a_bare_challenge_and_audited(start_gateway, pki_copy):
    from tests.conftest import ROOT, run_script, wait_until

    running = start_gateway(use_pki=pki_copy, overrides={"http.listen": "127.0.0.1:0", "tls.reload_interval_s": 0.05})
    assert curl(running, "/v2/models/mlp").status == 200
    run_script(ROOT / "scripts/gen_certs.sh", "--revoke", "alice", pki_copy.dir)
    wait_until(lambda: curl(running, "/v2/models/mlp").status == 401)
    refused = curl(running, "/v2/models/mlp")
    assert "revoked" in refused.json()["error"]
    # A 401 carries a challenge (RFC 7235 4.1), here without an error code: the certificate, not the token, was
    # refused (RFC 6750 3.1).
    assert refused.headers["www-authenticate"] == 'Bearer realm="gateway"'
    record = last_record(running)
    assert (record["code"], record["method"]) == ("UNAUTHENTICATED", "GET /v2/models/{model}")
    assert "revoked" in record["reason"]
    assert curl(running, "/v2/models/mlp", client="bob").status == 403  # bob's certificate still authenticates
