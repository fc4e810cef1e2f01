"""`make demo`: start the gateway over mutual TLS, make allowed and refused calls, stop it cleanly.

Uses only the project's own tools: certificates from scripts/gen_certs.sh (certs/: the gateway gets certs/server
alone, each client its folder under certs/clients, tokens are signed with certs/signing), models from
scripts/make_demo_models.py (models/), tokens from `gateway token issue`, and the SDK. The models are served
from a signed copy (`gateway model sign`, certs/signing/model-signing.key) with models.signatures: required, beside
an mlp version 3 altered after signing, which the gateway refuses to load.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gateway
from gateway.auth.issuer import issue_token
from gateway.auth.keys import kid_from_jwks

ROOT = Path(__file__).resolve().parent.parent
CERTS = ROOT / "certs"
SERVER, SIGNING = CERTS / "server", CERTS / "signing"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_for(sub: str, *, bind: str | None = None, **kwargs: object) -> str:
    args = [str(BIN / "gateway"), "token", "issue", "--key", str(SIGNING / "jwt-signing.key"), "--sub", sub]
    if bind:
        args += ["--bind-cert", str(client_file(bind, "crt"))]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def expired_token(sub: str) -> str:
    key = (SIGNING / "jwt-signing.key").read_bytes()
    return issue_token(
        private_key_pem=key,
        sub=sub,
        kid=kid_from_jwks(SIGNING / "jwks.json", key),
        iss="https://gateway.local",
        aud="gateway",
        ttl_s=600,
        now=time.time() - 3600,
    )


def client_file(name: str, kind: str) -> Path:
    """A file of client ``name``'s folder: its ``crt``, its ``key``, or ``ca`` (the CA that signed the server)."""
    return CERTS / "clients" / name / ("ca.crt" if kind == "ca" else f"{name}.{kind}")


def client(name: str, token: str | None) -> gateway.Client:
    return gateway.Client(
        TARGET,
        ca=client_file(name, "ca"),
        cert=client_file(name, "crt"),
        key=client_file(name, "key"),
        token=token,
        timeout=10,
    )


