"""Handler threads: a small pool for unary calls, a larger one for calls that hold a thread while they are open.

grpcio runs each call in a thread of the server's executor, and hands every call off between its poller thread
and that handler thread several times. On 2 cores, 4 threads for unary calls served about 1.2x the requests/s
of 16, at about 15% less server CPU per request (bench A/B, 16 and 64 in flight): fewer threads contend for the
GIL, and a thread that finishes a call takes the next queued one without sleeping. A stream, though, holds its
thread for as long as it is open, so a small pool would let a few open streams block every other call. Streams
and every call not known to be unary (health watches, reflection) therefore get a pool of their own, sized for
how many may be open at once. A stream beyond that is refused at once (``streams_full``; see interceptors.py)
rather than left waiting for a thread with no word to its client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

_UNARY = "_gateway_unary_behavior"


def mark_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a handler behavior to run in the unary pool: a unary call, or a refusal that ends at once."""
    setattr(behavior, _UNARY, True)
    return behavior


class HandlerExecutor(futures.Executor):
    """The server's executor: calls to marked unary behaviors go to one pool, everything else to the other.

    grpcio passes the behavior among the arguments of each ``submit``; an unmarked call (or a grpcio that
    passes it some other way) runs in the stream pool, as with a single executor, so nothing can starve.
    """

    def __init__(self, *, unary_workers: int, stream_workers: int) -> None:
        self._unary = futures.ThreadPoolExecutor(unary_workers, thread_name_prefix="grpc-unary")
        self._streams = futures.ThreadPoolExecutor(stream_workers, thread_name_prefix="grpc-stream")
        self._stream_threads = stream_workers
        self._stream_calls = 0  # submitted to the stream pool and not finished: running or waiting for a thread
        self._stream_calls_lock = threading.Lock()

    @property
    def streams_full(self) -> bool:
        """True when a call submitted to the stream pool now would wait for a thread."""
        return self._stream_calls >= self._stream_threads

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        if any(getattr(arg, _UNARY, False) for arg in args):
            return self._unary.submit(fn, *args, **kwargs)
        with self._stream_calls_lock:
            self._stream_calls += 1
        future = self._streams.submit(fn, *args, **kwargs)
        future.add_done_callback(self._stream_call_done)
        return future

    def _stream_call_done(self, _future: futures.Future[Any]) -> None:
        with self._stream_calls_lock:
            self._stream_calls -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._unary.shutdown(wait, cancel_futures=cancel_futures)
        self._streams.shutdown(wait, cancel_futures=cancel_futures)
