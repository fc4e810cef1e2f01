"""Dynamic batching on the event loop: concurrent requests to one model version run as one ONNX Runtime call.

No thread of its own: the first request of a batch opens it and sets a timer for the queue delay; the batch
runs when the timer fires or when it is full, and each request gets its rows back. Requests arriving meanwhile
form the next batch, so batches overlap and nothing outlives the model version. Only for models whose inputs
and outputs all have a dynamic first (batch) dimension.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import GatewayError, InternalError

Tensors = dict[str, np.ndarray]
Execute = Callable[[Mapping[str, np.ndarray]], Awaitable[Tensors]]


@dataclass(frozen=True, slots=True)
class BatchingOptions:
    """How many rows a batch may hold, and how long its first request waits for company."""

    max_batch_size: int = 32
    max_queue_delay_us: int = 500


@dataclass(slots=True)
class _Batch:
    """Requests gathered for one run, and one future per request (a cancelled request cancels only its own)."""

    execute: Execute
    requests: list[Mapping[str, np.ndarray]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # each request's rows
    rows: int = 0
    futures: list[asyncio.Future[Tensors]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Gathers concurrent requests into batches along the first dimension, run by one call of ``execute``.

    ``execute`` comes with each call rather than at construction, so that a model version and its batcher do not
    form a reference cycle: a removed version is freed as soon as its last in-flight request ends.
    """

    def __init__(self, options: BatchingOptions, *, on_batch: Callable[[int], None] = lambda _size: None) -> None:
        """``on_batch`` is told each batch's size (the metrics; this module is imported by the settings too)."""
        self.options = options
        self._on_batch = on_batch
        self._max_rows = options.max_batch_size
        self._delay_s = options.max_queue_delay_us / 1e6
        self._open: _Batch | None = None  # the batch new requests join, until it is full or its timer fires
        self._running: set[asyncio.Task[None]] = set()  # strong references to batches being run
        self.batches_run = 0  # for tests and metrics
        self.requests_run = 0

    @property
    def queued(self) -> int:
        """Requests in the batch still open to joiners (waiting for company): for metrics and tests."""
        batch = self._open
        return len(batch.requests) if batch is not None else 0

    async def run(self, inputs: Mapping[str, np.ndarray], execute: Execute) -> Tensors:
        """The outputs for ``inputs`` (already validated), computed together with concurrent requests."""
        rows = _rows(inputs)
        if rows is None or rows >= self._max_rows:
            return await execute(inputs)  # ragged, or a full batch by itself: nothing to gain by waiting
        loop = asyncio.get_running_loop()
        batch = self._open
        if batch is None or batch.rows + rows > self._max_rows:
            if batch is not None:
                self._start(batch)  # it cannot take this request: run it now
            batch = self._open = _Batch(execute)
            batch.timer = loop.call_later(self._delay_s, self._start, batch)
        future: asyncio.Future[Tensors] = loop.create_future()
        batch.requests.append(inputs)
        batch.counts.append(rows)
        batch.futures.append(future)
        batch.rows += rows
        if batch.rows >= self._max_rows:
            self._start(batch)
        return await future

    def _start(self, batch: _Batch) -> None:
        """Close ``batch`` to joiners and run it in a task of its own (its requests may be cancelled)."""
        if self._open is batch:
            self._open = None
        if batch.timer is None:
            return  # started already
        batch.timer.cancel()
        batch.timer = None
        self.batches_run += 1
        self.requests_run += len(batch.requests)
        self._on_batch(len(batch.requests))
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    @staticmethod
    async def _run(batch: _Batch) -> None:
        if all(future.cancelled() for future in batch.futures):
            return  # nobody waits for it any more: no run (its callers' slots are free already)
        try:
            results = await _run_batch(batch)
        except Exception as exc:
            error = (
                exc if isinstance(exc, GatewayError) else InternalError(reason=f"batch failed: {type(exc).__name__}")
            )
            for future in batch.futures:
                if not future.done():
                    # A fresh exception per caller: one instance raised in several tasks would share its traceback.
                    future.set_exception(type(error)(error.message, reason=error.reason))
            return
        for future, result in zip(batch.futures, results, strict=True):
            if not future.done():
                future.set_result(result)


async def _run_batch(batch: _Batch) -> list[Tensors]:
    requests, rows = batch.requests, batch.rows
    if len(requests) == 1:
        return [await batch.execute(requests[0])]
    joined = {name: np.concatenate([request[name] for request in requests]) for name in requests[0]}
    outputs = await batch.execute(joined)
    bounds = np.cumsum(batch.counts)[:-1]
    parts: dict[str, list[np.ndarray]] = {}
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != rows:
            raise InternalError(reason=f"batched output '{name}' has shape {list(value.shape)} for {rows} rows")
        parts[name] = np.split(value, bounds)
    return [{name: split[i] for name, split in parts.items()} for i in range(len(requests))]


def _rows(inputs: Mapping[str, np.ndarray]) -> int | None:
    """The first dimension every input shares, or None when they differ (or an input is a scalar)."""
    counts = {array.shape[0] if array.ndim else None for array in inputs.values()}
    return counts.pop() if len(counts) == 1 else None
