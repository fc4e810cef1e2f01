"""The SDK's ClientCredentialsTokenProvider against node-oidc-provider, an OpenID-certified provider, over real
HTTPS on loopback (tests/oidc_provider.py): RFC 8705 mutual-TLS client authentication and certificate-bound
RFC 9068 access tokens, client secrets, the provider's refusals, caching, refresh and one request for concurrent
callers. Skipped where node is not installed."""

from __future__ import annotations

import ssl
import threading
import time
from typing import Any

import httpx
import jwt
import pytest

import gateway
from gateway.auth.keys import cert_thumbprint
from tests.oidc_provider import GROUPS, SECRET_CLIENT


def tls_client(provider, name: str = "alice", *, client_id: str | None = None, **kwargs):
    """A provider for ``client_id`` (default: ``name``) authenticated by ``name``'s certificate."""
    pki = provider.pki
    return gateway.ClientCredentialsTokenProvider(
        provider.token_url,
        client_id or name,
        cert=pki.path(f"{name}.crt"),
        key=pki.path(f"{name}.key"),
        ca=provider.ca,
        resource=provider.resource,
        **kwargs,
    )


def secret_client(provider, secret: str, **kwargs):
    return gateway.ClientCredentialsTokenProvider(
        provider.token_url, SECRET_CLIENT, client_secret=secret, ca=provider.ca, resource=provider.resource, **kwargs
    )


def published_keys(provider) -> list[dict[str, Any]]:
    """The provider's JWKS, found through its discovery document."""
    verify = ssl.create_default_context(cafile=provider.ca)
    discovery = httpx.get(provider.discovery_url, verify=verify, timeout=10).json()
    assert discovery["issuer"] == provider.issuer and discovery["jwks_uri"] == provider.jwks_url
    return list(httpx.get(discovery["jwks_uri"], verify=verify, timeout=10).json()["keys"])


def claims(provider, token: str) -> tuple[dict, dict]:
    """The token's header and claims, its signature checked against the provider's published keys."""
    header = jwt.get_unverified_header(token)
    key = jwt.PyJWKSet(published_keys(provider))[header["kid"]]
    verified = jwt.decode(token, key.key, algorithms=["RS256"], audience=provider.resource, issuer=provider.issuer)
    return header, verified


def test_tls_client_auth_yields_an_at_jwt_bound_to_the_clients_certificate(oidc_provider):
    provider = tls_client(oidc_provider, "alice", scope="predict metadata")
    header, token_claims = claims(oidc_provider, provider.token())
    assert header["typ"] == "at+jwt" and header["alg"] == "RS256"  # RFC 9068 2.1
    assert token_claims["aud"] == oidc_provider.resource
    assert token_claims["sub"] == token_claims["client_id"] == "alice"
    assert token_claims["scope"] == "predict metadata"
    assert token_claims["groups"] == token_claims["realm_access"]["roles"] == GROUPS["alice"]
    # RFC 8705 3.1: bound to the certificate the SDK presented, as the gateway computes its thumbprint.
    assert token_claims["cnf"] == {"x5t#S256": cert_thumbprint(oidc_provider.pki.read("alice.crt"))}


def test_a_client_secret_yields_a_token_without_a_certificate_binding(oidc_provider):
    provider = secret_client(oidc_provider, oidc_provider.client_secret)
    _, token_claims = claims(oidc_provider, provider.token())
    assert token_claims["sub"] == SECRET_CLIENT and "cnf" not in token_claims


def test_a_wrong_secret_is_an_authentication_error_with_the_providers_code(oidc_provider):
    wrong = "not-the-secret-" + oidc_provider.client_secret[:4]
    provider = secret_client(oidc_provider, wrong)
    with pytest.raises(gateway.AuthenticationError) as caught:
        provider.token()
    assert caught.value.reason == "invalid_client"
    assert "invalid_client" in str(caught.value) and wrong not in str(caught.value)
    assert wrong not in repr(provider) and oidc_provider.client_secret not in repr(provider)
    assert [e["error"] for e in oidc_provider.token_requests()] == ["invalid_client"]


