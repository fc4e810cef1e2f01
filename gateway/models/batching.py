"""Dynamic batching: concurrent requests to one model version run as one ONNX Runtime call.

No thread of its own: the first request of a batch leads it. The leader waits up to the queue delay (or until
the batch is full) for others to join, runs the concatenated batch in its own thread and hands each follower its
rows. Requests arriving meanwhile form the next batch, so batches overlap and nothing outlives the model
version. Only for models whose inputs and outputs all have a dynamic first (batch) dimension.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import GatewayError, InternalError

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class BatchingOptions:
    """How many rows a batch may hold, and how long its first request waits for company."""

    max_batch_size: int = 32
    max_queue_delay_us: int = 500


@dataclass(slots=True)
class _Batch:
    """Requests gathered for one run. Each follower waits on a held lock of its own, released by the leader."""

    requests: list[Mapping[str, np.ndarray]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # each request's rows
    rows: int = 0
    closed: threading.Event = field(default_factory=threading.Event)  # full, or no longer open to joiners
    waiters: list[threading.Lock] = field(default_factory=list)
    results: list[Tensors] = field(default_factory=list)
    error: GatewayError | None = None


Execute = Callable[[Mapping[str, np.ndarray]], Tensors]


class Batcher:
    """Gathers concurrent requests into batches along the first dimension, run by one call of ``execute``.

    ``execute`` comes with each call rather than at construction, so that a model version and its batcher do not
    form a reference cycle: a removed version is freed as soon as its last in-flight request ends.
    """

    def __init__(self, options: BatchingOptions) -> None:
        self._max_rows = options.max_batch_size
        self._delay_s = options.max_queue_delay_us / 1e6
        self._lock = threading.Lock()
        self._open: _Batch | None = None  # the batch new requests join, until it is full or its leader takes it
        self.batches_run = 0  # for tests and metrics
        self.requests_run = 0

    @property
    def queued(self) -> int:
        """Requests in the batch still open to joiners (waiting for company): for metrics and tests."""
        batch = self._open
        return len(batch.requests) if batch is not None else 0

    def run(self, inputs: Mapping[str, np.ndarray], execute: Execute) -> Tensors:
        """The outputs for ``inputs`` (already validated), computed together with concurrent requests."""
        rows = _rows(inputs)
        if rows is None or rows >= self._max_rows:
            return execute(inputs)  # ragged, or a full batch by itself: nothing to gain by waiting
        waiter: threading.Lock | None = None
        with self._lock:
            batch = self._open
            if batch is None or batch.rows + rows > self._max_rows:
                if batch is not None:
                    batch.closed.set()  # it cannot take this request: let its leader run it now
                batch = self._open = _Batch()
            else:
                waiter = threading.Lock()
                waiter.acquire()
                batch.waiters.append(waiter)
            index = len(batch.requests)
            batch.requests.append(inputs)
            batch.counts.append(rows)
            batch.rows += rows
            if batch.rows >= self._max_rows:
                self._open = None
                batch.closed.set()
        if waiter is None:
            self._lead(batch, execute)
        else:
            waiter.acquire()
        if batch.error is not None:
            # A fresh exception per caller: one instance raised in several threads would share its traceback.
            raise type(batch.error)(batch.error.message, reason=batch.error.reason)
        return batch.results[index]

    def _lead(self, batch: _Batch, execute: Execute) -> None:
        batch.closed.wait(self._delay_s)
        with self._lock:
            if self._open is batch:
                self._open = None
            self.batches_run += 1
            self.requests_run += len(batch.requests)
        try:
            batch.results = self._run_batch(batch, execute)
        except GatewayError as exc:
            batch.error = exc
        finally:
            for waiter in batch.waiters:
                waiter.release()

    @staticmethod
    def _run_batch(batch: _Batch, execute: Execute) -> list[Tensors]:
        requests, rows = batch.requests, batch.rows
        if len(requests) == 1:
            return [execute(requests[0])]
        joined = {name: np.concatenate([request[name] for request in requests]) for name in requests[0]}
        outputs = execute(joined)
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
