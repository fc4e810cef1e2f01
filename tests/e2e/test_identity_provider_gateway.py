"""The gateway and the SDK with node-oidc-provider, an OpenID-certified provider, end to end (tests/oidc_provider.py):
the gateway finds the provider's keys by OIDC discovery, the SDK gets RFC 8705 certificate-bound RFC 9068 access
tokens by the client-credentials grant with mutual-TLS client authentication, and calls go over real mutual TLS on
loopback. A token bound to alice's certificate is refused from bob's; the provider rotates its signing key and the
gateway follows without a restart; the provider going down breaks no call while the cached keys are valid.
Skipped where node is not installed."""

from __future__ import annotations

import uuid

import jwt
import numpy as np
import pytest

import gateway
from tests.oidc_provider import OidcProvider

X = np.zeros((1, 784), np.float32)

# Callers are matched on what the provider asserts: Keycloak-style realm roles (auth.groups_claim below), a scope
# the client asked for, and the token bound to the connection's certificate.
POLICY = """
rules:
  - id: ml-predict
    effect: allow
    principals: {groups: [ml], scopes: [predict], bound_token: true}
    models: [mlp]
    versions: '*'
    actions: [predict]
"""


@pytest.fixture
def provider(oidc_provider: OidcProvider) -> OidcProvider:
    return oidc_provider


@pytest.fixture
def gw(start_gateway, provider: OidcProvider):
    return start_gateway(
        policy=POLICY,
        overrides={
            "auth.jwks": None,
            "auth.discovery": True,
            "auth.issuer": provider.issuer,
            "auth.jwks_ca": provider.ca,
            "auth.audience": provider.resource,
            "auth.groups_claim": "realm_access.roles",
            # The provider's RS256 tokens live 300 s: within the default maximum lifetime.
        },
    )


def token_source(provider: OidcProvider, name: str) -> gateway.ClientCredentialsTokenProvider:
    """``name``'s tokens, got with ``name``'s certificate (tls_client_auth), so bound to it."""
    pki = provider.pki
    return gateway.ClientCredentialsTokenProvider(
        provider.token_url,
        name,
        cert=pki.path(f"{name}.crt"),
        key=pki.path(f"{name}.key"),
        ca=provider.ca,
        scope="predict",
        resource=provider.resource,
    )


def client(gw, name: str, token: gateway.TokenProvider | str) -> gateway.Client:
    pki = gw.pki
    return gateway.Client(
        gw.target, ca=pki.path("ca.crt"), cert=pki.path(f"{name}.crt"), key=pki.path(f"{name}.key"), token=token
    )


def record_of(gw, request_id: str) -> dict:
    (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id]
    return record


def test_the_sdk_gets_a_bound_token_from_the_provider_and_the_gateway_verifies_it_with_discovered_keys(gw, provider):
    request_id = uuid.uuid4().hex
    with client(gw, "alice", token_source(provider, "alice")) as alice:
        result = alice.predict("mlp", {"input": X}, request_id=request_id)
    assert result.outputs["output"].shape == (1, 10)
    record = record_of(gw, request_id)
    assert (record["code"], record["rule"]) == ("OK", "ml-predict")
    assert (record["iss"], record["sub"], record["groups"]) == (provider.issuer, "alice", ["ml"])
    assert record["scopes"] == ["predict"]


def test_a_token_bound_to_alices_certificate_is_refused_from_bobs_and_audited(gw, provider):
    alices_token = token_source(provider, "alice").token()
    request_id = uuid.uuid4().hex
    with client(gw, "bob", alices_token) as bob, pytest.raises(gateway.AuthenticationError):
        bob.predict("mlp", {"input": X}, request_id=request_id)
    record = record_of(gw, request_id)
    assert (record["code"], record["reason"]) == ("UNAUTHENTICATED", "token bound to another certificate")
    with client(gw, "bob", token_source(provider, "bob")) as bob:  # bob's own token is fine
        assert bob.predict("mlp", {"input": X}).outputs["output"].shape == (1, 10)


def test_the_gateway_follows_the_providers_key_rotation_without_a_restart(gw, provider):
    old_token = token_source(provider, "alice").token()
    with client(gw, "alice", old_token) as alice:
        alice.predict("mlp", {"input": X})
    new_kid = provider.rotate_key()  # signs with a new key from now on, publishing the old one too
    new_token = token_source(provider, "alice").token()
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid != jwt.get_unverified_header(old_token)["kid"]
    for token in (new_token, old_token):  # the new kid makes the gateway fetch the key set again
        with client(gw, "alice", token) as alice:
            assert alice.predict("mlp", {"input": X}).outputs["output"].shape == (1, 10)
    provider.retire_old_keys()
    gw.gateway.reload()  # SIGHUP: discovery and the key set read again, now without the old key
    request_id = uuid.uuid4().hex
    with client(gw, "alice", old_token) as alice, pytest.raises(gateway.AuthenticationError):
        alice.predict("mlp", {"input": X}, request_id=request_id)
    assert record_of(gw, request_id)["reason"] == "unknown key id"
    with client(gw, "alice", token_source(provider, "alice")) as alice:
        assert alice.predict("mlp", {"input": X}).outputs["output"].shape == (1, 10)


def test_calls_keep_working_while_the_provider_is_down(gw, provider):
    tokens = token_source(provider, "alice")
    with client(gw, "alice", tokens) as alice:
        alice.predict("mlp", {"input": X})
        provider.stop()
        gw.gateway.reload()  # a refetch now fails: the last good key set stays
        for _ in range(3):  # the SDK's cached token, verified with the cached keys
            assert alice.predict("mlp", {"input": X}).outputs["output"].shape == (1, 10)
    with client(gw, "alice", token_source(provider, "alice")) as alice, pytest.raises(gateway.AuthenticationError):
        alice.predict("mlp", {"input": X})  # a new token cannot be had: the SDK says so, the call is not sent