def wait_serving(target: str, deadline_s: float = 30.0) -> None:
    creds = grpc.ssl_channel_credentials(*(client_file("alice", kind).read_bytes() for kind in ("ca", "key", "crt")))
    end = time.monotonic() + deadline_s
    with grpc.secure_channel(target, creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                if time.monotonic() > end:
                    raise
            time.sleep(0.2)


def allowed(label: str, outcome: object) -> None:
    print(f"  allowed  {label:<42} -> {outcome}")


def refused(label: str, action) -> None:  # type: ignore[no-untyped-def]
    try:
        action()
    except gateway.GatewayError as exc:
        print(f"  refused  {label:<42} -> {exc.code}")
        return
    except grpc.RpcError as exc:  # a raw channel, below the SDK: grpc's own status
        print(f"  refused  {label:<42} -> {exc.code().name}")  # type: ignore[attr-defined]
        return
    raise SystemExit(f"demo failed: {label} was not refused")


def signed_models(folder: Path) -> Path:
    """A copy of models/ signed with the demo's model-signing key, plus mlp version 3: signed, then altered."""
    repository = folder / "models"
    shutil.copytree(ROOT / "models", repository)
    shutil.copytree(repository / "mlp" / "2", repository / "mlp" / "3")
    command = [str(BIN / "gateway"), "model", "sign", str(repository), "--key", str(SIGNING / "model-signing.key")]
    subprocess.run(command, check=True, capture_output=True, text=True)
    model = repository / "mlp" / "3" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")  # one byte changed after signing
    print(f"signed {len(list(repository.glob('*/*/model.sig')))} model versions; then changed one byte of mlp 3")
    return repository


def last_record(audit_log: Path) -> dict:
    return json.loads(audit_log.read_bytes().splitlines()[-1])


def main() -> int:
    global TARGET
    port = free_port()
    TARGET = f"127.0.0.1:{port}"
    audit_dir = Path(tempfile.mkdtemp(prefix="gateway-demo-audit-"))
    audit_log = audit_dir / "audit.log"
    repository = signed_models(audit_dir)
    environment = {
        **os.environ,
        "GATEWAY_MODELS__SIGNATURES": "required",
        "GATEWAY_MODELS__SIGNATURE_TRUST__PUBLIC_KEY": str(SERVER / "model-signing.pub"),
    }
    server = subprocess.Popen(
        [
            str(BIN / "gateway"),
            "serve",
            "--certs",
            str(SERVER),
            "--models",
            str(repository),
            "--policies",
            str(ROOT / "policies"),
            "--listen",
            TARGET,
            "--audit-log",
            str(audit_log),
        ],
        stderr=open(audit_dir / "gateway.log", "wb"),  # noqa: SIM115 - closed with the process
        env=environment,
    )
    try:
        wait_serving(TARGET)
        print(f"gateway serving on {TARGET} (mutual TLS, JWT, policies/demo.yaml); audit trail {audit_log}")
        print("models.signatures: required (trust: certs/server/model-signing.pub)\n")
        alice_token = token_for("alice", bind="alice")
        rng = np.random.default_rng(0)
        with client("alice", alice_token) as alice:
            mlp = alice.predict("mlp", {"input": rng.random((1, 784), dtype=np.float32)})
            allowed(f"alice predict mlp (version {mlp.version})", f"{np.round(mlp.outputs['output'][0][:4], 3)}...")
            digest = last_record(audit_log)["model_digest"]
            allowed("  its record names the bytes that ran", digest[:23] + "...")
            if alice.metadata("mlp").model_digest != digest:
                raise SystemExit("demo failed: metadata and record name different bytes")
            refused("alice predict mlp version 3 (altered)", lambda: alice.predict("mlp", [0.0] * 784, version=3))
            digit = np.zeros((1, 64), dtype=np.float32)
            digit[0, [19, 20, 27, 28, 35, 36, 43, 44, 51, 52]] = 1.0  # a vertical stroke: a "1"
            result = alice.predict("digits", digit)
            allowed(f"alice predict digits (version {result.version})", f"label {int(result.outputs['label'][0])}")
            words = alice.predict("labels", {"text": np.array(["dog", "cat", "fish"])}).outputs["ids"]
            allowed("alice predict labels (text in)", f"ids {words.tolist()}")
            allowed("alice predict digits with tritonclient", triton_predict(alice_token, digit))
            allowed("alice list models", [m.name for m in alice.list_models()])
        print()
        refused("no client certificate (TLS handshake)", lambda: _no_cert_call())
        with client("alice", None) as anonymous:
            refused("alice without a token", lambda: anonymous.predict("mlp", [0.0] * 784))
        with client("alice", expired_token("alice")) as expired:
            refused("alice with an expired token", lambda: expired.predict("mlp", [0.0] * 784))
        with client("bob", alice_token) as thief:
            refused("bob presenting alice's bound token", lambda: thief.predict("mlp", [0.0] * 784))
        with client("bob", token_for("bob", bind="bob")) as bob:
            allowed("bob metadata digits", f"inputs {[i.name for i in bob.metadata('digits').inputs]}")
            refused("bob predict digits (policy deny)", lambda: bob.predict("digits", np.zeros((1, 64), np.float32)))
            refused("bob metadata mlp (policy deny)", lambda: bob.metadata("mlp"))
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
    print(f"\ngateway stopped on SIGTERM with exit code {code}")
    verify = subprocess.run(
        [str(BIN / "gateway"), "audit", "verify", str(audit_log), "--hmac-key", str(SERVER / "audit-hmac.key")],
        capture_output=True,
        text=True,
    )
    print(f"audit verify: {verify.stdout.strip()}")
    refusals = [
        line for line in (audit_dir / "gateway.log").read_text().splitlines() if "model_signature_invalid" in line
    ]
    print(f"gateway log: {len(refusals)} model_signature_invalid line(s) (mlp 3)")
    return 0 if code == 0 and verify.returncode == 0 else 1


def triton_predict(token: str, pixels: np.ndarray) -> str:
    """The same gateway through a stock Triton client (the Open Inference Protocol, docs/oip.md): only the
    address, the certificate files and the authorization header are the gateway's."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(
        TARGET,
        ssl=True,
        root_certificates=str(client_file("alice", "ca")),
        private_key=str(client_file("alice", "key")),
        certificate_chain=str(client_file("alice", "crt")),
    )
    pixels_input = triton.InferInput("input", list(pixels.shape), "FP32")
    pixels_input.set_data_from_numpy(pixels)
    with client:
        result = client.infer("digits", [pixels_input], headers={"authorization": f"Bearer {token}"})
    return f"label {int(result.as_numpy('label')[0])}"


def _no_cert_call() -> None:
    creds = grpc.ssl_channel_credentials(client_file("alice", "ca").read_bytes())
    with grpc.secure_channel(TARGET, creds) as channel:
        channel.unary_unary("/gateway.v1.InferenceService/ListModels")(b"", timeout=5)


TARGET = ""

if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    sys.exit(main())
