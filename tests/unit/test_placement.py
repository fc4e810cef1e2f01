"""Placement of model runs: the first run of a version goes to the pool; runs measured short then run inline
on the event loop; a request much larger than usual, or a slow model, goes back to the pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping

import numpy as np
import pytest

from gateway.models.placement import Placement, RunCost


@pytest.fixture
def placement() -> Iterator[Placement]:
    placement = Placement(threads=1, inline_max_s=0.05)  # far above these runs, even on a loaded machine
    yield placement
    placement.close()


def recording(threads: list[int], seconds: float = 0.0):  # type: ignore[no-untyped-def]
    def execute(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        threads.append(threading.get_ident())
        if seconds:
            time.sleep(seconds)
        return dict(inputs)

    return execute


async def test_a_fast_model_runs_inline_once_measured(placement: Placement) -> None:
    threads: list[int] = []
    cost = RunCost()
    x = {"input": np.zeros((1, 8), np.float32)}
    for _ in range(4):
        assert (await placement.run(recording(threads), x, cost))["input"] is x["input"]
    loop_thread = threading.get_ident()
    assert threads[0] != loop_thread  # nothing known yet: the pool
    assert threads[1:] == [loop_thread] * 3
    assert (placement.pool_runs, placement.inline_runs) == (1, 3)


async def test_a_slow_model_stays_on_the_pool(placement: Placement) -> None:
    threads: list[int] = []
    cost = RunCost()
    for _ in range(3):
        await placement.run(recording(threads, seconds=0.1), {"input": np.zeros(4, np.float32)}, cost)
    assert threading.get_ident() not in threads
    assert placement.inline_runs == 0


async def test_a_request_much_larger_than_usual_goes_to_the_pool(placement: Placement) -> None:
    cost = RunCost()
    cost.observe(elements=100, seconds=0.001)  # 1 ms for 100 elements: inline
    threads: list[int] = []
    await placement.run(recording(threads), {"input": np.zeros(100, np.float32)}, cost)
    await placement.run(recording(threads), {"input": np.zeros(100_000, np.float32)}, cost)  # predicted ~1 s
    assert threads[0] == threading.get_ident() and threads[1] != threading.get_ident()


def test_run_cost_scales_with_request_size_and_never_predicts_less_than_usual() -> None:
    cost = RunCost()
    assert cost.predict(10) is None
    cost.observe(elements=1000, seconds=0.002)
    assert cost.predict(10) == pytest.approx(0.002)
    assert cost.predict(4000) == pytest.approx(0.008)
