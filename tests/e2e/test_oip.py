"""The Open Inference Protocol service over real mutual TLS: every RPC, its refusals and its audit records.

Raw stubs built from the gateway's own proto, so each test controls every field; the stock clients (tritonclient,
Node, grpcurl) are in test_oip_clients.py.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from gateway._pb.inference import grpc_service_pb2 as pb
from gateway._pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.helpers import TIMEOUT, auth, rpc_error

PREFIX = "/inference.GRPCInferenceService/"


@pytest.fixture
def gw(start_gateway):
    return start_gateway()  # conftest's policy: alice may do anything, bob list and read digits


@pytest.fixture
def client(gw):
    channel = gw.channel("alice")
    yield pb_grpc.GRPCInferenceServiceStub(channel), auth(gw.token())
    channel.close()


@pytest.fixture
def bob(gw):
    channel = gw.channel("bob")
    yield pb_grpc.GRPCInferenceServiceStub(channel), auth(gw.token("bob", bind="bob"))
    channel.close()


def reference(models: Path, name: str, version: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(models / name / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def raw_request(model: str, inputs: dict[str, tuple[str, np.ndarray]], **fields) -> pb.ModelInferRequest:
    """Inputs as tritonclient sends them: raw_input_contents, one entry per input."""
    request = pb.ModelInferRequest(model_name=model, **fields)
    for name, (datatype, array) in inputs.items():
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


def raw_outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {
        out.name: np.frombuffer(raw, dtype=dtypes[out.datatype]).reshape(out.shape)
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def last_record(gw, method: str) -> dict:
    return [r for r in gw.audit_records() if r["method"] == PREFIX + method][-1]


def test_server_live_ready_and_metadata_need_only_an_authenticated_caller(gw, bob):
    stub, md = bob  # bob may not act on any of these models
    assert stub.ServerLive(pb.ServerLiveRequest(), metadata=md, timeout=TIMEOUT).live is True
    assert stub.ServerReady(pb.ServerReadyRequest(), metadata=md, timeout=TIMEOUT).ready is True
    metadata = stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=md, timeout=TIMEOUT)
    assert metadata.name == "gateway" and metadata.version and "model_configuration" in metadata.extensions
    record = last_record(gw, "ServerMetadata")
    assert (record["code"], record["sub"]) == ("OK", "bob")


@pytest.mark.parametrize("method", ["ServerLive", "ServerReady", "ServerMetadata", "RepositoryIndex"])
def test_server_rpcs_without_a_token_are_refused_and_audited(gw, method):
    channel = gw.channel("alice")
    call = channel.unary_unary(PREFIX + method)
    error = rpc_error(lambda: call(b"", timeout=TIMEOUT))
    channel.close()
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert last_record(gw, method)["code"] == "UNAUTHENTICATED"


def test_model_infer_with_raw_contents_matches_onnxruntime(gw, client, demo_models):
    stub, md = client
    x = np.random.default_rng(1).random((2, 64), dtype=np.float32)
    response = stub.ModelInfer(raw_request("digits", {"input": ("FP32", x)}, id="req-7"), metadata=md, timeout=TIMEOUT)
    label, probabilities = reference(demo_models, "digits", 1, {"input": x})
    got = raw_outputs(response)
    assert (response.model_name, response.model_version, response.id) == ("digits", "1", "req-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("label", "INT64", [2]),
        ("probabilities", "FP32", [2, 10]),
    ]
    np.testing.assert_array_equal(got["label"], label)
    np.testing.assert_allclose(got["probabilities"], probabilities, rtol=1e-5)
    record = last_record(gw, "ModelInfer")
    assert (record["code"], record["action"], record["model"], record["version"]) == ("OK", "predict", "digits", "1")
    assert record["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [2, 64]}]


def test_model_infer_with_typed_contents_and_selected_outputs(client, demo_models):
    stub, md = client
    x = np.random.default_rng(2).random((1, 784), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="mlp", model_version="1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="output")
    response = stub.ModelInfer(request, metadata=md, timeout=TIMEOUT)
    assert response.model_version == "1"
    np.testing.assert_allclose(
        raw_outputs(response)["output"], reference(demo_models, "mlp", 1, {"input": x})[0], rtol=1e-5
    )


def test_requested_outputs_come_in_the_requested_order(client):
    stub, md = client
    request = raw_request("digits", {"input": ("FP32", np.zeros((1, 64), np.float32))})
    request.outputs.add(name="probabilities")
    response = stub.ModelInfer(request, metadata=md, timeout=TIMEOUT)
    assert [o.name for o in response.outputs] == ["probabilities"] and len(response.raw_output_contents) == 1


def test_bytes_tensors_raw_and_typed(client, demo_models):
    stub, md = client
    words = ["dog", "Wörld", ""]
    raw = b"".join(len(w.encode()).to_bytes(4, "little") + w.encode() for w in words)
    request = pb.ModelInferRequest(model_name="labels", raw_input_contents=[raw])
    request.inputs.add(name="text", datatype="BYTES", shape=[3])
    typed = pb.ModelInferRequest(model_name="labels")
    typed.inputs.add(name="text", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(w.encode() for w in words)
    ids, _ = reference(demo_models, "labels", 1, {"text": np.array(words, dtype=object)})
    for each in (request, typed):
        response = stub.ModelInfer(each, metadata=md, timeout=TIMEOUT)
        assert [o.datatype for o in response.outputs] == ["INT64", "BYTES"]
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.int64), ids)
        assert response.raw_output_contents[1] == raw


def _with_parameter(request: pb.ModelInferRequest) -> None:
    request.parameters["priority"].uint64_param = 3


def _with_parameters(**values) -> object:
    """A mutation setting request (``request__KEY``), first-input (``input__KEY``) or output parameters."""

    def mutate(request: pb.ModelInferRequest) -> None:
        for path, value in values.items():
            where, key = path.split("__")
            target = {"request": request, "input": request.inputs[0]}.get(where) or request.outputs.add(name="label")
            member = {bool: "bool_param", int: "int64_param", str: "string_param"}[type(value)]
            setattr(target.parameters[key], member, value)

    return mutate


def _as_fp64(request: pb.ModelInferRequest) -> None:
    request.inputs[0].datatype = "FP64"
    request.raw_input_contents[0] = np.zeros(64, np.float64).tobytes()


BAD_INFERS = {
    "unknown datatype": (
        lambda r: setattr(r.inputs[0], "datatype", "FLOAT32"),
        "unknown datatype 'FLOAT32'",
    ),
    "wrong datatype": (_as_fp64, "datatype FP64, model expects FP32"),
    "wrong raw length": (lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12), "raw_input_contents has 12 bytes"),
    "raw count": (lambda r: r.raw_input_contents.append(b""), "raw_input_contents has 2 entries for 1 inputs"),
    "raw and typed": (
        lambda r: r.inputs[0].contents.fp32_contents.append(1.0),
        "both raw_input_contents and contents.fp32_contents",
    ),
    "unknown input": (lambda r: setattr(r.inputs[0], "name", "pixels"), "pixels"),
    "wrong shape": (lambda r: r.inputs[0].shape.__setitem__(1, 32), "shape"),
    "unknown output": (lambda r: r.outputs.add(name="logits"), "has no output 'logits'"),
    "request parameter": (_with_parameter, "parameter 'priority' is not supported"),
    "final flag not a bool": (
        _with_parameters(request__triton_enable_empty_final_response="false"),
        "parameter 'triton_enable_empty_final_response' must be a boolean",
    ),
    "binary size off": (
        _with_parameters(input__binary_data_size=255),
        "'binary_data_size' says 255 bytes, the request has 256 bytes",
    ),
    "classification": (_with_parameters(output__classification=3), "output 'label': parameter 'classification'"),
    "shared memory": (_with_parameters(input__shared_memory_region="r"), "parameter 'shared_memory_region'"),
    "missing model name": (lambda r: setattr(r, "model_name", ""), "model_name is required"),
}


@pytest.mark.parametrize("case", sorted(BAD_INFERS))
def test_malformed_infer_requests_are_invalid_argument_and_audited(gw, client, case):
    stub, md = client
    mutate, message = BAD_INFERS[case]
    request = raw_request("digits", {"input": ("FP32", np.zeros((1, 64), np.float32))})
    mutate(request)
    error = rpc_error(lambda: stub.ModelInfer(request, metadata=md, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert message in error.details()
    record = last_record(gw, "ModelInfer")
    assert record["code"] == "INVALID_ARGUMENT"


def test_the_parameters_stock_clients_always_send_are_accepted_with_their_meaning(gw, client, demo_models):
    """perf_analyzer's triton_enable_empty_final_response (false), the KServe SDK's binary_data_size (the raw
    length) and tritonclient.http's binary_data_output / binary_data (gRPC answers are raw, the binary form)."""
    stub, md = client
    x = np.random.default_rng(3).random((2, 64), dtype=np.float32)
    request = raw_request("digits", {"input": ("FP32", x)})
    _with_parameters(
        request__triton_enable_empty_final_response=False,
        request__binary_data_output=True,
        input__binary_data_size=x.nbytes,
        input__content_type="np",
        output__binary_data=False,
    )(request)
    response = stub.ModelInfer(request, metadata=md, timeout=TIMEOUT)
    label, _ = reference(demo_models, "digits", 1, {"input": x})
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], np.int64), label)
    assert "triton_final_response" not in response.parameters
    assert last_record(gw, "ModelInfer")["code"] == "OK"


