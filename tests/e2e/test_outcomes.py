"""The record states what the client received: a stream reply over the size limit, a cancelled stream, the replies
of a library's stream (reflection), a refusal whose message is long. Each checked against the client's view."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import grpc
import numpy as np
import onnx
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from onnx import TensorProto, helper

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway.errors import MAX_MESSAGE_CHARS
from tests.conftest import wait_until
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub, tensor
from tests.e2e.test_call_boundary import one_then_hold, records_for, write_tiling_model

X = np.zeros((1, 784), np.float32)


def test_a_stream_reply_over_the_size_limit_is_refused_in_band_and_recorded_so(start_gateway, model_repo):
    write_tiling_model(model_repo / "tile" / "1", repeats=2000)  # 16 B in, 32 KB out
    gw = start_gateway(models=model_repo, overrides={"limits.max_message_bytes": 4096})
    small = pb.PredictRequest(model_name="mlp", inputs=[tensor("input", X)])
    large = predict_request("tile", {"input": np.ones((1, 4), np.float32)})
    request_id = uuid.uuid4().hex
    with gw.channel() as channel:
        metadata = auth(gw.token(), ("x-request-id", request_id))
        replies = list(stub(channel).PredictStream(iter([small, large, small]), metadata=metadata, timeout=TIMEOUT))
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert [r.WhichOneof("outcome") for r in replies] == ["response", "error", "response"]
    assert replies[1].error.code == exhausted and "over the limit of 4096" in replies[1].error.message
    records = records_for(gw, {request_id})
    assert [(r["event"], r["code"]) for r in records] == [
        ("stream_message", "OK"),
        ("stream_message", "RESOURCE_EXHAUSTED"),  # not OK: its reply never left
        ("stream_message", "OK"),
        ("stream", "OK"),
    ]
    assert (records[1]["reason"], records[1]["model"]) == ("response too large", "tile")
    assert records[1]["bytes_out"] == replies[1].ByteSize()


def test_a_stream_cancelled_while_the_gateway_waits_for_its_next_message_is_recorded_cancelled(start_gateway):
    gw = start_gateway()
    token = gw.token()
    message = pb.PredictRequest(model_name="mlp", inputs=[tensor("input", X)])
    codes = []
    with gw.channel() as channel:
        for _ in range(20):
            request_id = uuid.uuid4().hex
            release = threading.Event()
            call = stub(channel).PredictStream(
                one_then_hold(message, release), metadata=auth(token, ("x-request-id", request_id)), timeout=TIMEOUT
            )
            assert next(call).WhichOneof("outcome") == "response"
            call.cancel()
            release.set()
            wait_until(lambda: len(records_for(gw, {request_id})) == 2, timeout_s=TIMEOUT)  # noqa: B023
            codes.append(records_for(gw, {request_id})[-1]["code"])
    # grpcio reports a cancel in two events that may come apart (docs/audit.md): without the gateway's wait for the
    # second, about half of these were recorded OK; with it, about 1 in 60 on a loaded machine, measured.
    assert set(codes) <= {"CANCELLED", "OK"} and codes.count("CANCELLED") >= 15, codes


def test_every_reply_of_a_library_stream_is_recorded_before_it_leaves(start_gateway):
    gw = start_gateway()
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    request_id = uuid.uuid4().hex
    with gw.channel() as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        metadata = auth(gw.token(), ("x-request-id", request_id))
        replies = list(reflect.ServerReflectionInfo(iter([request, request]), metadata=metadata, timeout=TIMEOUT))
    assert len(replies) == 2
    records = records_for(gw, {request_id})
    assert [(r["event"], r["code"], r.get("message_index")) for r in records] == [
        ("stream_message", "OK", 0),
        ("stream_message", "OK", 1),
        ("stream", "OK", None),
    ]
    assert [r["bytes_out"] for r in records[:2]] == [reply.ByteSize() for reply in replies]
    assert records[2]["messages"] == 2


def write_wide_model(directory: Path, inputs: int) -> None:
    """A model with many inputs, of which it uses the first: its signature makes refusal messages long."""
    names = [f"an_input_with_a_rather_long_name_{i:04d}" for i in range(inputs)]
    graph = helper.make_graph(
        [helper.make_node("Identity", [names[0]], ["output"])],
        "wide",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in names],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    directory.mkdir(parents=True)
    onnx.save(model, directory / "model.onnx")


def test_a_refusal_with_a_long_message_reaches_the_client_with_the_status_recorded(start_gateway, model_repo):
    write_wide_model(model_repo / "wide" / "1", inputs=1000)  # "unknown input 'x' (model inputs: ...)": 40 kB
    gw = start_gateway(models=model_repo)
    request_id = uuid.uuid4().hex
    with gw.channel() as channel:
        refused = rpc_error(
            lambda: stub(channel).Predict(
                predict_request("wide", {"x": np.zeros(1, np.float32)}),
                metadata=auth(gw.token(), ("x-request-id", request_id)),
                timeout=TIMEOUT,
            )
        )
    (record,) = records_for(gw, {request_id})
    # A longer message would reach the client as RESOURCE_EXHAUSTED (over grpc's metadata limit), not as recorded.
    assert (refused.code(), record["code"]) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert refused.details().startswith("unknown input 'x' (model inputs: an_input_with")
    assert len(refused.details()) == MAX_MESSAGE_CHARS
