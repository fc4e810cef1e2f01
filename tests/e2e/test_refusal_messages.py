"""What a refused caller reads, word for word, over real mutual TLS: the reason for a refused token (RFC 6750 3.1)
in the status message and the www-authenticate trailer, what a policy refused, and the request id with the log line
that tells the operator the rest. Through raw grpc, the SDK and the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime

import numpy as np
import pytest

import gateway
from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.conftest import ROOT
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub, trailer

X = np.zeros((1, 784), np.float32)
LOG = "see call_refused in the gateway's log"


@pytest.fixture
def gw(start_gateway):
    return start_gateway()


def _client(gw, token: str, client: str = "alice") -> gateway.Client:
    return gateway.Client(
        gw.target,
        ca=gw.pki.path("ca.crt"),
        cert=gw.pki.path(f"{client}.crt"),
        key=gw.pki.path(f"{client}.key"),
        token=token,
        timeout=TIMEOUT,
    )


def _expired(gw) -> tuple[str, int]:
    issued = int(time.time()) - 3600
    return gw.token(ttl_s=600, now=issued), issued + 600


def test_an_expired_token_is_told_expired_and_what_to_do(gw):
    token, _ = _expired(gw)
    with gw.channel() as channel:
        md = (*auth(token), ("x-request-id", "expired-1"))
        exc = rpc_error(lambda: stub(channel).Predict(predict_request("mlp", {"input": X}), metadata=md, timeout=5))
    assert exc.details() == (
        f"token expired: get a new token (gateway token issue, or your identity provider) (request id expired-1; {LOG})"
    )
    assert trailer(exc, "www-authenticate") == (
        'Bearer realm="gateway", error="invalid_token", error_description="token expired"'
    )
    assert trailer(exc, "x-request-id") == "expired-1"
    (record,) = [r for r in gw.audit_records() if r["request_id"] == "expired-1"]
    assert (record["code"], record["reason"]) == ("UNAUTHENTICATED", "token expired")


def test_the_sdk_gives_the_reason_of_a_refused_token(gw):
    token, _ = _expired(gw)
    with _client(gw, token) as client, pytest.raises(gateway.AuthenticationError) as caught:
        client.predict("mlp", X, request_id="expired-2")
    error = caught.value
    assert error.reason == "token expired"
    assert error.request_id == "expired-2"
    assert str(error) == (
        "token expired: get a new token (gateway token issue, or your identity provider) "
        f"(code UNAUTHENTICATED, request id expired-2; {LOG})"
    )
    # bob's token on alice's certificate: refused for its binding, not for anything about alice.
    with _client(gw, gw.token("bob", bind="bob")) as client, pytest.raises(gateway.AuthenticationError) as caught:
        client.list_models()
    assert caught.value.reason == "token bound to another certificate"
    with _client(gw, gw.token(aud="another-service")) as client, pytest.raises(gateway.AuthenticationError) as caught:
        client.list_models()
    assert caught.value.reason == "wrong audience"


def test_a_policy_refusal_says_what_was_refused_the_same_whether_the_model_exists(gw):
    bob = gw.token("bob", bind="bob")
    details = {}
    with gw.channel("bob") as channel:
        for model in ("mlp", "scalr"):
            md = (*auth(bob), ("x-request-id", f"denied-{model}"))
            request = predict_request(model, {"input": X})
            exc = rpc_error(lambda: stub(channel).Predict(request, metadata=md, timeout=TIMEOUT))  # noqa: B023
            details[model] = exc.details().replace(f"denied-{model}", "ID")
    assert details["scalr"] == f"no rule lets you 'predict' on model 'scalr' (it may not exist) (request id ID; {LOG})"
    assert details["mlp"] == details["scalr"].replace("scalr", "mlp")
    with gw.channel("bob") as channel:
        request = pb.GetModelMetadataRequest(model_name="mlp", model_version="1")
        exc = rpc_error(lambda: stub(channel).GetModelMetadata(request, metadata=auth(bob), timeout=TIMEOUT))
    rid = trailer(exc, "x-request-id")
    assert (
        exc.details()
        == f"no rule lets you 'metadata' on model 'mlp' version '1' (it may not exist) (request id {rid}; {LOG})"
    )


def test_every_refusal_names_its_request_id_and_the_log_line(gw):
    with gw.channel() as channel:
        request = predict_request("mlp", {"nope": X})
        md = (*auth(gw.token()), ("x-request-id", "invalid-1"))
        exc = rpc_error(lambda: stub(channel).Predict(request, metadata=md, timeout=TIMEOUT))
    assert exc.details().endswith(f" (request id invalid-1; {LOG})")
    # In-band stream errors too: each names the stream's request id.
    with _client(gw, gw.token()) as client:
        (result,) = client.predict_stream([X], model="no-such-model", raise_errors=False, request_id="stream-1")
    assert isinstance(result.error, gateway.NotFoundError)
    assert (result.error.request_id, str(result.error)) == (
        "stream-1",
        f"model 'no-such-model' not found (code NOT_FOUND, request id stream-1; {LOG})",
    )


def test_the_cli_says_when_the_token_expired_and_how_to_get_another(gw, tmp_path):
    token, exp = _expired(gw)
    (tmp_path / "alice.jwt").write_text(token + "\n")
    pki = gw.pki
    command = [sys.executable, "-m", "gateway", "models", "--target", gw.target, "--ca", str(pki.path("ca.crt"))]
    command += ["--cert", str(pki.path("alice.crt")), "--key", str(pki.path("alice.key"))]
    command += ["--token-file", str(tmp_path / "alice.jwt")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    warning, error, hint = done.stderr.splitlines()
    when = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Before sending: the CLI read its own token's exp (unverified) and warned; the gateway still decided.
    assert warning == f"warning: the token expired at {when}: the gateway will refuse it"
    assert error.startswith("error: token expired: get a new token (gateway token issue, or your identity provider)")
    assert error.endswith(f"; {LOG})")
    assert hint == (
        f"hint: the token expired at {when}: issue a new one with `gateway token issue --key "
        f"certs/signing/jwt-signing.key --sub NAME --bind-cert {pki.path('alice.crt')} > NAME.jwt`, "
        "or ask your identity provider"
    )
