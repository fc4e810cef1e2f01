"""Asking a gateway whether it is ready, and what a client is told when TLS fails: `gateway health` on the main port
(mutual TLS) and the probe port (plaintext), grpcurl with the shipped health.proto as docs/operations.md gives it,
and a one-line answer naming what to change for each side that can be wrong (the client certificate, the port, the
target's scheme)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gateway
from tests.conftest import ROOT

GRPCURL = Path(sys.executable).with_name("grpcurl")
HEALTH_PROTO = ("-import-path", str(ROOT / "proto"), "-proto", "grpc/health/v1/health.proto")
CHECK = "grpc.health.v1.Health/Check"


@pytest.fixture
def gw(start_gateway):
    return start_gateway(overrides={"health.listen": "127.0.0.1:0"})


def run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "GRPC_"))}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def mtls(gw, client: str = "alice", pki=None) -> list[str | Path]:
    pki = pki or gw.pki
    return ["--ca", gw.pki.path("ca.crt"), "--cert", pki.path(f"{client}.crt"), "--key", pki.path(f"{client}.key")]


def probe(gw) -> str:
    return f"127.0.0.1:{gw.gateway.probe_port}"


def test_health_asks_the_main_port_over_mutual_tls_and_the_probe_port_in_plaintext(gw):
    main = run("health", "--target", f"localhost:{gw.port}", *mtls(gw))
    assert (main.returncode, main.stdout, main.stderr) == (0, "SERVING\n", "")
    plain = run("health", "--target", probe(gw), "--plaintext")
    assert (plain.returncode, plain.stdout, plain.stderr) == (0, "SERVING\n", "")


def test_health_says_which_side_to_change_in_one_line(gw, other_pki):
    cases = [
        (
            ["--target", f"127.0.0.1:{gw.port}", "--plaintext"],
            f"error: 127.0.0.1:{gw.port}: this port speaks TLS (the main port?): leave out --plaintext and give "
            "--ca, --cert and --key\n",
        ),
        (
            ["--target", f"localhost:{gw.gateway.probe_port}", *mtls(gw)],
            f"error: localhost:{gw.gateway.probe_port}: TLS handshake failed: this port does not speak TLS: give the "
            "gateway's main port (the probe port, health.listen, is plaintext)\n",
        ),
        (
            ["--target", f"localhost:{gw.port}", *mtls(gw, "alice", other_pki)],
            f"error: localhost:{gw.port}: TLS handshake failed: the server closed the connection at the handshake: "
            "it refused the client certificate (cert=, --cert): not signed by a CA the gateway trusts "
            "(tls.client_ca), expired, revoked, or not for client authentication\n",
        ),
    ]
    for args, stderr in cases:
        result = run("health", *args)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", stderr)
    scheme = run("health", "--target", f"https://localhost:{gw.port}", *mtls(gw))
    assert (scheme.returncode, scheme.stderr) == (
        2,
        f"error: target 'https://localhost:{gw.port}': give HOST:PORT without a scheme ('localhost:{gw.port}'): "
        "TLS is set by the client, not the target\n",
    )


def test_the_sdk_names_a_refused_client_certificate(gw, other_pki):
    # A client certificate from a CA the gateway does not trust: TLS 1.3 refuses it after the client's side of the
    # handshake, so grpc reports only a closed socket; the SDK says what it means, and does not retry it.
    retry = gateway.RetryPolicy(max_attempts=3, initial_backoff_s=5.0, max_backoff_s=5.0)
    with (
        gateway.Client(
            f"localhost:{gw.port}",
            ca=gw.pki.path("ca.crt"),
            cert=other_pki.path("alice.crt"),
            key=other_pki.path("alice.key"),
            token=gw.token(),
            retry=retry,
            timeout=20,
        ) as client,
        pytest.raises(gateway.TLSHandshakeError) as caught,
    ):
        client.list_models()
    assert str(caught.value).startswith(
        "TLS handshake failed: the server closed the connection at the handshake: it refused the client certificate"
    )
    assert caught.value.request_id is None


def test_grpcurl_checks_health_as_the_operations_guide_says(gw):
    # docs/operations.md, "Checking health by hand": the probe port in plaintext, and the main port over mutual TLS
    # (no token: health needs none), each with the health.proto the repository ships (neither needs reflection).
    plain = subprocess.run(
        [GRPCURL, "-plaintext", *HEALTH_PROTO, probe(gw), CHECK], capture_output=True, text=True, timeout=30
    )
    assert plain.returncode == 0, plain.stderr
    assert '"status": "SERVING"' in plain.stdout
    pki = gw.pki
    tls = ["-cacert", pki.path("ca.crt"), "-cert", pki.path("alice.crt"), "-key", pki.path("alice.key")]
    main = subprocess.run(
        [GRPCURL, *map(str, tls), *HEALTH_PROTO, f"localhost:{gw.port}", CHECK],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert main.returncode == 0, main.stderr
    assert '"status": "SERVING"' in main.stdout


def test_every_command_help_states_the_exit_codes():
    commands = [["serve"], ["token", "issue"], ["policy", "check"], ["predict"], ["models"], ["metadata"]]
    commands += [["health"], ["audit", "verify"], ["model", "sign"], ["model", "verify"]]
    for command in commands:
        result = run(*command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "exit codes: 0 ok; 1 the operation failed" in " ".join(result.stdout.split()), command
    probe_help = subprocess.run(
        [sys.executable, "-m", "gateway.probe", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert probe_help.stdout.startswith("usage: python -m gateway.probe [-h] [--timeout TIMEOUT] [address]\n\n")
    assert "``" not in probe_help.stdout  # reStructuredText is for the source, not the terminal
    assert "exit codes: 0 SERVING; 1 NOT_SERVING or no answer" in " ".join(probe_help.stdout.split())


def test_issued_tokens_are_ignored_by_git():
    for path in ("alice.jwt", "docs/bob.jwt"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, capture_output=True, timeout=30)
        assert ignored.returncode == 0, path
