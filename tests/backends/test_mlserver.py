"""A real MLServer as the gateway's backend: every RPC of both APIs for a routed model goes through the gateway's
boundary, authentication and policy first; a refused caller causes no backend traffic; the answers are MLServer's
own, byte for byte; every call leaves one truthful record naming the backend."""

from __future__ import annotations

import re
import shutil
import urllib.request

import grpc
import numpy as np
import pytest

import gateway
from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.inference import grpc_service_pb2 as oip
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
from tests.backends.conftest import empty_repository, plaintext_backend, triton
from tests.backends.servers import OipServer
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub

X = np.random.default_rng(23).random((2, 784), dtype=np.float32)
# The backend's RPCs a caller's call can cause (the health poll's ServerReady, ModelMetadata and RepositoryIndex
# are the gateway's own).
CALLER_RPCS = ("ModelInfer", "ModelStreamInfer", "ModelConfig")


@pytest.fixture(scope="module")
def gw(start_module_gateway, mlserver, tmp_path_factory):
    return start_module_gateway(
        models=empty_repository(tmp_path_factory),
        overrides={
            "backends": {
                "mlserver": plaintext_backend(mlserver, {"mlp": "mlp", "labels": "labels"}),
                # The same server again, its models found in its RepositoryIndex by pattern.
                "discovered": plaintext_backend(mlserver, {}, model_patterns=["exp*"]),
            },
            "metrics.listen": "127.0.0.1:0",
        },
    )


def oip_request(inputs: np.ndarray = X, **fields) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="mlp", **fields)
    request.inputs.add(name="input", datatype="FP32", shape=inputs.shape)
    request.raw_input_contents.append(inputs.tobytes())
    return request


def direct(mlserver: OipServer, request: oip.ModelInferRequest) -> oip.ModelInferResponse:
    with grpc.insecure_channel(mlserver.target) as channel:
        return oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=TIMEOUT)


def caller_calls(mlserver: OipServer) -> dict[str, int]:
    calls = mlserver.calls()
    return {rpc: calls[rpc] for rpc in CALLER_RPCS}


INFER = {
    "op": "infer",
    "args": {
        "model": "mlp",
        "inputs": [
            {"name": "input", "datatype": "FP32", "numpy": "float32", "shape": [2, 784], "data": X.ravel().tolist()}
        ],
    },
}


def test_tritonclient_gets_mlservers_answer_through_the_gateway_and_bob_is_refused_unseen(gw, mlserver, tmp_path):
    [through] = triton(gw, tmp_path, [INFER])
    [straight] = triton(gw, tmp_path, [INFER], target=mlserver.target)
    assert through["ok"]["outputs"] == straight["ok"]["outputs"]
    assert through["ok"]["model_version"] == "2"
    before = caller_calls(mlserver)
    [refused] = triton(gw, tmp_path, [INFER], client="bob")
    assert refused["error"]["status"] == "StatusCode.PERMISSION_DENIED"
    assert caller_calls(mlserver) == before
    allowed, denied = [r for r in gw.audit_records() if r["method"].endswith("/ModelInfer")][-2:]
    assert (allowed["sub"], allowed["code"], allowed["decision"], allowed["version"]) == ("alice", "OK", "allow", "2")
    assert allowed["backend"]["name"] == "mlserver" and allowed["backend"]["address"] == mlserver.target
    assert allowed["backend"]["code"] == "OK" and allowed["backend"]["latency_ms"] > 0
    assert (denied["sub"], denied["code"], denied["decision"]) == ("bob", "PERMISSION_DENIED", "deny")
    assert denied["backend"] == {"name": "mlserver", "address": None, "code": None, "latency_ms": None}


def test_oip_answers_equal_mlservers_raw_bytes(gw, mlserver):
    token = gw.token()
    with gw.channel() as channel:
        answer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            oip_request(id="r-7"), metadata=auth(token), timeout=TIMEOUT
        )
    expected = direct(mlserver, oip_request())
    assert answer.raw_output_contents == expected.raw_output_contents
    assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [("output", "FP32", [2, 10])]
    assert (answer.model_name, answer.model_version, answer.id) == ("mlp", "2", "r-7")


