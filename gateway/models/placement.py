"""Where a model run happens: inline on the event loop when it is measured to be short, else on a bounded pool.

A run inline costs no thread hand-off (the cheapest path for small models), but blocks the loop for as long as
it takes; a run on the pool costs two hand-offs and leaves the loop free. The choice is made per call from what
the model version's runs took so far (``RunCost``), scaled by the size of the request, against
``models.inline_max_ms``. A version's first run, before anything is known, goes to the pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Tensors = dict[str, np.ndarray]
Execute = Callable[[Mapping[str, np.ndarray]], Tensors]

_SMOOTHING = 0.2  # weight of the newest run in the moving averages


class RunCost:
    """Moving averages of one model version's run time and request size (elements), updated after every run."""

    __slots__ = ("elements", "seconds")

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.elements = 0.0

    def observe(self, elements: int, seconds: float) -> None:
        """Account for one run."""
        if self.seconds is None:
            self.seconds, self.elements = seconds, float(elements)
            return
        self.seconds += _SMOOTHING * (seconds - self.seconds)
        self.elements += _SMOOTHING * (elements - self.elements)

    def predict(self, elements: int) -> float | None:
        """Expected seconds for a run on ``elements`` input elements (None before the first run): a request
        larger than usual is expected to take proportionally longer, a smaller one no less than usual."""
        if self.seconds is None:
            return None
        return self.seconds * max(1.0, elements / self.elements) if self.elements > 0 else self.seconds


class Placement:
    """Runs models inline when their predicted run time is at most ``inline_max_s``, else on ``threads`` threads."""

    def __init__(self, *, threads: int, inline_max_s: float) -> None:
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="model-run")
        self._inline_max_s = inline_max_s
        self.inline_runs = 0  # for tests and metrics
        self.pool_runs = 0

    async def run(self, execute: Execute, inputs: Mapping[str, np.ndarray], cost: RunCost) -> Tensors:
        """``execute(inputs)``, inline or on the pool, and its duration accounted to ``cost``."""
        elements = sum(array.size for array in inputs.values())
        predicted = cost.predict(elements)
        if predicted is not None and predicted <= self._inline_max_s:
            self.inline_runs += 1
            return _timed(execute, inputs, cost, elements)
        self.pool_runs += 1
        run = contextvars.copy_context().run  # the call's log context (request id) goes along
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, run, _timed, execute, inputs, cost, elements
        )

    def close(self) -> None:
        """Stop the pool once the runs it has are done."""
        self._pool.shutdown(wait=True)


def _timed(execute: Execute, inputs: Mapping[str, np.ndarray], cost: RunCost, elements: int) -> Tensors:
    started = time.perf_counter()
    try:
        return execute(inputs)
    finally:
        # Updated from a pool thread too: a lost update of a moving average only delays the estimate by one run.
        cost.observe(elements, time.perf_counter() - started)
