"""The REST binding's tensors: JSON data of every datatype and Triton's binary extension read into the wire form
the pipeline checks, each malformed body refused with a message naming what is wrong."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway import tensors
from gateway.api.rest import JsonInferRequest, split_body
from gateway.errors import InvalidArgumentError
from gateway.pipeline import Bounds

BOUNDS = Bounds(inputs=2, outputs=2)


def read(document: dict, binary: bytes = b""):
    body = json.dumps(document).encode()
    header = str(len(body)) if binary else None
    infer = JsonInferRequest("m", None, body + binary, header)
    return infer, infer.request.read(BOUNDS)


def decoded(document: dict, binary: bytes = b"") -> dict[str, np.ndarray]:
    _, body = read(document, binary)
    out = {}
    for name, wire in body.inputs.items():
        tensors.check(wire, max_elements=1 << 20, max_bytes_elements=1 << 20)
        out[name] = tensors.decode_checked(wire)
    return out


@pytest.mark.parametrize(
    ("datatype", "data", "dtype"),
    [
        ("BOOL", [True, False], np.bool_),
        ("UINT8", [0, 255], np.uint8),
        ("INT8", [-128, 127], np.int8),
        ("INT16", [-3, 3], np.int16),
        ("UINT32", [1, 2], np.uint32),
        ("INT64", [2**40, -1], np.int64),
        ("UINT64", [2**63, 1], np.uint64),
        ("FP16", [0.5, 1], np.float16),
        ("FP32", [1.5, -2], np.float32),
        ("FP64", [1e300, 0.25], np.float64),
        ("BYTES", ["bird", "Wörld"], object),
    ],
)
def test_json_data_of_every_datatype(datatype, data, dtype):
    (array,) = decoded({"inputs": [{"name": "x", "datatype": datatype, "shape": [2], "data": data}]}).values()
    expected = np.array(data, dtype=dtype)
    assert array.dtype == expected.dtype
    assert array.tolist() == expected.tolist()


def test_nested_data_is_row_major():
    document = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}
    assert decoded(document)["x"].tolist() == [[1, 2], [3, 4]]


def test_binary_inputs_take_their_bytes_of_the_section_in_order():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    words = [b"ab", b""]
    texts = b"".join(len(w).to_bytes(4, "little") + w for w in words)
    document = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": a.nbytes}},
            {"name": "t", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(texts)}},
        ]
    }
    out = decoded(document, a.tobytes() + texts)
    np.testing.assert_array_equal(out["a"], a)
    assert out["t"].tolist() == ["ab", ""]


@pytest.mark.parametrize(
    ("document", "binary", "message"),
    [
        ({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}, b"", "floating-point"),
        ({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [True]}]}, b"", "boolean"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["1"]}]}, b"", "string"),
        ({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]}, b"", "integer"),
        ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [None]}]}, b"", "null"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], 2]}]}, b"", "mixes lists"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}]}, b"", "unknown datatype"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": ["1"], "data": [1]}]}, b"", "list of integers"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, b"", "no data"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "extra": 1}]}, b"", "'extra'"),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": {"priority": 1}},
            b"",
            "'priority' is not supported",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 8}}]},
            b"\0" * 4,
            "runs past the end",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
            b"\0" * 8,
            "add up to 4",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"binary_data_size": 4}}
                ]
            },
            b"\0" * 4,
            "send the values once",
        ),
        ({"inputs": "x"}, b"", "inputs must be a list"),
        ({"id": 7, "inputs": []}, b"", "id must be a string"),
        ({"model_name": "other", "inputs": []}, b"", "model_name in the body differs from the path's"),
        ({"model_name": "m", "model_version": "3", "inputs": []}, b"", "model_version in the body differs"),
        (
            {"inputs": [], "outputs": [{"name": "y", "parameters": {"classification": 2}}]},
            b"",
            "parameter 'classification'",
        ),
    ],
)
def test_malformed_bodies_are_invalid_argument_naming_the_fault(document, binary, message):
    with pytest.raises(InvalidArgumentError, match=message):
        read(document, binary)


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b"{", None, "malformed JSON"),
        (b"[1]", None, "must be a JSON object"),
        (b"\xff", None, "not UTF-8"),
        (b"{}", "9", "within the body"),
        (b"{}", "-1", "byte count"),
        (b"{}", "\u00b2", "byte count"),
    ],
)
def test_a_body_that_is_no_json_object_is_refused(body, header, message):
    with pytest.raises(InvalidArgumentError, match=message):
        split_body(body, header)


def test_the_model_named_again_in_the_body_is_accepted_when_it_agrees_with_the_path():
    infer, body = read({"model_name": "m", "model_version": "", "id": "", "inputs": []})
    assert body.inputs == {} and infer.id is None  # "" is no id, as on gRPC (perf_analyzer sends it)


def test_nothing_is_parsed_before_the_pipeline_reads():
    infer = JsonInferRequest("m", "2", b"not json at all", None)
    assert (infer.request.model, infer.request.version, infer.parts) == ("m", "2", None)
