"""Handler threads: open streams hold threads of their own pool, so unary calls and health checks are served
while they stay open, and a stream beyond the pool is refused at once (and audited) rather than left waiting."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.conftest import wait_until
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub, tensor

X = np.random.default_rng(3).random((1, 784), dtype=np.float32)
MESSAGE = pb.PredictRequest(model_name="mlp", inputs=[tensor("input", X)])


@contextmanager
def open_streams(client, md, count: int) -> Iterator[list]:
    """``count`` streams that have each had one reply and stay open (holding a thread) until the block ends."""
    release = threading.Event()

    def one_message_then_hold():
        yield MESSAGE
        release.wait(timeout=TIMEOUT)

    streams = [client.PredictStream(one_message_then_hold(), metadata=md, timeout=TIMEOUT) for _ in range(count)]
    try:
        assert [next(stream).WhichOneof("outcome") for stream in streams] == ["response"] * count
        yield streams
    finally:
        release.set()
    assert all(list(stream) == [] for stream in streams)  # each stream then ends cleanly


def test_unary_calls_and_health_checks_are_served_while_every_stream_thread_is_held(start_gateway):
    gw = start_gateway(overrides={"limits.unary_workers": 1, "limits.stream_workers": 3})
    with gw.channel() as channel:
        client, md = stub(channel), auth(gw.token())
        # Three streams are open at once, which a single pool of one thread could not hold ...
        with open_streams(client, md, 3):
            # ... and unary calls still run, on the unary pool's single thread, one after the other,
            replies = [
                client.Predict(predict_request("mlp", {"input": X}), metadata=md, timeout=TIMEOUT) for _ in range(5)
            ]
            assert [reply.model_version for reply in replies] == ["2"] * 5
            # as does a balancer's health probe.
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_stream_beyond_the_stream_threads_is_refused_at_once_and_recorded(start_gateway):
    gw = start_gateway(overrides={"limits.stream_workers": 2})
    with gw.channel() as channel:
        client, md = stub(channel), auth(gw.token())
        with open_streams(client, md, 2):
            refused = rpc_error(lambda: list(client.PredictStream(iter([MESSAGE]), metadata=md, timeout=TIMEOUT)))
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of open streams" in refused.details()
            record = gw.audit_records()[-1]
            assert (record["event"], record["code"], record["reason"]) == (
                "stream",
                "RESOURCE_EXHAUSTED",
                "every stream thread is taken",
            )
            assert record["method"].endswith("/PredictStream")

        def a_new_stream_is_served() -> bool:
            try:
                return len(list(client.PredictStream(iter([MESSAGE]), metadata=md, timeout=TIMEOUT))) == 1
            except grpc.RpcError:
                return False

        wait_until(a_new_stream_is_served)  # the held threads are back once their streams have ended


def test_a_call_whose_deadline_passes_while_it_waits_for_a_thread_is_never_run_and_is_counted(start_gateway):
    # Both unary threads wait 1 s inside a batcher (one per version of mlp), so a third call queues past its deadline.
    gw = start_gateway(
        overrides={
            "limits.unary_workers": 2,
            "models.batching": {"mlp": {"max_batch_size": 2, "max_queue_delay_us": 1_000_000}},
        }
    )
    batchers = [gw.gateway.models.resolve("mlp", version).batcher for version in (1, 2)]
    runs_before = sum(batcher.requests_run for batcher in batchers)
    replies: list[str] = []

    def held_call(version: str) -> None:
        with gw.channel() as channel:
            request = predict_request("mlp", {"input": X}, version=version)
            replies.append(stub(channel).Predict(request, metadata=auth(gw.token()), timeout=TIMEOUT).model_version)

    holders = [threading.Thread(target=held_call, args=(version,)) for version in ("1", "2")]
    for holder in holders:
        holder.start()
    wait_until(lambda: all(batcher.queued == 1 for batcher in batchers))
    with gw.channel() as channel:
        late = rpc_error(
            lambda: stub(channel).Predict(predict_request("mlp", {"input": X}), metadata=auth(gw.token()), timeout=0.3)
        )
    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for holder in holders:
        holder.join(timeout=TIMEOUT)
    assert sorted(replies) == ["1", "2"]
    # grpcio reads a unary request in the handler thread; the call is already over by then, so grpcio never
    # calls the handler: the model does not run, and the call is counted as routed but not handled
    # (docs/audit.md, "Calls refused before a handler runs").
    wait_until(lambda: gw.gateway.audit_interceptor.counts()["unobserved"] == 1)
    assert sum(batcher.requests_run for batcher in batchers) == runs_before + 2
