"""RefusalLimit: a caller's refusals counted in a window, then a block (issue 27 item 9), without a server."""

from __future__ import annotations

import pytest

from gateway.errors import ResourceExhaustedError
from gateway.limits import PrincipalLimits, RefusalLimit

CAROL = ("principal", "https://gateway.local", "carol")
ALICE = ("principal", "https://gateway.local", "alice")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limit(clock: Clock, max_refusals: int = 3) -> RefusalLimit:
    return RefusalLimit(
        PrincipalLimits(max_refusals=max_refusals, refusal_window_s=10.0, refusal_block_s=30.0), clock=clock
    )


def test_the_refusal_that_reaches_the_limit_blocks_that_caller_alone_until_the_block_ends():
    clock = Clock()
    refusals = limit(clock)
    assert [refusals.note(CAROL, "PERMISSION_DENIED") for _ in range(3)] == [False, False, True]
    with pytest.raises(ResourceExhaustedError, match=r"limits\.per_principal\.max_refusals") as caught:
        refusals.check(CAROL)
    assert caught.value.reason == "refusal limit"
    refusals.check(ALICE)
    refusals.check(None)
    clock.now += 30.0
    refusals.check(CAROL)


def test_refusals_in_separate_windows_do_not_add_up():
    clock = Clock()
    refusals = limit(clock)
    for _ in range(5):
        assert not refusals.note(CAROL, "UNAUTHENTICATED")
        assert not refusals.note(CAROL, "NOT_FOUND")
        clock.now += 10.0
    refusals.check(CAROL)


@pytest.mark.parametrize("code", ["OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"])
def test_outcomes_that_are_not_the_callers_doing_are_not_counted(code):
    refusals = limit(Clock(), max_refusals=1)
    assert not refusals.note(CAROL, code)
    refusals.check(CAROL)


def test_zero_turns_the_limit_off():
    refusals = limit(Clock(), max_refusals=0)
    assert not any(refusals.note(CAROL, "PERMISSION_DENIED") for _ in range(1000))
    refusals.check(CAROL)


def test_many_callers_are_tracked_within_a_bound():
    clock = Clock()
    refusals = limit(clock)
    for index in range(25_000):
        refusals.note(("certificate", f"{index:064x}"), "UNAUTHENTICATED")
    assert len(refusals._counts) <= 10_000