def test_sdk_predict_metadata_and_listing_of_a_routed_model(gw, mlserver):
    pki = gw.pki
    with gateway.Client(
        gw.target, ca=pki.path("ca.crt"), cert=pki.path("alice.crt"), key=pki.path("alice.key"), token=gw.token()
    ) as client:
        result = client.predict("mlp", {"input": X}, timeout=TIMEOUT)
        metadata = client.metadata("mlp", timeout=TIMEOUT)
        listed = {m.name: m for m in client.list_models(timeout=TIMEOUT)}
        streamed = list(client.predict_stream([{"input": X}, {"input": X[:1]}], model="mlp", timeout=TIMEOUT))
    expected = np.frombuffer(direct(mlserver, oip_request()).raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_array_equal(result.outputs["output"], expected)
    assert result.version == "2"
    assert [(s.name, s.datatype, s.shape) for s in metadata.inputs] == [("input", "FP32", (-1, 784))]
    assert listed["mlp"].versions == ("2",)
    np.testing.assert_array_equal(streamed[0].outputs["output"], expected)
    np.testing.assert_array_equal(streamed[1].outputs["output"], expected[:1])
    messages = [r for r in gw.audit_records() if r["event"] == "stream_message"][-2:]
    assert [(m["message_index"], m["code"], m["backend"]["code"]) for m in messages] == [
        (0, "OK", "OK"),
        (1, "OK", "OK"),
    ]


def test_oip_metadata_ready_config_and_index_of_a_routed_model(gw, mlserver):
    token = gw.token()
    with gw.channel() as channel:
        client = oip_grpc.GRPCInferenceServiceStub(channel)
        metadata = client.ModelMetadata(oip.ModelMetadataRequest(name="mlp"), metadata=auth(token), timeout=TIMEOUT)
        ready = client.ModelReady(oip.ModelReadyRequest(name="mlp"), metadata=auth(token), timeout=TIMEOUT)
        index = client.RepositoryIndex(oip.RepositoryIndexRequest(), metadata=auth(token), timeout=TIMEOUT)
        before = caller_calls(mlserver)
        config = rpc_error(
            lambda: client.ModelConfig(oip.ModelConfigRequest(name="mlp"), metadata=auth(token), timeout=TIMEOUT)
        )
    assert (metadata.name, list(metadata.versions), [i.name for i in metadata.inputs]) == ("mlp", ["2"], ["input"])
    assert ready.ready
    listed = [(m.name, m.version, m.state) for m in index.models]
    assert listed == [("expand", "1", "READY"), ("labels", "1", "READY"), ("mlp", "2", "READY")]
    # MLServer has no ModelConfig: asked (the caller may read metadata), it answers UNIMPLEMENTED, told as such.
    assert config.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caller_calls(mlserver)["ModelConfig"] == before["ModelConfig"] + 1
    record = gw.audit_records()[-1]
    assert (record["code"], record["backend"]["code"]) == ("UNIMPLEMENTED", "UNIMPLEMENTED")


def test_every_rpc_refused_for_bob_sends_nothing_and_tells_nothing(gw, mlserver):
    token = gw.token("bob", bind="bob")
    before, recorded = caller_calls(mlserver), len(gw.audit_records())
    with gw.channel("bob") as channel:
        client = oip_grpc.GRPCInferenceServiceStub(channel)
        v1 = stub(channel)
        md = auth(token)
        refusals = [
            rpc_error(lambda: client.ModelInfer(oip_request(), metadata=md, timeout=TIMEOUT)),
            rpc_error(lambda: client.ModelMetadata(oip.ModelMetadataRequest(name="mlp"), metadata=md, timeout=TIMEOUT)),
            rpc_error(lambda: client.ModelReady(oip.ModelReadyRequest(name="mlp"), metadata=md, timeout=TIMEOUT)),
            rpc_error(lambda: client.ModelConfig(oip.ModelConfigRequest(name="mlp"), metadata=md, timeout=TIMEOUT)),
            rpc_error(lambda: v1.Predict(predict_request("mlp", {"input": X}), metadata=md, timeout=TIMEOUT)),
            rpc_error(
                lambda: v1.GetModelMetadata(pb.GetModelMetadataRequest(model_name="mlp"), metadata=md, timeout=TIMEOUT)
            ),
        ]
        streamed = list(client.ModelStreamInfer(iter([oip_request()]), metadata=md, timeout=TIMEOUT))
        v1_streamed = list(v1.PredictStream(iter([predict_request("mlp", {"input": X})]), metadata=md, timeout=TIMEOUT))
        index = client.RepositoryIndex(oip.RepositoryIndexRequest(), metadata=md, timeout=TIMEOUT)
        listed = v1.ListModels(pb.ListModelsRequest(), metadata=md, timeout=TIMEOUT)
    assert {e.code() for e in refusals} == {grpc.StatusCode.PERMISSION_DENIED}
    # What a local model's refusal says: the action and model asked for, never whether the model is there.
    denied = re.compile(
        r"no rule lets you '\w+' on model 'mlp' \(it may not exist\) \(request id [^;]+; see call_refused"
    )
    assert all(denied.match(e.details()) for e in refusals), [e.details() for e in refusals]
    assert streamed[0].error_message.startswith("PERMISSION_DENIED")
    assert v1_streamed[0].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "mlp" not in {m.name for m in index.models} | {m.name for m in listed.models}
    assert caller_calls(mlserver) == before
    denied = [r for r in gw.audit_records()[recorded:] if r["decision"] == "deny"]
    assert len(denied) == 8 and all(r["sub"] == "bob" and r["backend"]["address"] is None for r in denied)


def test_inputs_are_checked_against_the_backends_metadata_before_anything_is_sent(gw, mlserver):
    token = gw.token()
    before = caller_calls(mlserver)
    with gw.channel() as channel:
        error = rpc_error(
            lambda: oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                oip_request(np.zeros((1, 783), np.float32)), metadata=auth(token), timeout=TIMEOUT
            )
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "784" in error.details()
    assert caller_calls(mlserver) == before
    record = gw.audit_records()[-1]
    assert (record["code"], record["decision"], record["backend"]["address"]) == ("INVALID_ARGUMENT", "allow", None)


def test_backend_metrics_count_calls_latency_and_health_by_backend(gw):
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.gateway.metrics.port}/metrics", timeout=TIMEOUT) as answer:
        text = answer.read().decode()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}
    assert samples['gateway_backend_calls_total{backend="mlserver",code="OK"}'] > 0
    assert samples['gateway_backend_call_duration_seconds_count{backend="mlserver"}'] > 0
    assert samples['gateway_backend_calls_in_flight{backend="mlserver"}'] == 0
    assert samples['gateway_backend_up{backend="mlserver"}'] == 1


