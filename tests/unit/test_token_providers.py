"""SDK token providers without a server: RefreshingToken reads a token's exp itself (no JWT library in an SDK-only
install) only to schedule the next fetch; the server verifies the token."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from gateway.client import RefreshingToken


def part(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def unsigned(claims: Any) -> str:
    """A compact JWS with these claims and no valid signature: enough for scheduling, which verifies nothing."""
    return f"{part({'alg': 'none'})}.{part(claims)}.c2ln"


def fetches(token: str, calls: int = 3) -> int:
    fetched = []
    provider = RefreshingToken(lambda: fetched.append(token) or token, refresh_before_s=30)
    for _ in range(calls):
        assert provider.token() == token
    return len(fetched)


def test_a_token_far_from_its_expiry_is_fetched_once():
    assert fetches(unsigned({"sub": "alice", "exp": time.time() + 3600})) == 1


@pytest.mark.parametrize("claims", [{"sub": "alice"}, {"exp": time.time() + 10}])
def test_a_token_without_exp_or_about_to_expire_is_fetched_for_every_call(claims):
    assert fetches(unsigned(claims)) == 3


@pytest.mark.parametrize(
    "token", ["opaque", "a.b", "a.!!!.c", unsigned(["not", "an", "object"]), unsigned({"exp": "soon"})]
)
def test_a_token_that_is_not_a_jwt_is_refused(token):
    with pytest.raises(ValueError):
        RefreshingToken(lambda: token).token()
