"""The handler executor sends marked unary behaviors to the unary pool and everything else to the stream pool."""

from __future__ import annotations

import threading

from gateway.executor import HandlerExecutor, mark_unary
from tests.conftest import wait_until


def thread_name(*_args: object) -> str:
    return threading.current_thread().name


def test_marked_unary_behaviors_run_in_the_unary_pool_and_the_rest_in_the_stream_pool() -> None:
    executor = HandlerExecutor(unary_workers=1, stream_workers=1)
    try:
        unary = mark_unary(lambda request, context: None)
        unmarked = lambda request, context: None  # noqa: E731 (a streaming behavior, or anything grpcio passes)
        # grpcio's submit passes the call's state and its behavior among other arguments, in its own order.
        assert executor.submit(thread_name, object(), unary, None).result(timeout=5).startswith("grpc-unary")
        assert executor.submit(thread_name, object(), unmarked, None).result(timeout=5).startswith("grpc-stream")
        assert executor.submit(thread_name).result(timeout=5).startswith("grpc-stream")
    finally:
        executor.shutdown()


def test_a_busy_stream_pool_does_not_hold_up_unary_calls() -> None:
    executor = HandlerExecutor(unary_workers=1, stream_workers=1)
    held = threading.Event()
    try:
        executor.submit(held.wait, 10)  # the only stream thread, taken by an open stream
        unary = mark_unary(lambda request, context: None)
        assert executor.submit(thread_name, unary).result(timeout=5).startswith("grpc-unary")
    finally:
        held.set()
        executor.shutdown()


def test_streams_full_counts_stream_calls_until_they_finish() -> None:
    executor = HandlerExecutor(unary_workers=1, stream_workers=2)
    held = threading.Event()
    try:
        first = executor.submit(held.wait, 10)
        assert not executor.streams_full
        second = executor.submit(held.wait, 10)
        assert executor.streams_full  # a third stream would wait for a thread
        executor.submit(thread_name, mark_unary(lambda: None)).result(timeout=5)
        assert executor.streams_full  # unary calls take no stream thread
        held.set()
        first.result(timeout=5), second.result(timeout=5)
        wait_until(lambda: not executor.streams_full)  # done callbacks run just after result() returns
    finally:
        held.set()
        executor.shutdown()
