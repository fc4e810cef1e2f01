"""Stock Open Inference Protocol clients against the gateway, unmodified: tritonclient (sync, asyncio, streaming),
a Node client on @grpc/grpc-js, and grpcurl through reflection. Each runs in a process of its own (tritonclient's
``inference.*`` messages and the gateway's cannot share this process's protobuf descriptor pool)."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import ROOT

# A dev dependency, present wherever `make test` runs; looked up, never imported here (see the docstring).
if importlib.util.find_spec("tritonclient") is None:
    pytest.fail("tritonclient is not installed: run `make setup`", pytrace=False)

NODE_DIR = ROOT / "tests/interop/node"
GRPCURL = Path(sys.executable).with_name("grpcurl")


@pytest.fixture
def gw(start_gateway):
    return start_gateway()  # conftest's policy: alice may do anything, bob list and read digits


def connection(gw, client: str | None = "alice", token: str | None = "") -> dict:
    """The files and token a stock client is configured with."""
    pki = gw.pki
    job = {"target": gw.target, "ca": str(pki.path("ca.crt"))}
    if client:
        job |= {"cert": str(pki.path(f"{client}.crt")), "key": str(pki.path(f"{client}.key"))}
    job["token"] = gw.token(client or "alice", bind=client or "alice") if token == "" else token
    return job


def triton(gw, tmp_path: Path, steps: list[dict], **conn) -> list[dict]:
    """Run steps in tritonclient (a subprocess); each result is {"ok": ...} or {"error": {"status", "message"}}."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({**connection(gw, **conn), "steps": steps}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests/interop/triton_client.py"), str(job)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def reference(models: Path, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(models / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


X = np.random.default_rng(7).random((2, 64), dtype=np.float32)
DIGITS = {
    "model": "digits",
    "inputs": [{"name": "input", "datatype": "FP32", "numpy": "float32", "shape": [2, 64], "data": X.ravel().tolist()}],
}
WORDS = ["bird", "Wörld", ""]
LABELS = {"model": "labels", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": WORDS}]}


def check_digits(answer: dict, demo_models: Path) -> None:
    label, probabilities = reference(demo_models, "digits", {"input": X})
    outputs = answer["outputs"]
    assert answer["model_version"] == "1"
    assert outputs["label"]["datatype"] == "INT64" and outputs["label"]["data"] == label.tolist()
    np.testing.assert_allclose(
        np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"]), probabilities, rtol=1e-5
    )


@pytest.mark.parametrize("client", ["sync", "aio"])
def test_tritonclient_calls_every_rpc(gw, tmp_path, demo_models, client):
    steps = [
        {"op": "is_server_live"},
        {"op": "is_server_ready"},
        {"op": "get_server_metadata", "args": {"as_json": True}},
        {"op": "is_model_ready", "args": {"model_name": "digits"}},
        {"op": "is_model_ready", "args": {"model_name": "digits", "model_version": "7"}},
        {"op": "get_model_metadata", "args": {"model_name": "labels", "as_json": True}},
        {"op": "get_model_config", "args": {"model_name": "digits", "as_json": True}},
        {"op": "get_model_repository_index", "args": {"as_json": True}},
        {"op": "infer", "args": {**DIGITS, "id": "r1"}},
        {"op": "infer", "args": LABELS},
        {"op": "infer", "args": {**DIGITS, "outputs": ["probabilities"]}},
    ]
    live, ready, server, model_ready, missing_ready, metadata, config, index, digits, labels, selected = [
        r["ok"] for r in triton(gw, tmp_path, [{**s, "client": client} for s in steps])
    ]
    assert (live, ready, model_ready, missing_ready) == (True, True, True, False)
    assert server["name"] == "gateway"
    assert metadata["platform"] == "onnxruntime_onnx"
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [("text", "BYTES")]
    assert config["config"]["name"] == "digits" and config["config"]["input"][0]["data_type"] == "TYPE_FP32"
    assert {(m["name"], m["version"]) for m in index["models"]} >= {("digits", "1"), ("mlp", "2"), ("labels", "1")}
    check_digits(digits, demo_models)
    assert digits["id"] == "r1"
    ids, _ = reference(demo_models, "labels", {"text": np.array(WORDS, dtype=object)})
    assert labels["outputs"]["ids"]["data"] == ids.tolist() and labels["outputs"]["echo"]["data"] == WORDS
    assert list(selected["outputs"]) == ["probabilities"]
    methods = [r["method"].rsplit("/", 1)[1] for r in gw.audit_records()]
    assert methods.count("ModelInfer") == 3 and methods.count("ServerLive") == 1


@pytest.mark.parametrize("client", ["sync", "aio"])
def test_tritonclient_streams_in_order_with_errors_in_band(gw, tmp_path, demo_models, client):
    bad = {**DIGITS, "inputs": [{**DIGITS["inputs"][0], "datatype": "FP64", "numpy": "float64"}]}
    requests = [{**DIGITS, "id": "1"}, {**bad, "id": "2"}, {**LABELS, "id": "3"}]
    (result,) = triton(gw, tmp_path, [{"client": client, "op": "stream", "args": {"requests": requests}}])
    first, second, third = result["ok"]
    check_digits(first["ok"], demo_models)
    assert second["error"].startswith("INVALID_ARGUMENT: ") and "model expects FP32" in second["error"]
    assert third["ok"]["outputs"]["echo"]["data"] == WORDS
    stream_records = [r for r in gw.audit_records() if r["method"].endswith("/ModelStreamInfer")]
    assert [r["code"] for r in stream_records] == ["OK", "INVALID_ARGUMENT", "OK", "OK"]


@pytest.mark.parametrize(
    ("conn", "step", "status"),
    [
        ({"token": None}, {"op": "is_server_live"}, "StatusCode.UNAUTHENTICATED"),
        ({"token": "not-a-jwt"}, {"op": "infer", "args": DIGITS}, "StatusCode.UNAUTHENTICATED"),
        ({"client": "bob"}, {"op": "infer", "args": DIGITS}, "StatusCode.PERMISSION_DENIED"),
        (
            {"client": "bob"},
            {"op": "get_model_metadata", "args": {"model_name": "mlp"}},
            "StatusCode.PERMISSION_DENIED",
        ),
        (
            {"client": "bob"},
            {"op": "get_model_metadata", "args": {"model_name": "nope"}},
            "StatusCode.PERMISSION_DENIED",
        ),
        ({}, {"op": "get_model_metadata", "args": {"model_name": "nope"}}, "StatusCode.NOT_FOUND"),
    ],
    ids=["no token", "bad token", "policy deny", "deny existing", "deny missing", "missing for a permitted caller"],
)
def test_tritonclient_refusals_are_its_exceptions_with_the_right_status(gw, tmp_path, conn, step, status):
    (result,) = triton(gw, tmp_path, [step], **conn)
    assert result["error"]["status"] == status
    assert gw.audit_records()[-1]["code"] == status.removeprefix("StatusCode.")


def test_tritonclient_without_a_client_certificate_is_refused_at_the_handshake(gw, tmp_path):
    (result,) = triton(gw, tmp_path, [{"op": "is_server_live"}], client=None)
    assert result["error"]["status"] == "StatusCode.UNAVAILABLE"
    assert gw.audit_records() == []  # no call reached the gateway


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the Node client cannot run")
def test_node_grpc_js_client_sends_typed_contents(gw, tmp_path, demo_models):
    if not (NODE_DIR / "node_modules/@grpc/grpc-js").is_dir():
        pytest.fail("tests/interop/node/node_modules is missing: run `make setup` (npm ci from the lock file)")
    request = {
        "model_name": "digits",
        "id": "from-node",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [2, 64], "contents": {"fp32_contents": X.ravel().tolist()}}
        ],
    }
    job = tmp_path / "node.json"
    job.write_text(
        json.dumps({**connection(gw), "proto": str(ROOT / "proto/inference/grpc_service.proto"), "request": request})
    )
    done = subprocess.run(
        ["node", str(NODE_DIR / "model_infer.js"), str(job)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"], answer
    response = answer["response"]
    raw = [base64.b64decode(r) for r in response["raw_output_contents"]]
    label, probabilities = reference(demo_models, "digits", {"input": X})
    assert response["id"] == "from-node"
    np.testing.assert_array_equal(np.frombuffer(raw[0], np.int64), label)
    np.testing.assert_allclose(np.frombuffer(raw[1], np.float32).reshape(2, 10), probabilities, rtol=1e-5)
    record = gw.audit_records()[-1]
    assert (record["method"], record["code"], record["sub"]) == (
        "/inference.GRPCInferenceService/ModelInfer",
        "OK",
        "alice",
    )


def grpcurl(gw, *args: str, token: str | None = "") -> subprocess.CompletedProcess[str]:
    conn = connection(gw, token=token)
    header = ["-H", f"authorization: Bearer {conn['token']}"] if conn["token"] else []
    return subprocess.run(
        [str(GRPCURL), "-cacert", conn["ca"], "-cert", conn["cert"], "-key", conn["key"], *header, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_grpcurl_lists_and_describes_the_service_through_reflection(gw):
    listed = grpcurl(gw, gw.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert "inference.GRPCInferenceService" in listed.stdout.split()
    described = grpcurl(gw, gw.target, "describe", "inference.GRPCInferenceService")
    assert described.returncode == 0, described.stderr
    assert (
        "rpc ModelInfer ( .inference.ModelInferRequest ) returns ( .inference.ModelInferResponse )" in described.stdout
    )
    assert "rpc ModelStreamInfer ( stream .inference.ModelInferRequest )" in described.stdout


def test_grpcurl_calls_model_infer_with_json(gw, demo_models):
    request = {
        "model_name": "labels",
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [3],
                "contents": {"bytes_contents": [base64.b64encode(w.encode()).decode() for w in WORDS]},
            }
        ],
    }
    done = grpcurl(gw, "-d", json.dumps(request), gw.target, "inference.GRPCInferenceService/ModelInfer")
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout)  # grpcurl prints the proto's field names
    ids, _ = reference(demo_models, "labels", {"text": np.array(WORDS, dtype=object)})
    assert np.frombuffer(base64.b64decode(response["raw_output_contents"][0]), np.int64).tolist() == ids.tolist()


def test_grpcurl_without_a_token_is_refused_even_for_reflection(gw):
    done = grpcurl(gw, gw.target, "list", token=None)
    assert done.returncode != 0 and "Unauthenticated" in done.stderr