def test_stream_replies_say_they_are_final_when_asked(gw, client):
    stub, md = client
    asked = raw_request("digits", {"input": ("FP32", np.zeros((1, 64), np.float32))}, id="a")
    asked.parameters["triton_enable_empty_final_response"].bool_param = True
    failing = raw_request("digits", {"input": ("FP64", np.zeros((1, 64), np.float64))}, id="b")
    failing.parameters["triton_enable_empty_final_response"].bool_param = True
    plain = raw_request("digits", {"input": ("FP32", np.zeros((1, 64), np.float32))}, id="c")
    replies = list(stub.ModelStreamInfer(iter([asked, failing, plain]), metadata=md, timeout=TIMEOUT))
    assert [r.infer_response.id for r in replies] == ["a", "b", "c"]  # one reply each: no empty final ones
    assert [bool(r.error_message) for r in replies] == [False, True, False]
    final = [r.infer_response.parameters.get("triton_final_response") for r in replies]
    assert [f is not None and f.bool_param for f in final] == [True, True, False]


def test_a_caller_without_permission_learns_nothing_about_models(gw, bob):
    stub, md = bob
    x = np.zeros((1, 784), np.float32)
    for model in ("mlp", "no-such-model"):  # one exists, one does not: the same answer
        error = rpc_error(lambda m=model: stub.ModelInfer(raw_request(m, {"input": ("FP32", x)}), metadata=md))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        for method, request in (
            ("ModelReady", pb.ModelReadyRequest(name=model)),
            ("ModelMetadata", pb.ModelMetadataRequest(name=model)),
            ("ModelConfig", pb.ModelConfigRequest(name=model)),
        ):
            error = rpc_error(lambda m=method, r=request: getattr(stub, m)(r, metadata=md, timeout=TIMEOUT))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, method
            assert last_record(gw, method)["decision"] == "deny"