def test_a_text_model_on_mlserver_gets_bytes_through_as_they_came(gw, mlserver):
    words = np.array(["bird", "Wörld", ""], dtype=object)
    raw = b"".join(len(w.encode()).to_bytes(4, "little") + w.encode() for w in words)
    request = oip.ModelInferRequest(model_name="labels")
    request.inputs.add(name="text", datatype="BYTES", shape=[3])
    request.raw_input_contents.append(raw)
    with gw.channel() as channel:
        answer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=auth(gw.token()), timeout=TIMEOUT
        )
    expected = direct(mlserver, request)
    assert [(o.name, o.datatype) for o in answer.outputs] == [("ids", "INT64"), ("echo", "BYTES")]
    assert answer.raw_output_contents == expected.raw_output_contents
    assert answer.raw_output_contents[1] == raw  # the echo output: the caller's words, back as they went


def test_models_found_by_pattern_in_the_backends_repository_index_are_routed(gw):
    request = oip.ModelInferRequest(model_name="expand")
    request.inputs.add(name="n", datatype="INT64", shape=[1])
    request.raw_input_contents.append(np.array([3], np.int64).tobytes())
    with gw.channel() as channel:
        answer = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=auth(gw.token()), timeout=TIMEOUT
        )
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [0.0, 0.0, 0.0]
    record = gw.audit_records()[-1]
    assert (record["model"], record["version"], record["backend"]["name"]) == ("expand", "1", "discovered")


def test_a_model_stream_through_the_gateway_answers_each_message_as_mlserver_does(gw, mlserver):
    requests = [oip_request(id="s-0"), oip_request(X[:1], id="s-1")]
    with gw.channel() as channel:
        answers = list(
            oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter(requests), metadata=auth(gw.token()), timeout=TIMEOUT
            )
        )
    assert [a.error_message for a in answers] == ["", ""]
    assert [a.infer_response.id for a in answers] == ["s-0", "s-1"]
    for answer, request in zip(answers, requests, strict=True):
        assert answer.infer_response.raw_output_contents == direct(mlserver, request).raw_output_contents
    messages = [r for r in gw.audit_records() if r["event"] == "stream_message"][-2:]
    assert [(m["code"], m["backend"]["code"]) for m in messages] == [("OK", "OK"), ("OK", "OK")]


