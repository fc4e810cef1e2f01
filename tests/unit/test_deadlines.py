"""Bounded waits without a timer each (gateway/deadlines.py): what the call boundary's bounds rest on."""

from __future__ import annotations

import asyncio

import pytest

from gateway.deadlines import Deadlines


class Expired(Exception):
    def __init__(self, what: str, timeout_s: float) -> None:
        super().__init__(f"no {what} within {timeout_s:g} s")
        self.what = what


def deadlines(resolution_s: float = 0.01) -> Deadlines:
    return Deadlines(Expired, resolution_s=resolution_s)


def test_a_wait_past_its_bound_raises_the_error_naming_it_after_its_time_never_before() -> None:
    bounds = deadlines(resolution_s=0.02)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Expired, match=r"no request within 0\.1 s"):
            await bounds.within(asyncio.sleep(10), 0.1, "request")
        return loop.time() - started

    waited = asyncio.run(main())
    assert 0.1 <= waited < 2.0  # late by up to the resolution, and whatever the loaded machine adds


def test_a_wait_that_ends_in_time_returns_its_result_and_leaves_no_check_behind() -> None:
    bounds = deadlines()

    async def main() -> str:
        async def answer() -> str:
            await asyncio.sleep(0.001)
            return "answer"

        result = await bounds.within(answer(), 5.0, "answer")
        await asyncio.sleep(0.05)  # a check or two runs, finds nothing bounded, and schedules none
        assert bounds._check is None and not bounds._waits
        return result

    assert asyncio.run(main()) == "answer"


def test_a_wait_names_its_own_error_when_it_gives_one() -> None:
    bounds = deadlines()

    async def main() -> None:
        await bounds.within(asyncio.sleep(10), 0.02, "reply", expired_error=lambda: TimeoutError("the cap"))

    with pytest.raises(TimeoutError, match="the cap"):
        asyncio.run(main())


def test_nested_bounds_raise_the_error_of_the_one_whose_time_ran_out_first() -> None:
    """Both past their time at the same check (its resolution far above either): the inner, earlier one wins."""
    bounds = deadlines(resolution_s=0.2)

    async def main() -> None:
        async def inner() -> None:
            await bounds.within(asyncio.sleep(10), 0.01, "inner")

        await bounds.within(inner(), 0.02, "outer")

    with pytest.raises(Expired) as raised:
        asyncio.run(main())
    assert raised.value.what == "inner"


def test_the_outer_bound_fires_when_the_inner_wait_outlives_it() -> None:
    bounds = deadlines()

    async def main() -> None:
        async def inner() -> None:
            await bounds.within(asyncio.sleep(10), 5.0, "inner")

        await bounds.within(inner(), 0.05, "outer")

    with pytest.raises(Expired) as raised:
        asyncio.run(main())
    assert raised.value.what == "outer"


def test_any_other_cancellation_stays_a_cancellation() -> None:
    bounds = deadlines()

    async def main() -> None:
        waiting = asyncio.create_task(bounds.within(asyncio.sleep(10), 5.0, "request"))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not bounds._waits

    asyncio.run(main())


def test_many_waits_each_get_their_own_bound() -> None:
    bounds = deadlines()

    async def main() -> list[str]:
        async def one(timeout_s: float, sleep_s: float) -> str:
            try:
                await bounds.within(asyncio.sleep(sleep_s), timeout_s, f"{timeout_s}")
            except Expired:
                return "expired"
            return "done"

        return await asyncio.gather(*(one(0.05, 0.001), one(0.05, 5.0), one(5.0, 0.1), one(0.1, 5.0)))

    assert asyncio.run(main()) == ["done", "expired", "done", "expired"]


def test_bounds_keep_working_on_a_new_event_loop() -> None:
    """A gateway stopped and started again serves on a new loop: the checks start again there."""
    bounds = deadlines()

    async def main() -> None:
        with pytest.raises(Expired):
            await bounds.within(asyncio.sleep(10), 0.03, "request")

    asyncio.run(main())
    asyncio.run(main())


def test_a_bound_past_its_time_withdraws_its_cancel_request_whatever_the_wait_raised() -> None:
    """A wait that turns the bound's cancellation into an error of its own: the task is not left cancelling."""
    bounds = deadlines()

    async def main() -> int:
        async def converts() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                raise ValueError("gave up") from None

        with pytest.raises(ValueError, match="gave up"):
            await bounds.within(converts(), 0.02, "request")
        task = asyncio.current_task()
        assert task is not None
        return task.cancelling()

    assert asyncio.run(main()) == 0


def test_a_check_left_on_a_loop_given_up_on_does_nothing_on_the_new_ones_waits() -> None:
    bounds = deadlines()

    async def wait_there() -> None:
        await bounds.within(asyncio.sleep(0.01), 5.0, "request")

    old = asyncio.new_event_loop()
    try:
        old.run_until_complete(wait_there())  # leaves a check scheduled on the old loop, as a stop cut short would
        stale_check = bounds._check
        assert stale_check is not None

        async def on_the_new_loop() -> None:
            waiting = asyncio.create_task(bounds.within(asyncio.sleep(10), 0.05, "request"))
            await asyncio.sleep(0)
            new_check = bounds._check
            assert new_check is not None and new_check is not stale_check
            bounds._expire_due(old)  # the old loop's check, running late: neither its waits nor its schedule
            assert bounds._check is new_check
            with pytest.raises(Expired):
                await waiting

        asyncio.run(on_the_new_loop())
    finally:
        old.close()
