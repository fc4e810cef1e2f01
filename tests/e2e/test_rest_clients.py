"""Stock tritonclient.http against the REST binding, unmodified: sync (geventhttpclient) and asyncio (aiohttp),
JSON and binary tensors, its ssl options and headers. Each run in a process of its own (gevent stays out of the
process that runs the gateway)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def gw(start_gateway_module):
    running = start_gateway_module(overrides={"http.listen": "127.0.0.1:0"})
    running.extra["url"] = f"localhost:{running.gateway.http_port}"
    return running


def triton_http(gw, tmp_path: Path, steps: list[dict], *, client: str | None = "alice", token: str | None = "") -> list:
    pki = gw.pki
    job = {"url": gw.extra["url"], "ca": str(pki.path("ca.crt"))}
    if client:
        job |= {"cert": str(pki.path(f"{client}.crt")), "key": str(pki.path(f"{client}.key"))}
    job["token"] = gw.token(client or "alice", bind=client or "alice") if token == "" else token
    (tmp_path / "job.json").write_text(json.dumps({**job, "steps": steps}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests/interop/triton_http_client.py"), str(tmp_path / "job.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


X = np.random.default_rng(11).random((2, 64), dtype=np.float32)
DIGITS = {
    "model": "digits",
    "inputs": [{"name": "input", "datatype": "FP32", "numpy": "float32", "shape": [2, 64], "data": X.ravel().tolist()}],
}
WORDS = ["bird", "Wörld", ""]
LABELS = {"model": "labels", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": WORDS}]}


def reference(models: Path, name: str, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(str(models / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("client", ["sync", "aio"])
def test_tritonclient_http_calls_every_endpoint_with_json_and_binary_tensors(gw, tmp_path, demo_models, client):
    steps = [
        {"op": "is_server_live"},
        {"op": "is_server_ready"},
        {"op": "get_server_metadata"},
        {"op": "is_model_ready", "args": {"model_name": "digits"}},
        {"op": "is_model_ready", "args": {"model_name": "digits", "model_version": "7"}},
        {"op": "get_model_metadata", "args": {"model_name": "labels"}},
        {"op": "get_model_config", "args": {"model_name": "digits"}},
        {"op": "get_model_repository_index"},
        {"op": "infer", "args": {**DIGITS, "id": "r1"}},  # binary in, binary out (tritonclient's default)
        {"op": "infer", "args": {**DIGITS, "binary": False, "outputs": ["probabilities", "label"]}},  # JSON both ways
        {"op": "infer", "args": LABELS},
        {"op": "infer", "args": {**LABELS, "binary": False, "outputs": ["echo"]}},
    ]
    results = triton_http(gw, tmp_path, [{**s, "client": client} for s in steps])
    assert all("ok" in r for r in results), results
    live, ready, server, ready_model, ready_missing, metadata, config, index, binary, plain, labels, echo = [
        r["ok"] for r in results
    ]
    assert (live, ready, ready_model, ready_missing) == (True, True, True, False)
    assert server["name"] == "gateway" and "model_repository" in server["extensions"]
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [("text", "BYTES")]
    assert config["name"] == "digits" and config["input"][0]["data_type"] == "TYPE_FP32"
    assert {(m["name"], m["version"]) for m in index} >= {("digits", "1"), ("mlp", "2")}
    label, probabilities = reference(demo_models, "digits", {"input": X})
    for answer, is_binary in ((binary, True), (plain, False)):
        outputs = answer["outputs"]
        assert outputs["label"]["data"] == label.tolist() and outputs["label"]["binary"] is is_binary
        np.testing.assert_allclose(np.array(outputs["probabilities"]["data"]).reshape(2, 10), probabilities, rtol=1e-5)
    assert binary["id"] == "r1"
    assert list(plain["outputs"]) == ["probabilities", "label"]  # in the order asked
    ids, _ = reference(demo_models, "labels", {"text": np.array(WORDS, dtype=object)})
    assert labels["outputs"]["ids"]["data"] == ids.tolist() and labels["outputs"]["echo"]["data"] == WORDS
    assert echo["outputs"]["echo"] == {"datatype": "BYTES", "shape": [3], "data": WORDS, "binary": False}
    records = [r for r in gw.audit_records() if r["method"].startswith(("GET ", "POST "))]
    assert {r["sub"] for r in records} == {"alice"}
    assert [r["method"] for r in records if r["code"] == "OK"][-4:] == ["POST /v2/models/{model}/infer"] * 4


def test_tritonclient_http_refusals_carry_the_status_and_the_error_body(gw, tmp_path):
    pki = gw.pki
    bob = {"cert": str(pki.path("bob.crt")), "key": str(pki.path("bob.key")), "token": gw.token("bob", bind="bob")}
    cases = [  # (the step's connection, the step, the status tritonclient reports)
        ({"token": None}, {"op": "get_server_metadata"}, "401"),
        ({"token": "not-a-jwt"}, {"op": "infer", "args": DIGITS}, "401"),
        (bob, {"op": "infer", "args": DIGITS}, "403"),
        (bob, {"op": "get_model_metadata", "args": {"model_name": "nope"}}, "403"),  # deny learns nothing
        ({}, {"op": "get_model_metadata", "args": {"model_name": "nope"}}, "404"),  # a permitted caller may know
    ]
    results = triton_http(gw, tmp_path, [{**step, "connection": connection} for connection, step, _ in cases])
    assert [r["error"]["status"] for r in results] == [status for _, _, status in cases], results
    assert "missing token" in results[0]["error"]["message"]


def test_tritonclient_http_without_a_client_certificate_fails_the_handshake(gw, tmp_path):
    before = len(gw.audit_records())
    (result,) = triton_http(gw, tmp_path, [{"op": "is_server_live", "client": "aio"}], client=None)
    assert "error" in result
    assert len(gw.audit_records()) == before
