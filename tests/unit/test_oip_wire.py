"""The gateway's Open Inference Protocol messages are wire-compatible with tritonclient's own.

Both sets of generated messages define ``inference.*`` and cannot share one protobuf descriptor pool, so each is
described in a subprocess of its own and the descriptions compared: every field the gateway declares has the
number, type and cardinality the stock client uses, and every method has its path and streaming shape.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

DESCRIBE = """
import json, sys
from google.protobuf.descriptor import FieldDescriptor
module = __import__(sys.argv[1], fromlist=["DESCRIPTOR"])
messages, methods = {}, {}

def walk(message):
    if message.GetOptions().map_entry:
        return
    messages[message.full_name] = {
        f.name: [f.number, f.type, f.is_repeated,
                 (f.message_type.full_name if f.message_type else f.enum_type.full_name if f.enum_type else None)]
        for f in message.fields
    }
    for nested in message.nested_types:
        walk(nested)

for modname in sys.argv[1:]:
    file = __import__(modname, fromlist=["DESCRIPTOR"]).DESCRIPTOR
    for message in file.message_types_by_name.values():
        walk(message)
    for enum in file.enum_types_by_name.values():
        messages[enum.full_name] = {v.name: [v.number] for v in enum.values}
    for service in file.services_by_name.values():
        for m in service.methods:
            methods[f"/{service.full_name}/{m.name}"] = [
                m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming
            ]
print(json.dumps({"messages": messages, "methods": methods}))
"""


def describe(*modules: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", DESCRIBE, *modules], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def both() -> tuple[dict, dict]:
    # A dev dependency, present wherever `make test` runs; only looked up here: importing it would load its
    # inference.* messages into this process, where the gateway's own must load.
    assert importlib.util.find_spec("tritonclient") is not None, "tritonclient is not installed: run `make setup`"
    ours = describe("gateway._pb.inference.grpc_service_pb2")
    theirs = describe("tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2")
    return ours, theirs


def test_every_declared_field_matches_the_stock_client(both):
    ours, theirs = both
    mismatched = {
        f"{message}.{field}": (spec, theirs["messages"].get(message, {}).get(field))
        for message, fields in ours["messages"].items()
        for field, spec in fields.items()
        if theirs["messages"].get(message, {}).get(field) != spec
    }
    assert mismatched == {}


def test_the_open_inference_protocol_messages_are_complete(both):
    ours, theirs = both
    complete = [
        "inference.ModelInferRequest",
        "inference.ModelInferRequest.InferInputTensor",
        "inference.ModelInferResponse",
        "inference.ModelInferResponse.InferOutputTensor",
        "inference.InferParameter",
        "inference.InferTensorContents",
        "inference.ModelMetadataResponse",
        "inference.ModelStreamInferResponse",
        "inference.RepositoryIndexResponse.ModelIndex",
        "inference.DataType",
    ]
    assert {m: sorted(ours["messages"][m]) for m in complete} == {m: sorted(theirs["messages"][m]) for m in complete}


def test_methods_have_the_paths_and_shapes_clients_call(both):
    ours, theirs = both
    assert len(ours["methods"]) == 9
    assert {path: theirs["methods"][path] for path in ours["methods"]} == ours["methods"]
    assert ours["methods"]["/inference.GRPCInferenceService/ModelStreamInfer"][2:] == [True, True]
