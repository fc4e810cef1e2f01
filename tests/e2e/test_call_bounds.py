"""What one caller's refusals may cost (limits.per_principal.max_refusals), and how long a call or a stream may last
(limits.max_call_s, limits.max_stream_s): issue 27, items 9 and 11 (E11)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub, tensor

X = np.zeros((1, 784), np.float32)
REQUEST = pb.PredictRequest(model_name="mlp", inputs=[tensor("input", X)])
CAROL = "spiffe://gateway.local/client/carol"  # allowed nothing by the test policy
REFUSALS = {
    "limits.per_principal.max_refusals": 5,
    "limits.per_principal.refusal_window_s": 60.0,
    "limits.per_principal.refusal_block_s": 60.0,
}


def messages(count: int):
    for index in range(count):
        yield pb.PredictRequest(id=f"m{index}", model_name="mlp", inputs=[tensor("input", X)])


def drain_stream(responses) -> tuple[int, grpc.RpcError | None]:
    """How many replies a stream gave, and the error it ended with (None: it ended OK)."""
    replies = 0
    try:
        for _ in responses:
            replies += 1
    except grpc.RpcError as exc:
        return replies, exc
    return replies, None


def test_a_stream_of_refused_messages_is_ended_at_the_refusal_limit_and_the_caller_is_refused_for_a_while(
    start_gateway,
):
    gw = start_gateway(overrides=REFUSALS)
    with gw.channel("carol") as channel:
        client = stub(channel)
        token = gw.token("carol", bind="carol")
        replies, exc = drain_stream(
            client.PredictStream(messages(200), metadata=auth(token, ("x-request-id", "refused")), timeout=TIMEOUT)
        )
        assert exc is not None and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        assert "limits.per_principal.max_refusals" in (exc.details() or "")
        assert replies == 5  # each refused in-band, then the stream is ended
        later = rpc_error(
            lambda: client.Predict(REQUEST, metadata=auth(token, ("x-request-id", "later")), timeout=TIMEOUT)
        )
        assert later.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with gw.channel() as channel:  # another principal is not concerned
        assert stub(channel).Predict(REQUEST, metadata=auth(gw.token()), timeout=TIMEOUT).model_version == "2"
    records = gw.audit_records()
    stream = [r for r in records if r["request_id"] == "refused"]
    assert [r["code"] for r in stream if r["event"] == "stream_message"] == ["PERMISSION_DENIED"] * 5
    (ended,) = [r for r in stream if r["event"] == "stream"]
    assert (ended["code"], ended["reason"], ended["messages"], ended["sub"]) == (
        "RESOURCE_EXHAUSTED",
        "refusal limit",
        5,
        "carol",
    )
    (refused,) = [r for r in records if r["request_id"] == "later"]
    assert (refused["code"], refused["reason"], refused["sub"], refused["cert_identity"]) == (
        "RESOURCE_EXHAUSTED",
        "refusal limit",
        "carol",
        CAROL,
    )


def test_concurrent_streams_of_one_principal_write_a_bounded_number_of_refused_message_records(start_gateway):
    gw = start_gateway(overrides=REFUSALS)
    token = gw.token("carol", bind="carol")
    streams = 8
    outcomes: list[tuple[int, grpc.RpcError | None]] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        with gw.channel("carol") as channel:
            call = stub(channel).PredictStream(
                messages(200), metadata=auth(token, ("x-request-id", f"s{index}")), timeout=TIMEOUT
            )
            outcome = drain_stream(call)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(outcomes) == streams
    for _, exc in outcomes:
        assert exc is not None and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
    records = gw.audit_records()
    refused = [r for r in records if r["event"] == "stream_message"]
    # At most one message per stream is between its check and its record when the limit is reached.
    assert 5 <= len(refused) <= 5 + streams - 1, len(refused)
    ended = [r for r in records if r["event"] == "stream"]
    assert len(ended) == streams
    assert {(r["code"], r["reason"]) for r in ended} == {("RESOURCE_EXHAUSTED", "refusal limit")}


def test_a_certificate_whose_calls_are_refused_before_any_token_is_refused_for_a_while(start_gateway):
    gw = start_gateway(overrides=REFUSALS)
    with gw.channel("carol") as channel:
        client = stub(channel)
        codes = []
        for index in range(8):
            exc = rpc_error(
                lambda i=index: client.Predict(REQUEST, metadata=(("x-request-id", f"c{i}"),), timeout=TIMEOUT)
            )
            codes.append(exc.code())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 3
    with gw.channel() as channel:  # another certificate is not concerned
        assert stub(channel).Predict(REQUEST, metadata=auth(gw.token()), timeout=TIMEOUT).model_version == "2"
    records = {r["request_id"]: r for r in gw.audit_records()}
    assert [records[f"c{i}"]["reason"] for i in range(5, 8)] == ["refusal limit"] * 3
    assert {records[f"c{i}"]["cert_identity"] for i in range(8)} == {CAROL}


def test_a_blocked_certificate_still_serves_a_principal_whose_token_it_verified_before(start_gateway):
    """Many principals may share one certificate (a proxy with unbound tokens): token-less refusals on it must not
    lock out a principal whose verdict on that certificate is still remembered."""
    gw = start_gateway(overrides=REFUSALS)
    token = gw.token()
    with gw.channel() as channel:
        client = stub(channel)
        assert client.Predict(REQUEST, metadata=auth(token), timeout=TIMEOUT).model_version == "2"
        codes = [rpc_error(lambda: client.Predict(REQUEST, timeout=TIMEOUT)).code() for _ in range(6)]
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert client.Predict(REQUEST, metadata=auth(token), timeout=TIMEOUT).model_version == "2"


def test_a_stream_past_limits_max_stream_s_is_ended_deadline_exceeded_and_recorded(start_gateway):
    gw = start_gateway(overrides={"limits.max_stream_s": 1.0})
    stop = threading.Event()

    def trickle():  # one message every 0.1 s: never idle, for up to 20 s
        for index in range(200):
            if stop.is_set():
                return
            yield pb.PredictRequest(id=f"t{index}", model_name="mlp", inputs=[tensor("input", X)])
            time.sleep(0.1)

    started = time.monotonic()
    with gw.channel() as channel:
        call = stub(channel).PredictStream(trickle(), metadata=auth(gw.token(), ("x-request-id", "long")), timeout=60)
        replies, exc = drain_stream(call)
        stop.set()
    assert exc is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
    assert "limits.max_stream_s" in (exc.details() or "")
    assert time.monotonic() - started < 20  # the server's cap ended it, not the client's sending nor its deadline
    assert replies >= 1
    (ended,) = [r for r in gw.audit_records() if r["request_id"] == "long" and r["event"] == "stream"]
    assert (ended["code"], ended["reason"]) == ("DEADLINE_EXCEEDED", "stream time limit")


def test_a_unary_call_past_limits_max_call_s_is_ended_deadline_exceeded_and_recorded(start_gateway):
    # The request's message is sent, its end is not: the call would otherwise wait limits.message_timeout_s.
    gw = start_gateway(overrides={"limits.max_call_s": 1.0, "limits.message_timeout_s": 30.0})
    release = threading.Event()

    def one_then_hold():
        yield predict_request("mlp", {"input": X})
        release.wait(timeout=30)

    with gw.channel() as channel:
        held = channel.stream_unary(
            "/gateway.v1.InferenceService/Predict",
            request_serializer=pb.PredictRequest.SerializeToString,
            response_deserializer=pb.PredictResponse.FromString,
        )
        started = time.monotonic()
        exc = rpc_error(lambda: held(one_then_hold(), metadata=auth(gw.token(), ("x-request-id", "held")), timeout=60))
        release.set()
    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
    assert "limits.max_call_s" in (exc.details() or "")
    assert time.monotonic() - started < 20
    (record,) = [r for r in gw.audit_records() if r["request_id"] == "held"]
    assert (record["code"], record["reason"]) == ("DEADLINE_EXCEEDED", "call time limit")
