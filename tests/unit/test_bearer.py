"""The ``authorization`` header read strictly (RFC 6750 2.1), without a server."""

from __future__ import annotations

import pytest

from gateway.auth.authenticator import bearer_token
from gateway.errors import AuthenticationError

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln"


def refusal(value: str) -> str:
    with pytest.raises(AuthenticationError) as caught:
        bearer_token([value])
    assert TOKEN not in caught.value.reason
    return caught.value.reason


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_scheme_is_case_insensitive(scheme: str) -> None:
    # RFC 9110 11.1 (formerly RFC 7235 2.1): an authentication scheme is a case-insensitive token.
    assert bearer_token([f"{scheme} {TOKEN}"]) == TOKEN


@pytest.mark.parametrize(
    "value",
    [
        f"Bearer  {TOKEN}",
        f"Bearer {TOKEN} ",
        f"Bearer {TOKEN}\t",
        f"Bearer {TOKEN}\n",
        f"Bearer {TOKEN}\r\n",
        f"Bearer \t{TOKEN}",
        f"Bearer {TOKEN} {TOKEN}",
        f"Bearer {TOKEN}=x",
        "Bearer ",
        "Bearer",
    ],
    ids=[
        "two-spaces",
        "trailing-space",
        "trailing-tab",
        "trailing-lf",
        "trailing-crlf",
        "space-tab",
        "two",
        "inner-=",
        "empty",
        "no-space",
    ],
)
def test_anything_but_one_space_then_the_token_is_malformed(value: str) -> None:
    assert refusal(value) == "malformed authorization header"


@pytest.mark.parametrize(
    "value",
    [f" Bearer {TOKEN}", f"Bearer\t{TOKEN}", f"Basic {TOKEN}", f"Bearer:{TOKEN}", TOKEN],
    ids=["leading-space", "tab", "basic", "colon", "bare-token"],
)
def test_another_scheme_is_refused(value: str) -> None:
    assert refusal(value) == "authorization scheme is not Bearer"


@pytest.mark.parametrize(
    ("values", "reason"),
    [([], "missing token"), ([f"Bearer {TOKEN}"] * 2, "several authorization headers")],
    ids=["none", "two"],
)
def test_exactly_one_header_is_read(values: list[str], reason: str) -> None:
    with pytest.raises(AuthenticationError) as caught:
        bearer_token(values)
    assert caught.value.reason == reason
