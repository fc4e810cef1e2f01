"""SIGHUP re-reads certificates, CRL, key set, policies and models at once (poll intervals set to an hour, so only
the signal can explain a change), and the process keeps serving with its audit trail open."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import grpc
import numpy as np
from structlog.testing import capture_logs

from tests.conftest import RunningGateway, wait_until
from tests.e2e.helpers import TIMEOUT, auth, predict_request, stub
from tests.e2e.test_lifecycle import GATEWAY, SERVE_ENV, _serving, free_port, serve

HOUR = 3600
ONLY_IRIS = "rules:\n  - id: iris\n    effect: allow\n    principals: {subjects: [alice]}\n    models: [iris]\n    actions: '*'\n"
ALSO_MLP = ONLY_IRIS.replace("[iris]", "[iris, mlp]")
POLL_AN_HOUR = {
    "policies.reload_interval_s": HOUR,
    "auth.reload_interval_s": HOUR,
    "tls.reload_interval_s": HOUR,
    "models.poll_interval_s": HOUR,
}


def start_serving(pki, demo_models: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    """``gateway serve`` with every poll interval an hour; its port and policy file."""
    policies = tmp_path / "policies"
    policies.mkdir()
    policy = policies / "policy.yaml"
    policy.write_text(ONLY_IRIS)
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"policies": {"reload_interval_s": HOUR}}))  # JSON is YAML
    port = free_port()
    args = [
        *("--config", str(config), "--certs", str(pki.server_dir), "--models", str(demo_models)),
        *("--policies", str(policies), "--listen", f"127.0.0.1:{port}"),
        *("--audit-log", str(tmp_path / "audit" / "audit.log"), *extra),
    ]
    process = serve(args, tmp_path)
    with grpc.secure_channel(f"127.0.0.1:{port}", pki.channel_credentials("alice")) as channel:
        wait_until(lambda: _serving(channel), timeout_s=30, interval_s=0.2)
    return process, port, policy


def predict_mlp(pki, port: int, token: str) -> grpc.StatusCode:
    """One call on a new connection (with workers, the kernel picks the worker per connection)."""
    with grpc.secure_channel(f"127.0.0.1:{port}", pki.channel_credentials("alice")) as channel:
        try:
            request = predict_request("mlp", {"input": np.zeros((1, 784), np.float32)})
            stub(channel).Predict(request, metadata=auth(token), timeout=TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def logged(tmp_path: Path, event: str) -> int:
    return (tmp_path / "serve.log").read_text().count(f'"{event}"')


def stop(process: subprocess.Popen[bytes], tmp_path: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        process.kill()


def test_sighup_applies_a_policy_change_at_once_and_the_audit_trail_stays_open_and_verifies(pki, demo_models, tmp_path):
    process, port, policy = start_serving(pki, demo_models, tmp_path)
    token = RunningGateway(None, port, pki, tmp_path, tmp_path).token()
    try:
        assert predict_mlp(pki, port, token) == grpc.StatusCode.PERMISSION_DENIED
        policy.write_text(ALSO_MLP)
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: logged(tmp_path, "gateway_reloaded") == 1, timeout_s=30)
        assert process.poll() is None  # still running: SIGHUP used to end the process
        assert predict_mlp(pki, port, token) == grpc.StatusCode.OK
    finally:
        stop(process, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
    (reloaded,) = [entry for entry in log if entry["event"] == "gateway_reloaded"]
    assert reloaded["changed"] == ["policies"]
    verify = subprocess.run(
        [*GATEWAY, "audit", "verify", str(tmp_path / "audit"), "--hmac-key", str(pki.path("audit-hmac.key"))],
        capture_output=True,
        text=True,
        timeout=60,
        env=SERVE_ENV,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.splitlines()[-1].startswith("OK: 2 records")


def test_sighup_is_forwarded_to_every_worker(pki, demo_models, tmp_path):
    process, port, policy = start_serving(pki, demo_models, tmp_path, "--workers", "2")
    token = RunningGateway(None, port, pki, tmp_path, tmp_path).token()
    try:
        # Both workers have their handler: a SIGHUP before that ends a process, as the default action does.
        wait_until(lambda: logged(tmp_path, "gateway_started") == 2, timeout_s=30)
        policy.write_text(ALSO_MLP)
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: logged(tmp_path, "gateway_reloaded") == 2, timeout_s=30)  # one per worker
        assert all(predict_mlp(pki, port, token) == grpc.StatusCode.OK for _ in range(10))
    finally:
        stop(process, tmp_path)


def test_reload_rereads_every_file_backed_component_at_once(start_gateway, pki_copy, model_repo):
    gw = start_gateway(models=model_repo, use_pki=pki_copy, overrides=POLL_AN_HOUR)
    server = pki_copy.server_dir
    touched = [server / "server.crt", server / "crl.pem", server / "jwks.json", gw.policy_dir / "test.yaml"]
    touched.append(next(model_repo.glob("mlp/2/*.onnx")))
    for path in touched:
        os.utime(path, ns=(1, 1))  # a new mtime is a change; the content stays valid
    with capture_logs() as logs:
        gw.gateway.reload()
    (reloaded,) = [entry for entry in logs if entry["event"] == "gateway_reloaded"]
    assert reloaded["changed"] == ["models", "policies", "jwks", "crl", "certificates"]
    events = {entry["event"] for entry in logs}
    assert {"jwks_reloaded", "credentials_rotated", "model_version_reloaded"} <= events
    with gw.channel() as channel:  # still serving with what it re-read
        request = predict_request("mlp", {"input": np.zeros((1, 784), np.float32)})
        assert stub(channel).Predict(request, metadata=auth(gw.token()), timeout=TIMEOUT).model_version == "2"
