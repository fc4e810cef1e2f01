"""Keys from the issuer end to end: a gateway started with ``auth.jwks_url`` pointing at a real HTTPS key server on
127.0.0.1 (serving the jwks.json of scripts/gen_certs.sh) accepts the project's tokens, follows a key rotation
without a restart (the unknown-kid refresh), and keeps serving when the key server goes down."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from gateway.auth.issuer import issue_token
from tests.conftest import Pki
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub
from tests.key_server import JWKS_PATH, KeyServer, new_signing_key

X = np.zeros((1, 784), np.float32)


@pytest.fixture
def key_server(pki: Pki) -> Iterator[KeyServer]:
    server = KeyServer(pki.path("server.crt"), pki.path("server.key"))
    server.serve(JWKS_PATH, pki.read("jwks.json"))
    yield server
    server.close()


@pytest.fixture
def gw(start_gateway, key_server: KeyServer, pki: Pki):
    return start_gateway(
        overrides={
            "auth.jwks": None,
            "auth.jwks_url": key_server.url(JWKS_PATH),
            "auth.jwks_ca": pki.path("ca.crt"),
        }
    )


def predict(gw, token: str, request_id: str | None = None):
    metadata = auth(token) if request_id is None else (*auth(token), ("x-request-id", request_id))
    with gw.channel("alice") as channel:
        return stub(channel).Predict(predict_request("mlp", {"input": X}), metadata=metadata, timeout=TIMEOUT)


def rotated_token(pki: Pki, key_server: KeyServer) -> str:
    """The issuer rotates: it publishes a new key beside the old one and signs with the new key."""
    pem, jwk = new_signing_key()
    old = json.loads(pki.read("jwks.json"))["keys"]
    key_server.serve(JWKS_PATH, json.dumps({"keys": [*old, jwk]}).encode())
    return issue_token(
        private_key_pem=pem,
        sub="alice",
        kid=jwk["kid"],
        bind_cert_pem=pki.read("alice.crt"),
        iss="https://gateway.local",
        aud="gateway",
    )


def test_a_token_of_the_fetched_key_set_is_served(gw, key_server: KeyServer):
    assert predict(gw, gw.token()).model_version == "2"
    assert key_server.count(JWKS_PATH) == 1


def test_a_token_signed_by_a_rotated_key_is_served_without_a_restart(gw, key_server: KeyServer, pki: Pki):
    token = rotated_token(pki, key_server)
    assert predict(gw, token).model_version == "2"  # its unknown kid made the gateway fetch the new set
    assert key_server.count(JWKS_PATH) == 2
    assert predict(gw, gw.token()).model_version == "2"  # the old key is still published
    record = gw.audit_records()[-2]
    assert (record["code"], record["sub"]) == ("OK", "alice")


def test_a_token_whose_kid_stays_unknown_is_refused_and_audited(gw, key_server: KeyServer, pki: Pki):
    token = issue_token(
        private_key_pem=pki.read("jwt-signing.key"),
        sub="alice",
        kid="not-published",
        bind_cert_pem=pki.read("alice.crt"),
        iss="https://gateway.local",
        aud="gateway",
    )
    request_id = uuid.uuid4().hex
    exc = rpc_error(lambda: predict(gw, token, request_id))
    assert (exc.code().name, exc.details()) == (
        "UNAUTHENTICATED",
        "unknown key id: sign with a key in the gateway's key set (auth.jwks, auth.jwks_url) "
        f"(request id {request_id}; see call_refused in the gateway's log)",
    )
    (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id]
    assert (record["code"], record["reason"]) == ("UNAUTHENTICATED", "unknown key id")
    assert key_server.count(JWKS_PATH) == 2  # one refetch before refusing
    rpc_error(lambda: predict(gw, token))
    assert key_server.count(JWKS_PATH) == 2  # and no other within auth.jwks_min_refresh_interval_s


def test_calls_keep_working_when_the_key_server_goes_down(gw, key_server: KeyServer, pki: Pki):
    rotated = rotated_token(pki, key_server)
    assert predict(gw, rotated).model_version == "2"
    key_server.close()
    gw.gateway.reload()  # SIGHUP: the fetch fails, the last good key set stays
    for token in (gw.token(), rotated):
        assert predict(gw, token).model_version == "2"


def test_a_key_set_that_also_holds_an_encryption_key_is_served(start_gateway, key_server: KeyServer, pki: Pki):
    # Keycloak publishes its realm's encryption key (use: enc, alg RSA-OAEP) beside its signing key: RFC 7517 4.2
    # says what each is for, and the gateway takes the signing key and ignores the other.
    _, encryption = new_signing_key()
    encryption = {**encryption, "kid": "realm-enc", "use": "enc", "alg": "RSA-OAEP"}
    del encryption["key_ops"]  # pyjwt writes ["verify"]: Keycloak's encryption key has none
    keys = [*json.loads(pki.read("jwks.json"))["keys"], encryption]
    key_server.serve(JWKS_PATH, json.dumps({"keys": keys}).encode())
    gw = start_gateway(
        overrides={
            "auth.jwks": None,
            "auth.jwks_url": key_server.url(JWKS_PATH),
            "auth.jwks_ca": pki.path("ca.crt"),
        }
    )
    assert predict(gw, gw.token()).model_version == "2"
    # A token naming the encryption key is refused as one of an unknown key, and audited so.
    token = issue_token(
        private_key_pem=pki.read("jwt-signing.key"),
        sub="alice",
        kid="realm-enc",
        bind_cert_pem=pki.read("alice.crt"),
        iss="https://gateway.local",
        aud="gateway",
    )
    request_id = uuid.uuid4().hex
    exc = rpc_error(lambda: predict(gw, token, request_id))
    assert exc.code().name == "UNAUTHENTICATED"
    (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id]
    assert (record["code"], record["reason"]) == ("UNAUTHENTICATED", "unknown key id")
