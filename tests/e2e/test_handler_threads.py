"""Handler threads: open streams hold threads of their own pool, so unary calls are served while they stay open."""

from __future__ import annotations

import threading

import numpy as np

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.e2e.helpers import TIMEOUT, auth, predict_request, stub, tensor

X = np.random.default_rng(3).random((1, 784), dtype=np.float32)


def test_unary_calls_are_served_while_every_stream_thread_is_held(start_gateway):
    gw = start_gateway(overrides={"limits.unary_workers": 1, "limits.stream_workers": 3})
    release = threading.Event()

    def one_message_then_hold():
        yield pb.PredictRequest(model_name="mlp", inputs=[tensor("input", X)])
        release.wait(timeout=TIMEOUT)

    with gw.channel() as channel:
        client, md = stub(channel), auth(gw.token())
        streams = [client.PredictStream(one_message_then_hold(), metadata=md, timeout=TIMEOUT) for _ in range(3)]
        try:
            # Three streams are open at once, which a single pool of one thread could not hold ...
            assert [next(stream).WhichOneof("outcome") for stream in streams] == ["response"] * 3
            # ... and unary calls still run, on the unary pool's single thread, one after the other.
            replies = [
                client.Predict(predict_request("mlp", {"input": X}), metadata=md, timeout=TIMEOUT) for _ in range(5)
            ]
            assert [reply.model_version for reply in replies] == ["2"] * 5
        finally:
            release.set()
        assert all(list(stream) == [] for stream in streams)  # each stream then ends cleanly