def test_another_clients_certificate_cannot_get_its_token(oidc_provider):
    provider = tls_client(oidc_provider, "bob", client_id="alice")
    with pytest.raises(gateway.AuthenticationError) as caught:
        provider.token()
    assert caught.value.reason == "invalid_client"
    assert oidc_provider.token_requests("alice") == [
        {"event": "grant.error", "client_id": "alice", "error": "invalid_client"}
    ]


def test_a_token_is_cached_until_it_is_about_to_expire(oidc_provider):
    provider = tls_client(oidc_provider)
    assert provider.token() == provider.token() == provider.token()
    assert len(oidc_provider.token_requests()) == 1


def test_a_short_lived_token_is_fetched_again_before_it_expires(start_oidc_provider):
    # A 4 s token with refresh_before_s 30: refreshed once half its life is gone, not on every call.
    oidc = start_oidc_provider(ttl_s=4)
    provider = tls_client(oidc, refresh_before_s=30)
    first = provider.token()
    assert provider.token() == first and len(oidc.token_requests()) == 1
    time.sleep(2.5)  # past half its life: a sleep never ends early, so this is not a timing assert
    second = provider.token()
    assert second != first and len(oidc.token_requests()) == 2
    _, token_claims = claims(oidc, second)
    assert token_claims["exp"] - token_claims["iat"] == 4


def test_concurrent_callers_share_one_request(oidc_provider):
    provider = tls_client(oidc_provider)
    barrier = threading.Barrier(16)
    tokens: list[str] = []

    def call() -> None:
        barrier.wait()
        tokens.append(provider.token())

    threads = [threading.Thread(target=call) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(tokens) == 16 and len(set(tokens)) == 1
    assert len(oidc_provider.token_requests()) == 1


def test_rotated_keys_sign_new_tokens_under_a_new_kid(oidc_provider):
    """The harness's rotation, which the gateway-side tests rely on: a new key signs, both are published, then
    the old one is retired; the port (so the issuer) stays the same."""
    issuer = oidc_provider.issuer
    new_kid = oidc_provider.rotate_key()
    token = secret_client(oidc_provider, oidc_provider.client_secret).token()
    assert jwt.get_unverified_header(token)["kid"] == new_kid and oidc_provider.issuer == issuer
    assert [key["kid"] for key in published_keys(oidc_provider)] == [new_kid, "key-1"]
    oidc_provider.retire_old_keys()
    published = published_keys(oidc_provider)
    assert [key["kid"] for key in published] == [new_kid] and "d" not in published[0]  # public keys only
    claims(oidc_provider, token)


def test_a_refusal_reaches_a_gateway_call_as_an_authentication_error(oidc_provider, start_gateway):
    gw = start_gateway()
    pki = oidc_provider.pki
    provider = secret_client(oidc_provider, "wrong-secret")
    with (
        gateway.Client(
            gw.target, ca=pki.path("ca.crt"), cert=pki.path("alice.crt"), key=pki.path("alice.key"), token=provider
        ) as client,
        pytest.raises(gateway.AuthenticationError) as caught,
    ):
        client.list_models(timeout=10)
    assert "invalid_client" in str(caught.value) and "wrong-secret" not in str(caught.value)
    assert gw.audit_records() == []  # nothing was sent


async def test_a_refusal_reaches_an_async_gateway_call_as_an_authentication_error(oidc_provider, start_gateway):
    gw = start_gateway()
    pki = oidc_provider.pki
    provider = tls_client(oidc_provider, "bob", client_id="alice")
    async with gateway.AsyncClient(
        gw.target, ca=pki.path("ca.crt"), cert=pki.path("bob.crt"), key=pki.path("bob.key"), token=provider
    ) as client:
        with pytest.raises(gateway.AuthenticationError) as caught:
            await client.list_models(timeout=10)
    assert "invalid_client" in str(caught.value)
    assert gw.audit_records() == []
