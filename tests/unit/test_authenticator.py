"""The Authenticator's remembered verdicts: checks run once per connection and token, and every change a verdict
rests on (revocation, expiry, key rotation) is seen on the very next call."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest

from gateway.auth.authenticator import Authenticator
from gateway.auth.certs import CrlStore
from gateway.auth.issuer import issue_token
from gateway.auth.keys import KeyStore, kid_from_jwks
from gateway.auth.verifier import TokenVerifier
from gateway.errors import AuthenticationError
from tests.conftest import ROOT, Pki, run_script


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _token(pki: Pki, *, sub: str = "alice", ttl_s: float = 600, now: float) -> str:
    key = pki.read("jwt-signing.key")
    return issue_token(
        private_key_pem=key,
        sub=sub,
        iss="https://gateway.local",
        aud="gateway",
        kid=kid_from_jwks(pki.path("jwks.json"), key),
        bind_cert_pem=pki.read(f"{sub}.crt"),
        ttl_s=ttl_s,
        now=now,
    )


@pytest.fixture
def setup(pki_copy: Pki, monkeypatch: pytest.MonkeyPatch) -> tuple[Authenticator, Clock, KeyStore, CrlStore, list[str]]:
    """An authenticator over the copied PKI's keys and CRL, a hand-moved clock, and the tokens it verified."""
    clock = Clock(time.time())
    keys = KeyStore(pki_copy.path("jwks.json"), interval_s=0, allowed_algorithms=("RS256", "ES256", "EdDSA"))
    verifier = TokenVerifier(keys=keys, issuer="https://gateway.local", audience="gateway", clock=clock)
    crl = CrlStore(pki_copy.path("crl.pem"), pki_copy.path("ca.crt"), interval_s=0)
    verified: list[str] = []
    verify = verifier.verify

    def counting(token: str, **kwargs: Any) -> Any:
        verified.append(token)
        return verify(token, **kwargs)

    monkeypatch.setattr(verifier, "verify", counting)
    return Authenticator(verifier=verifier, crl=crl, clock=clock), clock, keys, crl, verified


def _as(authenticator: Authenticator, pki: Pki, token: str, client: str = "alice") -> Callable[[], Any]:
    peer = authenticator.inspect(pki.read(f"{client}.crt"))
    return lambda: authenticator.authenticate(peer, [f"Bearer {token}"])


def test_the_checks_run_once_per_certificate_and_token(setup, pki_copy: Pki) -> None:
    authenticator, clock, _keys, _crl, verified = setup
    token = _token(pki_copy, now=clock.now)
    first = _as(authenticator, pki_copy, token)()
    assert _as(authenticator, pki_copy, token)() == first
    assert _as(authenticator, pki_copy, token)() == first
    assert len(verified) == 1
    other = _token(pki_copy, now=clock.now - 1)  # another token of the same caller: checked on its own
    assert _as(authenticator, pki_copy, other)().subject == "alice"
    assert len(verified) == 2


def test_a_remembered_caller_is_refused_once_its_certificate_is_revoked(setup, pki_copy: Pki) -> None:
    authenticator, clock, _keys, crl, _verified = setup
    call = _as(authenticator, pki_copy, _token(pki_copy, now=clock.now))
    call()
    run_script(ROOT / "scripts/gen_certs.sh", "--revoke", "alice", pki_copy.dir)
    assert crl.reload_now()
    with pytest.raises(AuthenticationError) as refused:
        call()
    assert refused.value.reason == "client certificate revoked"


def test_a_remembered_caller_is_refused_once_its_token_expires(setup, pki_copy: Pki) -> None:
    authenticator, clock, _keys, _crl, _verified = setup
    call = _as(authenticator, pki_copy, _token(pki_copy, ttl_s=60, now=clock.now))
    call()
    clock.now += 60 + 31  # past exp and the verifier's leeway (30 s, for fresh decisions only)
    with pytest.raises(AuthenticationError):
        call()


def test_a_remembered_caller_is_checked_again_after_a_key_rotation(setup, pki_copy: Pki, other_pki: Pki) -> None:
    authenticator, clock, keys, _crl, verified = setup
    call = _as(authenticator, pki_copy, _token(pki_copy, now=clock.now))
    call()
    replaced = pki_copy.path("jwks.json").with_suffix(".new")
    shutil.copyfile(other_pki.path("jwks.json"), replaced)
    replaced.replace(pki_copy.path("jwks.json"))  # the signing key is gone from the set
    assert keys.reload_now()
    with pytest.raises(AuthenticationError):
        call()
    assert len(verified) == 2


def test_refusals_are_not_remembered(setup, pki_copy: Pki) -> None:
    authenticator, clock, _keys, _crl, verified = setup
    bob_token = _token(pki_copy, sub="bob", now=clock.now)
    for _ in range(2):  # bound to bob's certificate, presented on alice's connection
        with pytest.raises(AuthenticationError):
            _as(authenticator, pki_copy, bob_token)()
    assert len(verified) == 2