def test_a_version_the_backend_does_not_advertise_is_not_found_unsent_and_makes_no_metric_label(gw, mlserver):
    """MLServer advertises mlp version 2 only: version 1 (or any text) is NOT_FOUND at the gateway, for calls,
    metadata, readiness and configuration alike, nothing sent; the caller's text never becomes a metric label."""
    token, before = gw.token(), caller_calls(mlserver)
    md = auth(token)
    with gw.channel() as channel:
        client = oip_grpc.GRPCInferenceServiceStub(channel)
        refusals = [
            rpc_error(lambda: client.ModelInfer(oip_request(model_version="zz-9"), metadata=md, timeout=TIMEOUT)),
            rpc_error(lambda: client.ModelInfer(oip_request(model_version="1"), metadata=md, timeout=TIMEOUT)),
            rpc_error(
                lambda: client.ModelMetadata(
                    oip.ModelMetadataRequest(name="mlp", version="1"), metadata=md, timeout=TIMEOUT
                )
            ),
            rpc_error(
                lambda: client.ModelConfig(
                    oip.ModelConfigRequest(name="mlp", version="1"), metadata=md, timeout=TIMEOUT
                )
            ),
        ]
        ready = client.ModelReady(oip.ModelReadyRequest(name="mlp", version="1"), metadata=md, timeout=TIMEOUT)
        asked = client.ModelInfer(oip_request(model_version="2"), metadata=md, timeout=TIMEOUT)
    assert [e.code() for e in refusals] == [grpc.StatusCode.NOT_FOUND] * 4
    assert not ready.ready
    assert asked.model_version == "2"
    assert caller_calls(mlserver) == {**before, "ModelInfer": before["ModelInfer"] + 1}
    refused = [r for r in gw.audit_records() if r["requested_version"] == "zz-9"][-1]
    assert (refused["code"], refused["version"], refused["backend"]["address"]) == ("NOT_FOUND", None, None)
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.gateway.metrics.port}/metrics", timeout=TIMEOUT) as answer:
        text = answer.read().decode()
    labelled = {
        line.split("{", 1)[1].split("}", 1)[0] for line in text.splitlines() if line.startswith("gateway_calls_total{")
    }
    assert not [labels for labels in labelled if "zz-9" in labels]
    assert any('model="mlp"' in labels and 'version="2"' in labels for labels in labelled)


def test_a_codec_hint_that_would_change_the_backends_decoding_is_refused_unsent(gw, mlserver):
    """MLServer decodes by content_type: "base64" (or "str" on FP32) would make it read the values otherwise than
    the gateway checked them."""
    token, before = gw.token(), caller_calls(mlserver)
    request = oip_request()
    request.inputs[0].parameters["content_type"].string_param = "base64"
    with gw.channel() as channel:
        error = rpc_error(
            lambda: oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=auth(token), timeout=TIMEOUT
            )
        )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "content_type" in error.details()
    assert caller_calls(mlserver) == before


def test_an_explicit_route_wins_over_a_pattern_of_its_backend(
    start_module_gateway, mlserver, tmp_path_factory, demo_models
):
    """``models: {expand: mlp, ...}`` with ``model_patterns: ["exp*", "ml*", "lab*"]``: the backend's own "expand"
    does not replace the explicit route, the explicit route's remote model "mlp" is not served under a second name,
    and "labels", found by a pattern but also in the local repository, is the local model, listed once."""
    backend = plaintext_backend(mlserver, {"expand": "mlp", "sleeper": "slow"}, model_patterns=["exp*", "ml*", "lab*"])
    only_labels = tmp_path_factory.mktemp("labels-only")
    shutil.copytree(demo_models / "labels", only_labels / "labels")
    edge = start_module_gateway(models=only_labels, overrides={"backends": {"m": backend}})
    pki = edge.pki
    with gateway.Client(
        edge.target, ca=pki.path("ca.crt"), cert=pki.path("alice.crt"), key=pki.path("alice.key"), token=edge.token()
    ) as client:
        metadata = client.metadata("expand", timeout=TIMEOUT)
        listed = sorted(m.name for m in client.list_models(timeout=TIMEOUT))
        with pytest.raises(gateway.NotFoundError):
            client.metadata("mlp", timeout=TIMEOUT)
    assert [spec.name for spec in metadata.inputs] == ["input"]  # mlp's signature, not expand's ("n")
    assert listed == ["expand", "labels", "sleeper"]
