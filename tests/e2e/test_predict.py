"""Predict, PredictStream, ListModels and GetModelMetadata over real mutual TLS, checked against ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.e2e.helpers import TIMEOUT, auth, outputs, predict_request, rpc_error, stub, tensor, trailer


@pytest.fixture
def gw(start_gateway):
    return start_gateway()


@pytest.fixture
def api(gw):
    channel = gw.channel("alice")
    yield stub(channel), auth(gw.token())
    channel.close()


def reference(models: Path, name: str, version: int, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(models / name / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_predict_mlp_default_version_matches_onnxruntime(api, demo_models):
    client, md = api
    x = np.random.default_rng(1).random((3, 784), dtype=np.float32)
    response = client.Predict(predict_request("mlp", {"input": x}), metadata=md, timeout=TIMEOUT)
    assert response.model_version == "2"
    np.testing.assert_allclose(
        outputs(response)["output"], reference(demo_models, "mlp", 2, {"input": x})[0], rtol=1e-5
    )


def test_predict_explicit_version_runs_that_version(api, demo_models):
    client, md = api
    x = np.random.default_rng(2).random((1, 784), dtype=np.float32)
    response = client.Predict(predict_request("mlp", {"input": x}, version="1"), metadata=md, timeout=TIMEOUT)
    assert response.model_version == "1"
    np.testing.assert_allclose(
        outputs(response)["output"], reference(demo_models, "mlp", 1, {"input": x})[0], rtol=1e-5
    )


def test_predict_text_tensors_bytes_in_and_out(api, gw, demo_models):
    client, md = api
    words = np.array(["dog", "Wörld", "", "cat"], dtype=object)
    response = client.Predict(predict_request("labels", {"text": words}), metadata=md, timeout=TIMEOUT)
    got = outputs(response)
    ids, echo = reference(demo_models, "labels", 1, {"text": words})
    np.testing.assert_array_equal(got["ids"], ids)
    assert got["echo"].tolist() == echo.tolist() == words.tolist()
    assert [t.datatype for t in response.outputs] == [pb.DATA_TYPE_INT64, pb.DATA_TYPE_BYTES]
    assert gw.audit_records()[-1]["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [4]}]


def test_text_that_is_not_utf8_is_refused_and_audited(api, gw):
    client, md = api
    bad = pb.Tensor(name="text", datatype=pb.DATA_TYPE_BYTES, shape=[1], raw_data=b"\x02\x00\x00\x00\xff\xfe")
    request = pb.PredictRequest(model_name="labels", inputs=[bad])
    error = rpc_error(lambda: client.Predict(request, metadata=md, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "element 0 is not UTF-8 text" in error.details()
    assert gw.audit_records()[-1]["code"] == "INVALID_ARGUMENT"


def test_predict_digits_matches_onnxruntime(api, demo_models):
    client, md = api
    x = np.random.default_rng(3).random((5, 64), dtype=np.float32)
    got = outputs(client.Predict(predict_request("digits", {"input": x}), metadata=md, timeout=TIMEOUT))
    label, probabilities = reference(demo_models, "digits", 1, {"input": x})
    np.testing.assert_array_equal(got["label"], label)
    np.testing.assert_allclose(got["probabilities"], probabilities, rtol=1e-5)


def test_iris_sequence_of_maps_is_served_as_fp32_tensor(api, demo_models):
    client, md = api
    x = np.array([[5.1, 3.5], [6.7, 3.0], [5.9, 3.0]], dtype=np.float32)
    got = outputs(client.Predict(predict_request("iris", {"float_input": x}), metadata=md, timeout=TIMEOUT))
    label, maps = reference(demo_models, "iris", 1, {"float_input": x})
    np.testing.assert_array_equal(got["label"], label)
    expected = np.array([[row[k] for k in sorted(row)] for row in maps], dtype=np.float32)
    np.testing.assert_allclose(got["probabilities"], expected, rtol=1e-6)
    assert got["probabilities"].shape == (3, 3)


def test_typed_contents_are_accepted_like_raw_bytes(api):
    client, md = api
    x = np.random.default_rng(4).random((1, 784), dtype=np.float32)
    typed = pb.Tensor(
        name="input", datatype=pb.DATA_TYPE_FP32, shape=[1, 784], contents=pb.TensorContents(fp32_contents=x.ravel())
    )
    by_contents = client.Predict(pb.PredictRequest(model_name="mlp", inputs=[typed]), metadata=md, timeout=TIMEOUT)
    by_raw = client.Predict(predict_request("mlp", {"input": x}), metadata=md, timeout=TIMEOUT)
    np.testing.assert_array_equal(outputs(by_contents)["output"], outputs(by_raw)["output"])


def test_unnamed_tensor_is_the_only_input(api):
    client, md = api
    x = np.random.default_rng(5).random((2, 784), dtype=np.float32)
    unnamed = client.Predict(predict_request("mlp", {"": x}), metadata=md, timeout=TIMEOUT)
    named = client.Predict(predict_request("mlp", {"input": x}), metadata=md, timeout=TIMEOUT)
    np.testing.assert_array_equal(outputs(unnamed)["output"], outputs(named)["output"])


def test_tutorial_simple_form_returns_flat_result(api, demo_models):
    client, md = api
    x = np.random.default_rng(6).random(784, dtype=np.float32)
    response = client.Predict(pb.PredictRequest(model_name="mlp", input_data=x), metadata=md, timeout=TIMEOUT)
    expected = reference(demo_models, "mlp", 2, {"input": x.reshape(1, 784)})[0]
    np.testing.assert_allclose(np.array(response.result, dtype=np.float32), expected.ravel(), rtol=1e-5)
    np.testing.assert_allclose(outputs(response)["output"], expected, rtol=1e-5)


def test_request_id_is_echoed_generated_or_refused_when_malformed(api):
    client, md = api
    request = predict_request("mlp", {"input": np.zeros((1, 784), np.float32)})
    _, call = client.Predict.with_call(request, metadata=(*md, ("x-request-id", "req-42")), timeout=TIMEOUT)
    assert trailer(call, "x-request-id") == "req-42"
    _, call = client.Predict.with_call(request, metadata=md, timeout=TIMEOUT)
    assert len(trailer(call, "x-request-id") or "") == 32
    refused = rpc_error(
        lambda: client.Predict(request, metadata=(*md, ("x-request-id", "bad id <x>")), timeout=TIMEOUT)
    )
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details().startswith("x-request-id header 'bad id <x>' is not made of letters, digits")
    assert len(trailer(refused, "x-request-id") or "") == 32  # the call's own id, to find its record by


@pytest.mark.parametrize(
    ("model", "version", "code"),
    [
        ("nope", "", grpc.StatusCode.NOT_FOUND),
        ("mlp", "9", grpc.StatusCode.NOT_FOUND),
        ("mlp", "abc", grpc.StatusCode.NOT_FOUND),
        ("mlp", "02", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_unknown_model_or_version_is_not_found(api, model, version, code):
    client, md = api
    request = predict_request(model, {"input": np.zeros((1, 784), np.float32)}, version=version)
    exc = rpc_error(lambda: client.Predict(request, metadata=md, timeout=TIMEOUT))
    assert exc.code() == code


def _raw(name, datatype, shape, data: bytes) -> pb.Tensor:
    return pb.Tensor(name=name, datatype=datatype, shape=shape, raw_data=data)


FP32 = pb.DATA_TYPE_FP32
ZEROS = np.zeros((1, 784), np.float32)


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (predict_request("mlp", {"bogus": ZEROS}), "unknown input 'bogus'"),
        (pb.PredictRequest(model_name="mlp"), "missing input 'input'"),
        (predict_request("mlp", {"input": ZEROS.astype(np.float64)}), "datatype FP64, model expects FP32"),
        (predict_request("mlp", {"input": np.zeros(784, np.float32)}), "rank 1"),
        (predict_request("mlp", {"input": np.zeros((1, 783), np.float32)}), "model expects [-1, 784]"),
        (pb.PredictRequest(model_name="mlp", inputs=[_raw("input", FP32, [1, 784], b"\0" * 100)]), "raw_data has 100"),
        (pb.PredictRequest(model_name="mlp", inputs=[_raw("input", FP32, [-1, 784], b"")]), "negative dimension"),
        (
            pb.PredictRequest(model_name="mlp", inputs=[_raw("input", FP32, [2**62, 2**62, 784], b"\0")]),
            "more than",
        ),
        (
            pb.PredictRequest(model_name="mlp", inputs=[_raw("input", FP32, [0, 2**62, 2**62], b"")]),
            "more than",
        ),
        (pb.PredictRequest(model_name="mlp", inputs=[_raw("input", FP32, [1] * 65, b"")]), "rank 65 is over"),
        (predict_request("mlp", {"x" * 5000: ZEROS}), "input name is 5000 characters long, over the limit of 128"),
        (predict_request("mlp", {"inp\n": ZEROS}), "input name 'inp\\n' is not made of letters"),
        (predict_request("mlp", {"input": ZEROS}, version="\u00b2"), "model_version '\\xb2' is not made of"),
        (pb.PredictRequest(model_name="mlp", inputs=[_raw("input", 0, [1, 784], b"")]), "unspecified datatype"),
        (
            pb.PredictRequest(model_name="mlp", inputs=[predict_request("m", {"input": ZEROS}).inputs[0]] * 2),
            "appears twice",
        ),
        (
            pb.PredictRequest(
                model_name="mlp", input_data=[0.0] * 784, inputs=[predict_request("m", {"input": ZEROS}).inputs[0]]
            ),
            "not both",
        ),
        (pb.PredictRequest(model_name="mlp", input_data=[0.0] * 700), "do not fill"),
        (pb.PredictRequest(model_name="", input_data=[0.0]), "model_name is required"),
    ],
    ids=[
        "unknown-input",
        "missing-input",
        "wrong-datatype",
        "wrong-rank",
        "wrong-fixed-dim",
        "raw-length",
        "negative-dim",
        "element-overflow",
        "huge-dims-beside-a-zero",
        "rank-over-the-limit",
        "input-name-over-the-limit",
        "input-name-with-a-final-newline",
        "version-not-ascii",  # "²".isdigit() is true, yet it is no version
        "no-datatype",
        "duplicate-input",
        "both-forms",
        "flat-does-not-fill",
        "no-model",
    ],
)
def test_malformed_input_is_invalid_argument(api, request_, fragment):
    client, md = api
    exc = rpc_error(lambda: client.Predict(request_, metadata=md, timeout=TIMEOUT))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in exc.details()


@pytest.mark.parametrize(
    ("contents", "fragment"),
    [
        (
            {"raw_data": ZEROS.tobytes(), "contents": pb.TensorContents(fp32_contents=ZEROS.ravel())},
            "both raw_data and contents.fp32_contents are set",
        ),
        (
            {"contents": pb.TensorContents(int64_contents=[0] * 784)},
            "values in contents.int64_contents, but FP32 values go in contents.fp32_contents",
        ),
        (
            {"contents": pb.TensorContents(fp32_contents=ZEROS.ravel(), fp64_contents=ZEROS.ravel())},
            "values in contents.fp32_contents and contents.fp64_contents",
        ),
    ],
    ids=["raw-and-typed", "wrong-typed-field", "two-typed-fields"],
)
def test_ambiguous_tensor_contents_are_invalid_argument_and_audited(gw, contents, fragment):
    request = pb.PredictRequest(
        model_name="mlp", inputs=[pb.Tensor(name="input", datatype=FP32, shape=[1, 784], **contents)]
    )
    with gw.channel() as channel:
        exc = rpc_error(lambda: stub(channel).Predict(request, metadata=auth(gw.token()), timeout=TIMEOUT))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in exc.details()
    record = gw.audit_records()[-1]
    assert record["code"] == "INVALID_ARGUMENT" and fragment in record["reason"]


def test_element_count_over_the_configured_limit_is_invalid_argument(start_gateway):
    gw = start_gateway(overrides={"models.max_elements": 500})
    with gw.channel() as channel:
        exc = rpc_error(
            lambda: stub(channel).Predict(
                predict_request("mlp", {"input": ZEROS}), metadata=auth(gw.token()), timeout=TIMEOUT
            )
        )
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 500 elements" in exc.details()


def test_undecodable_message_is_invalid_argument_and_audited(gw):
    with gw.channel() as channel:
        raw_predict = channel.unary_unary("/gateway.v1.InferenceService/Predict")
        exc = rpc_error(lambda: raw_predict(b"\xff\xff\xff\xff", metadata=auth(gw.token()), timeout=TIMEOUT))
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    record = gw.audit_records()[-1]
    assert record["code"] == "INVALID_ARGUMENT" and record["bytes_in"] == 4


def test_message_over_the_size_limit_is_resource_exhausted(start_gateway):
    gw = start_gateway(overrides={"limits.max_message_bytes": 100_000})
    with gw.channel() as channel:
        big = np.zeros((40, 784), np.float32)  # 125 KB
        exc = rpc_error(
            lambda: stub(channel).Predict(
                predict_request("mlp", {"input": big}), metadata=auth(gw.token()), timeout=TIMEOUT
            )
        )
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    record = gw.audit_records()[-1]
    assert record["code"] == "RESOURCE_EXHAUSTED" and record["reason"] == "message too large"


def test_predict_stream_answers_every_message_in_order(api, demo_models):
    client, md = api
    rng = np.random.default_rng(7)
    inputs = [rng.random((1, 784), dtype=np.float32) for _ in range(200)]

    def requests():
        for index, x in enumerate(inputs):
            if index == 50:  # a bad message in the middle: in-band error, the stream goes on
                yield pb.PredictRequest(
                    model_name="mlp", id="bad", inputs=[tensor("input", np.zeros((1, 3), np.float32))]
                )
            yield pb.PredictRequest(model_name="mlp", id=str(index), inputs=[tensor("input", x)])

    replies = list(client.PredictStream(requests(), metadata=md, timeout=30))
    assert [r.id for r in replies] == [*map(str, range(50)), "bad", *map(str, range(50, 200))]
    bad = replies[50]
    assert bad.WhichOneof("outcome") == "error"
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    good = [r for r in replies if r.id != "bad"]
    expected = reference(demo_models, "mlp", 2, {"input": np.concatenate(inputs)})[0]
    got = np.concatenate([outputs(r.response)["output"] for r in good])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_list_models_shows_versions_and_defaults(api):
    client, md = api
    response = client.ListModels(pb.ListModelsRequest(), metadata=md, timeout=TIMEOUT)
    listed = {m.name: (list(m.versions), m.default_version) for m in response.models}
    assert listed == {"digits": (["1"], "1"), "iris": (["1"], "1"), "labels": (["1"], "1"), "mlp": (["1", "2"], "2")}


def test_metadata_reports_signature_with_dynamic_dims(api):
    client, md = api
    meta = client.GetModelMetadata(pb.GetModelMetadataRequest(model_name="mlp"), metadata=md, timeout=TIMEOUT)
    assert (meta.name, meta.version, list(meta.versions)) == ("mlp", "2", ["1", "2"])
    assert [(s.name, s.datatype, list(s.shape)) for s in meta.inputs] == [("input", pb.DATA_TYPE_FP32, [-1, 784])]
    assert [(s.name, s.datatype, list(s.shape)) for s in meta.outputs] == [("output", pb.DATA_TYPE_FP32, [-1, 10])]
    v1 = client.GetModelMetadata(
        pb.GetModelMetadataRequest(model_name="mlp", model_version="1"), metadata=md, timeout=TIMEOUT
    )
    assert v1.version == "1"
