"""An SDK-only install (`pip install gateway`, without the server extra) against a real gateway over mutual TLS:
the SDK, a client command and `gateway audit verify` in a Python that cannot import the server's modules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import sdk_only_env

SDK_SCRIPT = """
import sys

import numpy as np

import gateway

target, ca, cert, key, token_file = sys.argv[1:]
files = {"ca": ca, "cert": cert, "key": key, "timeout": 10}
with gateway.Client(target, token=gateway.TokenFile(token_file), **files) as client:
    print(client.predict("mlp", {"input": np.zeros((1, 784), np.float32)}).version)
    print(",".join(model.name for model in client.list_models()))
with gateway.Client(target, token=gateway.RefreshingToken(lambda: open(token_file).read()), **files) as client:
    print(client.metadata("mlp").inputs[0].name)
"""


@pytest.fixture
def gw(start_gateway):
    return start_gateway()


def run(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**sdk_only_env(tmp_path), **env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=environment, timeout=60)


def test_sdk_calls_the_gateway_without_the_server_dependencies(gw, tmp_path):
    token = tmp_path / "alice.jwt"
    token.write_text(gw.token())
    files = [str(gw.pki.path(name)) for name in ("ca.crt", "alice.crt", "alice.key")]
    result = run(tmp_path, "-c", SDK_SCRIPT, gw.target, *files, str(token))
    assert result.returncode == 0, result.stderr
    version, models, input_name = result.stdout.splitlines()
    assert version == "2" and "mlp" in models.split(",") and input_name == "input"
    assert [(r["sub"], r["code"]) for r in gw.audit_records()] == [("alice", "OK")] * 3


def test_client_command_and_audit_verify_run_without_the_server_dependencies(gw, tmp_path):
    token = tmp_path / "alice.jwt"
    token.write_text(gw.token())
    env = {
        "GATEWAY_TARGET": gw.target,
        "GATEWAY_CA": str(gw.pki.path("ca.crt")),
        "GATEWAY_CERT": str(gw.pki.path("alice.crt")),
        "GATEWAY_KEY": str(gw.pki.path("alice.key")),
        "GATEWAY_TOKEN_FILE": str(token),
    }
    predicted = run(tmp_path, "-m", "gateway", "predict", "--model", "mlp", "--input", json.dumps([0.0] * 784), **env)
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["version"] == "2"
    verified = run(
        tmp_path,
        "-m",
        "gateway",
        "audit",
        "verify",
        str(gw.audit_path),
        "--hmac-key",
        str(gw.pki.path("audit-hmac.key")),
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.splitlines()[-1].startswith("OK: 1 records")