def test_model_ready_as_triton_answers_it(client):
    stub, md = client
    assert stub.ModelReady(pb.ModelReadyRequest(name="mlp"), metadata=md, timeout=TIMEOUT).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="1"), metadata=md, timeout=TIMEOUT).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="9"), metadata=md, timeout=TIMEOUT).ready is False
    assert stub.ModelReady(pb.ModelReadyRequest(name="no-such"), metadata=md, timeout=TIMEOUT).ready is False


def test_model_metadata_and_config(gw, client):
    stub, md = client
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"), metadata=md, timeout=TIMEOUT)
    assert (metadata.name, list(metadata.versions), metadata.platform) == ("digits", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 64])]
    assert [(t.name, t.datatype) for t in metadata.outputs] == [("label", "INT64"), ("probabilities", "FP32")]
    config = stub.ModelConfig(pb.ModelConfigRequest(name="labels"), metadata=md, timeout=TIMEOUT).config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "labels",
        "onnxruntime_onnx",
        "onnxruntime",
        0,
    )
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("text", pb.TYPE_STRING, [-1])]
    assert [(o.name, o.data_type) for o in config.output] == [("ids", pb.TYPE_INT64), ("echo", pb.TYPE_STRING)]
    assert last_record(gw, "ModelConfig")["action"] == "metadata"


