"""The operational log at start and under failed handshakes: one JSON stream, warnings that say what is weak."""

from __future__ import annotations

import json
import os
import socket
import ssl

from structlog.testing import capture_logs

from tests.conftest import ROOT, wait_until
from tests.e2e.test_lifecycle import GATEWAY, free_port, serve_args

ROOT_ENV = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}  # conftest silences grpc core itself


def test_grpc_core_writes_no_plain_text_line_into_the_json_log(pki, demo_models, tmp_path):
    """grpc core logs a line of its own text format on stderr for each failed TLS handshake at its default
    verbosity; `gateway serve` keeps it to errors unless GRPC_VERBOSITY says otherwise."""
    import subprocess

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*GATEWAY, "serve", *serve_args(pki, demo_models, tmp_path, port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**ROOT_ENV, "PYTHONPATH": str(ROOT)},
        )
    try:
        wait_until(lambda: '"gateway_started"' in log.read_text(), timeout_s=60, interval_s=0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:  # plain text to the TLS port
            plain.sendall(b"GET / HTTP/1.1\r\n\r\n")
            plain.recv(1024)
        _handshake_without_a_certificate(port, pki)
    finally:
        process.terminate()
        process.wait(timeout=60)
    lines = log.read_text().splitlines()
    assert any(json.loads(line)["event"] == "gateway_stopped" for line in lines if line.startswith("{"))
    assert [line for line in lines if not line.startswith("{")] == []


def _handshake_without_a_certificate(port: int, pki) -> None:
    context = ssl.create_default_context(cafile=str(pki.path("ca.crt")))
    context.check_hostname = False
    try:
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5)) as tls:
            tls.recv(1024)  # TLS 1.3: the server's refusal arrives here
    except OSError:
        pass


def test_an_unkeyed_audit_trail_is_a_warning_at_every_start(start_gateway):
    with capture_logs() as logs:
        start_gateway(overrides={"audit.hmac_key_file": None})
        start_gateway()  # the session PKI's audit-hmac.key
    unkeyed = [entry for entry in logs if entry["event"] == "audit_trail_unkeyed"]
    assert len(unkeyed) == 1 and unkeyed[0]["log_level"] == "warning"
    assert "audit.hmac_key_file" in unkeyed[0]["detail"]
