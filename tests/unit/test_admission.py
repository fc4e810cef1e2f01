"""Admission: the server's and each principal's capacity, taken and given back as one slot per call."""

from __future__ import annotations

import pytest

from gateway.errors import ResourceExhaustedError
from gateway.limits import Admission, PrincipalLimits

ALICE = ("https://gateway.local", "alice")
BOB = ("https://gateway.local", "bob")


def admission(*, total: int = 10, in_flight: int = 2, streams: int = 1) -> Admission:
    return Admission(
        max_concurrent_rpcs=total, per_principal=PrincipalLimits(max_in_flight=in_flight, max_streams=streams)
    )


def test_a_principal_past_its_calls_in_flight_is_refused_naming_the_limit_while_others_are_admitted() -> None:
    limits = admission(in_flight=2)
    held = [limits.admit(ALICE, stream=False) for _ in range(2)]
    with pytest.raises(ResourceExhaustedError) as refused:
        limits.admit(ALICE, stream=False)
    assert "limits.per_principal.max_in_flight" in str(refused.value)
    assert refused.value.reason == "per-principal in_flight limit"
    limits.admit(BOB, stream=False)
    limits.admit(ALICE, stream=True)  # streams are counted apart
    assert limits.in_flight == 4  # the refusal took nothing
    held[0].release()
    limits.admit(ALICE, stream=False)


def test_streams_have_their_own_limit() -> None:
    limits = admission(streams=1)
    limits.admit(ALICE, stream=True)
    with pytest.raises(ResourceExhaustedError) as refused:
        limits.admit(ALICE, stream=True)
    assert "limits.per_principal.max_streams" in str(refused.value)
    assert refused.value.reason == "per-principal streams limit"


def test_the_server_limit_counts_every_call_with_or_without_a_principal() -> None:
    limits = admission(total=2, in_flight=5)
    limits.admit(ALICE, stream=False)
    limits.admit(None, stream=False)  # the dev_no_auth mode: no principal to count against
    with pytest.raises(ResourceExhaustedError) as refused:
        limits.admit(BOB, stream=False)
    assert refused.value.reason == "concurrent call limit"
    assert limits.in_flight == 2


def test_a_principal_refused_for_the_server_limit_holds_nothing_of_its_own() -> None:
    limits = admission(total=1, in_flight=1)
    blocker = limits.admit(BOB, stream=False)
    with pytest.raises(ResourceExhaustedError):
        limits.admit(ALICE, stream=False)
    blocker.release()
    limits.admit(ALICE, stream=False)  # her one slot was not taken by the refused call


def test_release_gives_back_both_counts_once() -> None:
    limits = admission(total=3, in_flight=1)
    slot = limits.admit(ALICE, stream=False)
    slot.release()
    slot.release()  # idempotent: nothing given back twice
    assert limits.in_flight == 0
    again = limits.admit(ALICE, stream=False)
    assert limits.in_flight == 1
    with pytest.raises(ResourceExhaustedError):
        limits.admit(ALICE, stream=False)
    again.release()
    assert limits.in_flight == 0