def test_repository_index_lists_what_the_caller_may_list(gw, client, bob):
    stub, md = client
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=md, timeout=TIMEOUT)
    assert {(m.name, m.version, m.state) for m in index.models} >= {("mlp", "1", "READY"), ("mlp", "2", "READY")}
    bob_stub, bob_md = bob
    index = bob_stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=bob_md, timeout=TIMEOUT)
    assert [(m.name, m.version) for m in index.models] == [("digits", "1")]
    assert last_record(gw, "RepositoryIndex")["action"] == "list"
    error = rpc_error(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="other"), metadata=md))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert last_record(gw, "RepositoryIndex")["code"] == "INVALID_ARGUMENT"


def test_stream_answers_in_order_with_errors_in_band_and_a_record_per_message(gw, client, demo_models):
    stub, md = client
    x = np.random.default_rng(3).random((1, 64), dtype=np.float32)
    good = raw_request("digits", {"input": ("FP32", x)}, id="a")
    bad = raw_request("digits", {"input": ("FP64", x.astype(np.float64))}, id="b")
    denied = raw_request("no-such-model", {"input": ("FP32", x)}, id="c")
    replies = list(stub.ModelStreamInfer(iter([good, bad, denied, good]), metadata=md, timeout=TIMEOUT))
    assert [r.infer_response.id for r in replies] == ["a", "b", "c", "a"]
    assert [r.error_message.split(":")[0] for r in replies] == ["", "INVALID_ARGUMENT", "NOT_FOUND", ""]
    np.testing.assert_array_equal(
        raw_outputs(replies[3].infer_response)["label"], reference(demo_models, "digits", 1, {"input": x})[0]
    )
    records = [r for r in gw.audit_records() if r["method"] == PREFIX + "ModelStreamInfer"]
    assert [r["event"] for r in records] == ["stream_message"] * 4 + ["stream"]
    assert [r["code"] for r in records] == ["OK", "INVALID_ARGUMENT", "NOT_FOUND", "OK", "OK"]
    assert records[-1]["messages"] == 4 and {r["action"] for r in records[:4]} == {"stream"}


def test_every_call_leaves_exactly_one_record(gw, client, bob):
    stub, md = client
    bob_stub, bob_md = bob
    before = len(gw.audit_records())
    x = np.zeros((1, 64), np.float32)
    calls = [
        lambda: stub.ServerLive(pb.ServerLiveRequest(), metadata=md),
        lambda: stub.ModelInfer(raw_request("digits", {"input": ("FP32", x)}), metadata=md),
        lambda: bob_stub.ModelInfer(raw_request("digits", {"input": ("FP32", x)}), metadata=bob_md),
        lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), metadata=md),
        lambda: stub.ModelConfig(pb.ModelConfigRequest(), metadata=md),
        lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=md),
    ]
    for call in calls:
        with contextlib.suppress(grpc.RpcError):
            call()
    records = gw.audit_records()[before:]
    assert [r["method"].removeprefix(PREFIX) for r in records] == [
        "ServerLive",
        "ModelInfer",
        "ModelInfer",
        "ModelMetadata",
        "ModelConfig",
        "RepositoryIndex",
    ]
    assert [r["code"] for r in records] == ["OK", "OK", "PERMISSION_DENIED", "NOT_FOUND", "INVALID_ARGUMENT", "OK"]


def test_triton_rpcs_the_gateway_does_not_serve_are_unimplemented_after_authentication(gw):
    channel = gw.channel("alice")
    unload = channel.unary_unary(PREFIX + "RepositoryModelUnload")
    anonymous = rpc_error(lambda: unload(b"", timeout=TIMEOUT))
    refused = rpc_error(lambda: unload(b"", metadata=auth(gw.token()), timeout=TIMEOUT))
    channel.close()
    assert anonymous.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
    assert [r["code"] for r in gw.audit_records()] == ["UNAUTHENTICATED", "UNIMPLEMENTED"]
