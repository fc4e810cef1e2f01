"""The stock KServe Python SDK 0.21, unmodified, against the gateway over mutual TLS with a bound token: its gRPC
client (InferenceGRPCClient, which sends ``binary_data_size`` on every input it fills from numpy) and its REST
client (InferenceRESTClient, binary and JSON tensors). It runs from .venv-kserve, KServe's own environment
(`make setup`), as a subprocess."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import ROOT

PYTHON = ROOT / ".venv-kserve" / "bin" / "python"


@pytest.fixture(scope="module")
def gw(start_gateway_module):
    if not PYTHON.exists():
        pytest.fail(".venv-kserve is missing: run `make setup`")
    return start_gateway_module(overrides={"http.listen": "127.0.0.1:0"})


def kserve(gw, tmp_path: Path, steps: list[dict], client: str = "alice") -> list[dict]:
    pki = gw.pki
    job = {
        "grpc": gw.target,
        "rest": f"https://localhost:{gw.gateway.http_port}",
        "ca": str(pki.path("ca.crt")),
        "cert": str(pki.path(f"{client}.crt")),
        "key": str(pki.path(f"{client}.key")),
        "token": gw.token(client, bind=client),
        "steps": steps,
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run(
        [str(PYTHON), str(ROOT / "tests/interop/kserve_client.py"), str(tmp_path / "job.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


X = np.random.default_rng(13).random((2, 64), dtype=np.float32)
DIGITS = {
    "model": "digits",
    "id": "k-1",
    "inputs": [{"name": "input", "datatype": "FP32", "numpy": "float32", "shape": [2, 64], "data": X.ravel().tolist()}],
}
WORDS = ["bird", "Wörld"]
LABELS = {"model": "labels", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": WORDS}]}


def test_the_kserve_sdk_grpc_and_rest_clients_work_unmodified(gw, tmp_path, demo_models):
    steps = [
        {"client": client, "op": op, "args": args}
        for client in ("grpc", "rest")
        for op, args in (
            ("is_server_live", {}),
            ("is_server_ready", {}),
            ("is_model_ready", {"model_name": "digits"}),
            ("infer", DIGITS),
            ("infer", LABELS),
        )
    ]
    steps.append({"client": "rest", "op": "infer", "args": {**DIGITS, "binary": False}})  # JSON tensors
    results = triples = kserve(gw, tmp_path, steps)
    assert all("ok" in r for r in results), [r for r in results if "ok" not in r]
    session = ort.InferenceSession(str(demo_models / "digits/1/model.onnx"), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(None, {"input": X})
    for offset in (0, 5):
        live, ready, model_ready, digits, labels = [r["ok"] for r in triples[offset : offset + 5]]
        assert (live, ready, model_ready) == (True, True, True)
        for answer in (digits, *([results[10]["ok"]] if offset else [])):
            assert answer["id"] == "k-1" and answer["outputs"]["label"]["data"] == label.tolist()
            np.testing.assert_allclose(
                np.array(answer["outputs"]["probabilities"]["data"]).reshape(2, 10), probabilities, rtol=1e-5
            )
        assert labels["outputs"]["echo"]["data"] == WORDS
    methods = [r["method"] for r in gw.audit_records() if r["code"] == "OK" and r["sub"] == "alice"]
    assert methods.count("/inference.GRPCInferenceService/ModelInfer") == 2
    assert methods.count("POST /v2/models/{model}/infer") == 3


def test_the_kserve_sdk_refused_by_policy_on_both_bindings(gw, tmp_path):
    grpc_answer, rest_answer = kserve(
        gw, tmp_path, [{"client": c, "op": "infer", "args": DIGITS} for c in ("grpc", "rest")], client="bob"
    )
    assert "PERMISSION_DENIED" in grpc_answer["error"]["message"]
    assert "403" in rest_answer["error"]["message"]
    assert [r["code"] for r in gw.audit_records()[-2:]] == ["PERMISSION_DENIED"] * 2
