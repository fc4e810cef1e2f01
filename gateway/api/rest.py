"""The Open Inference Protocol's REST binding (KServe v2 HTTP, with Triton's binary tensor extension): JSON and
binary tensors <-> one InferRequest and back. Imports no HTTP library: the transport is gateway/rest.py.

An inference body is a JSON document, optionally followed by a binary section (Triton's extension): the
``Inference-Header-Content-Length`` header gives the JSON's length, and each input with the parameter
``binary_data_size`` takes that many bytes of the section, in input order (raw little-endian values; BYTES as
4-byte length-prefixed elements, the gRPC raw form). Outputs go back as JSON ``data``, or in a binary section when
their ``binary_data`` parameter (or the request's ``binary_data_output``) says so. JSON ``data`` is row-major, flat
or nested; each element must be of its datatype's JSON type (a float for an INT32 input is refused, never
truncated).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import package_version, tensors
from gateway._pb.inference import grpc_service_pb2 as pb
from gateway.api import oip, parameters
from gateway.backends.route import RemoteModel
from gateway.context import NO_OUTCOME, Answered, Call
from gateway.errors import InvalidArgumentError
from gateway.identifiers import ID, shown
from gateway.models.runtime import TensorSpec
from gateway.pipeline import Bounds, InferBody, InferRequest, InferResult, Pipeline

_TYPE_NAME = pb.DataType.Name

# The JSON types each datatype's elements may have (bool is an int in Python: it is checked for on its own).
_INTEGERS = frozenset({int})
_NUMBERS = frozenset({int, float})
_JSON_TYPES = {
    **{row.name: _INTEGERS for row in tensors.ROWS if row.dtype.kind in "iu"},
    **{row.name: _NUMBERS for row in tensors.ROWS if row.dtype.kind == "f"},
    "BOOL": frozenset({bool}),
    "BYTES": frozenset({str}),
}
_MAX_NESTING = tensors.MAX_RANK
_REQUEST_FIELDS = ("id", "inputs", "outputs", "parameters", "model_name", "model_version")


@dataclass(frozen=True, slots=True)
class InferBodyParts:
    """An inference body split in its JSON document and its binary section (empty without one)."""

    document: Mapping[str, Any]
    binary: memoryview


def split_body(body: bytes, header_length: str | None) -> InferBodyParts:
    """The JSON document (the whole body, or its first ``Inference-Header-Content-Length`` bytes) and the rest."""
    view = memoryview(body)
    if header_length is None:
        size = len(body)
    else:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise InvalidArgumentError(
                f"Inference-Header-Content-Length must be a byte count within the body's {len(body)} bytes"
            )
        size = int(header_length)
    return InferBodyParts(document=parse_json(view[:size]), binary=view[size:])


def parse_json(data: bytes | memoryview) -> dict[str, Any]:
    """A JSON object, or INVALID_ARGUMENT saying where it stops being one."""
    try:
        document = json.loads(bytes(data))
    except UnicodeDecodeError:
        raise InvalidArgumentError("the request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidArgumentError("malformed JSON: nested too deeply") from None
    if not isinstance(document, dict):
        raise InvalidArgumentError("the request body must be a JSON object")
    return document


class JsonInferRequest:
    """An inference body as the pipeline reads it: the model and version come from the path, and the body is
    parsed (JSON, then the binary section) only by ``request.read``, for an authorized caller of a loaded model;
    ``parts`` is the parsed body once read (the answer's form depends on it)."""

    def __init__(self, model: str, version: str | None, body: bytes, header_length: str | None) -> None:
        self._body = body
        self._header_length = header_length
        self.parts: InferBodyParts | None = None
        self.request = InferRequest(model=model, version=version, read=self._read)

    @property
    def id(self) -> str | None:
        """The request's ``id``, once read and checked (echoed in the answer)."""
        request_id = self.parts.document.get("id") if self.parts is not None else None
        return request_id if isinstance(request_id, str) and request_id else None

    def _read(self, bounds: Bounds) -> InferBody:
        parts = self.parts = split_body(self._body, self._header_length)
        document = parts.document
        _refuse_unknown_keys(document, _REQUEST_FIELDS, "the request")
        # KServe's SDK repeats the path's model (and version) in the body: accepted when they agree with the path.
        for field, from_path in (("model_name", self.request.model), ("model_version", self.request.version)):
            if field in document and document[field] not in (from_path, *(("",) if from_path is None else ())):
                raise InvalidArgumentError(f"{field} in the body differs from the path's")
        request_id = document.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidArgumentError("id must be a string")
        if request_id:  # "" is no id, as on gRPC (perf_analyzer sends it)
            ID.check(request_id, "id")
        parameters.request_parameters(_parameters(document, "the request"))
        inputs_json = _list(document.get("inputs"), "inputs", required=True)
        inputs: dict[str, tensors.WireTensor] = {}
        offset = 0
        for item in inputs_json[: bounds.inputs + 1]:
            tensor, size = _input(item, parts.binary, offset)
            if tensor.name in inputs:
                raise InvalidArgumentError(f"input '{shown(tensor.name)}' appears twice")
            inputs[tensor.name] = tensor
            offset += size
        if offset != len(parts.binary):
            raise InvalidArgumentError(
                f"the binary section has {len(parts.binary)} bytes; the inputs' binary_data_size add up to {offset}"
            )
        requested = _requested_outputs(document, bounds)
        return InferBody(inputs=inputs, outputs=tuple(requested) or None)


def _input(item: Any, binary: memoryview, offset: int) -> tuple[tensors.WireTensor, int]:
    """One input as the wire gave it, and how many bytes of the binary section it took."""
    if not isinstance(item, dict):
        raise InvalidArgumentError("each input must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str):
        raise InvalidArgumentError("each input needs a name (a string)")
    shown_name = shown(name)
    where = f"input '{shown_name}'"
    _refuse_unknown_keys(item, ("name", "shape", "datatype", "parameters", "data"), where)
    datatype = item.get("datatype")
    row = tensors.BY_NAME.get(datatype) if isinstance(datatype, str) else None
    if row is None:
        raise InvalidArgumentError(
            f"{where}: unknown datatype {shown(str(datatype))!r} (one of {', '.join(tensors.BY_NAME)})"
        )
    shape = _list(item.get("shape"), f"{where}: shape", required=True)
    if len(shape) > tensors.MAX_RANK:
        raise InvalidArgumentError(f"{where}: rank {len(shape)} is over the limit of {tensors.MAX_RANK}")
    if not all(type(dim) is int for dim in shape):
        raise InvalidArgumentError(f"{where}: shape must be a list of integers")
    size = parameters.input_binary_size(_parameters(item, where), name=shown_name, datatype=row.name)
    if size is not None:
        if "data" in item:
            raise InvalidArgumentError(f"{where}: both binary_data_size and data are set; send the values once")
        if offset + size > len(binary):
            raise InvalidArgumentError(
                f"{where}: binary_data_size {size} runs past the end of the binary section ({len(binary)} bytes)"
            )
        raw = bytes(binary[offset : offset + size])
        return tensors.WireTensor(name, row, tuple(shape), raw, None, raw_field="its binary data"), size
    if "data" not in item:
        raise InvalidArgumentError(f"{where}: no data (send data, or binary_data_size and a binary section)")
    values = _flat_values(item["data"], row, where)
    return tensors.WireTensor(name, row, tuple(shape), None, values, values_field="data"), 0


def _flat_values(data: Any, row: tensors.DataType, where: str) -> list[Any]:
    """``data`` (flat or nested lists) as one flat list, every element of the datatype's JSON type."""
    if not isinstance(data, list):
        raise InvalidArgumentError(f"{where}: data must be a list")
    flat = data
    for _ in range(_MAX_NESTING):
        kinds = set(map(type, flat))  # one pass at C speed: nested lists are rare, wrong types rarer
        if list not in kinds:
            break
        if kinds != {list}:
            raise InvalidArgumentError(f"{where}: data mixes lists and values at one level")
        flat = [element for nested in flat for element in nested]
    else:
        raise InvalidArgumentError(f"{where}: data is nested more than {_MAX_NESTING} deep")
    allowed = _JSON_TYPES[row.name]
    wrong = kinds - allowed
    if wrong:
        shown_types = ", ".join(sorted(_json_type_name(kind) for kind in wrong))
        raise InvalidArgumentError(f"{where}: {row.name} data holds {shown_types} values")
    if row is tensors.BYTES:
        return [text.encode("utf-8") for text in flat]  # the typed-contents form tensors decodes
    return flat


def _json_type_name(kind: type) -> str:
    return {bool: "boolean", int: "integer", float: "floating-point", str: "string", dict: "object"}.get(
        kind, "null" if kind is type(None) else kind.__name__
    )


def _requested_outputs(document: Mapping[str, Any], bounds: Bounds) -> list[str]:
    requested: list[str] = []
    for item in _list(document.get("outputs"), "outputs", required=False)[: bounds.outputs + 1]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidArgumentError("each requested output must be a JSON object with a name")
        name = item["name"]
        _refuse_unknown_keys(item, ("name", "parameters"), f"output '{shown(name)}'")
        parameters.output_binary(_parameters(item, f"output '{shown(name)}'"), name=shown(name))
        requested.append(name)
    if len(set(requested)) != len(requested):
        raise InvalidArgumentError("an output is requested twice")
    return requested


def _parameters(item: Mapping[str, Any], where: str) -> dict[str, parameters.Value]:
    given = item.get("parameters", {})
    if not isinstance(given, dict) or not all(isinstance(value, bool | int | float | str) for value in given.values()):
        raise InvalidArgumentError(f"{where}: parameters must be an object of booleans, numbers and strings")
    return given


def _list(value: Any, what: str, *, required: bool) -> list[Any]:
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise InvalidArgumentError(f"{what} must be a list")
    return value


def _refuse_unknown_keys(item: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(key for key in item if key not in known)
    if unknown:
        raise InvalidArgumentError(f"{where}: unknown field '{shown(unknown[0])}'")


def binary_outputs(document: Mapping[str, Any], result: InferResult) -> set[str]:
    """The outputs that go in the binary section: each requested one whose ``binary_data`` is true, and, when the
    request names none, all of them if its ``binary_data_output`` is true."""
    requested = document.get("outputs") or []
    if not requested:
        binary = parameters.request_parameters(document.get("parameters") or {}).binary_output
        return set(result.outputs) if binary else set()
    return {item["name"] for item in requested if (item.get("parameters") or {}).get(parameters.BINARY) is True}


def encode_response(request_id: str | None, result: InferResult, binary: set[str]) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON part when a binary section follows (else None)."""
    outputs = []
    section: list[bytes] = []
    for name, array in result.outputs.items():
        row, raw = result.raw[name]
        output: dict[str, Any] = {"name": name, "datatype": row.name, "shape": list(array.shape)}
        if name in binary:
            output["parameters"] = {parameters.BINARY_SIZE: len(raw)}
            section.append(raw)
        else:
            output["data"] = array.ravel().tolist()
        outputs.append(output)
    answer: dict[str, Any] = {"model_name": result.model, "model_version": str(result.version)}
    if request_id:
        answer["id"] = request_id
    answer["outputs"] = outputs
    document = json.dumps(answer, separators=(",", ":")).encode()
    if not section:
        return document, None
    return b"".join((document, *section)), len(document)


def dumps(document: Any) -> str:
    """Compact JSON, as every answer is written."""
    return json.dumps(document, separators=(",", ":"))


def _tensor_metadata(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]


def config_json(config: pb.ModelConfig) -> dict[str, Any]:
    """Triton's model configuration as JSON (GET .../config): the fields the gRPC ModelConfig carries."""
    return {
        "name": config.name,
        "platform": config.platform,
        "backend": config.backend,
        "max_batch_size": config.max_batch_size,
        "input": [{"name": i.name, "data_type": _TYPE_NAME(i.data_type), "dims": list(i.dims)} for i in config.input],
        "output": [{"name": o.name, "data_type": _TYPE_NAME(o.data_type), "dims": list(o.dims)} for o in config.output],
        "parameters": {key: {"string_value": value.string_value} for key, value in config.parameters.items()},
    }


@dataclass(frozen=True, slots=True)
class Answer:
    """What an endpoint answers: the body, its type, and, for a body with a binary section, its JSON's length."""

    body: bytes
    content_type: str = "application/json"
    header_length: int | None = None


def _json(document: Any) -> Answer:
    return Answer(dumps(document).encode())


class RestEndpoints:
    """Adapter only, as the gRPC servicers: path names and bodies to pipeline calls, results to JSON (and binary
    sections). Every decision is the pipeline's; every error crosses the transport as an exception."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def server_metadata(self, call: Call, names: Mapping[str, str], request: RestRequest) -> Answered:
        """GET /v2: the gateway's name, version and the protocol extensions it serves."""
        document = {"name": oip.SERVER_NAME, "version": package_version(), "extensions": list(oip.EXTENSIONS)}
        return Answered(_json(document), NO_OUTCOME)

    async def model_metadata(self, call: Call, names: Mapping[str, str], request: RestRequest) -> Answered:
        """GET /v2/models/{model}[/versions/{version}]: the version's signature, the versions the caller may read."""
        model, versions, outcome = self._pipeline.metadata(call, names["model"], names.get("version"))
        document = {
            "name": model.name,
            "versions": [str(v) for v in versions],
            "platform": oip.PLATFORM,
            "inputs": _tensor_metadata(model.inputs),
            "outputs": _tensor_metadata(model.outputs),
        }
        return Answered(_json(document), outcome)

    async def model_ready(self, call: Call, names: Mapping[str, str], request: RestRequest) -> Answered:
        """GET .../ready: 200 when loaded; a model or version that is not is 404 (for a caller who may see it), a
        routed model whose backend is down 503."""
        model, outcome = self._pipeline.signature(call, names["model"], names.get("version"))
        return Answered(_json({"name": model.name, "ready": True}), outcome)

    async def model_config(self, call: Call, names: Mapping[str, str], request: RestRequest) -> Answered:
        """GET .../config (Triton): the model configuration, as far as the gateway knows it."""
        model, outcome = self._pipeline.signature(call, names["model"], names.get("version"))
        if isinstance(model, RemoteModel):  # a routed model's: its backend's, where the backend serves ModelConfig
            config, outcome = await self._pipeline.model_config(call, model, outcome)
        else:
            config = oip.to_model_config(model)
        return Answered(_json(config_json(config)), outcome)

    async def repository_index(self, call: Call, names: Mapping[str, str], request: RestRequest) -> Answered:
        """POST /v2/repository/index (Triton): each version the caller may list; every listed one is loaded."""
        if request.body.strip():
            options = parse_json(request.body)
            _refuse_unknown_keys(options, ("ready",), "the request")
        models, outcome = self._pipeline.list_models(call)
        index = [
            {"name": m.name, "version": str(v), "state": "READY"}
            for m in models
            for v in m.versions or ("",)  # a routed model whose backend names no version
        ]
        return Answered(_json(index), outcome)

    async def infer(self, call: Call, names: Mapping[str, str], request: RestRequest) -> Answered:
        """POST .../infer: one inference, JSON or binary tensors in and out."""
        infer = JsonInferRequest(names["model"], names.get("version"), request.body, request.header_length)
        result = await self._pipeline.predict(call, infer.request)
        assert infer.parts is not None  # noqa: S101 (read ran, or predict raised)
        body, header_length = encode_response(infer.id, result, binary_outputs(infer.parts.document, result))
        if header_length is None:
            return Answered(Answer(body), result.outcome)
        return Answered(Answer(body, "application/octet-stream", header_length), result.outcome)


@dataclass(frozen=True, slots=True)
class RestRequest:
    """What an endpoint reads of an HTTP request: its body (read, bounded, by the transport) and the binary
    extension's header."""

    body: bytes
    header_length: str | None = None
