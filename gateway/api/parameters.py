"""The Open Inference Protocol's parameters the gateway accepts, with their meaning, for both bindings.

Stock clients send some on every request and offer no way to drop them: Triton's C++ client (perf_analyzer)
``triton_enable_empty_final_response``; tritonclient and the KServe SDK ``binary_data_size`` per input,
``binary_data`` per requested output and ``binary_data_output`` on the request. Those are accepted where their
meaning is served. Any other parameter, or an accepted one of the wrong type, is refused (INVALID_ARGUMENT naming
it): a parameter the gateway ignored could change what the caller believes it asked for (``classification``,
``shared_memory_region``, ``sequence_id``, ``priority``, ``timeout``...). Values arrive as plain Python values: each
binding turns its own form (protobuf ``InferParameter``, JSON) into them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import InvalidArgumentError
from gateway.identifiers import shown

Value = bool | int | float | str

# Triton's name: with it true, every stream response carries ``triton_final_response`` (the gateway answers each
# request with exactly one response, so each is final and no empty one is ever needed).
FINAL_RESPONSE_FLAG = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"
BINARY_OUTPUT = "binary_data_output"  # request: outputs not requested by name go as binary data (REST)
BINARY_SIZE = "binary_data_size"  # input: its values are this many bytes of the binary section (REST) or raw field
BINARY = "binary_data"  # requested output: as binary data (REST)
# input: KServe's and MLServer's codec hint. Only the one that means what the datatype already says is accepted:
# "str" on BYTES, "np" on any other datatype. Any other ("base64", "datetime", "pd"...) would make a backend that
# reads it (MLServer) decode the values otherwise than the gateway checked them.
CONTENT_TYPE = "content_type"


@dataclass(frozen=True, slots=True)
class RequestParameters:
    """What the request's parameters ask for."""

    final_response_flag: bool = False
    binary_output: bool = False


def request_parameters(parameters: Mapping[str, Value]) -> RequestParameters:
    """The request's parameters, each accepted one checked for its type; any other refused."""
    _refuse_unknown(parameters, "the request", (FINAL_RESPONSE_FLAG, BINARY_OUTPUT))
    return RequestParameters(
        final_response_flag=_bool(parameters, FINAL_RESPONSE_FLAG, "the request") is True,
        binary_output=_bool(parameters, BINARY_OUTPUT, "the request") is True,
    )


def input_binary_size(parameters: Mapping[str, Value], *, name: str, datatype: str) -> int | None:
    """An input's ``binary_data_size`` (None when absent); ``content_type`` is accepted only where it means what
    ``datatype`` says, any other parameter refused. ``name`` as messages may show it."""
    where = f"input '{name}'"
    _refuse_unknown(parameters, where, (BINARY_SIZE, CONTENT_TYPE))
    meant = "str" if datatype == "BYTES" else "np"
    if CONTENT_TYPE in parameters and parameters[CONTENT_TYPE] != meant:
        raise InvalidArgumentError(f"{where}: parameter '{CONTENT_TYPE}' may only be '{meant}' on a {datatype} input")
    size = parameters.get(BINARY_SIZE)
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidArgumentError(f"{where}: parameter '{BINARY_SIZE}' must be a non-negative integer")
    return size


def output_binary(parameters: Mapping[str, Value], *, name: str) -> bool | None:
    """A requested output's ``binary_data`` (None when absent); any other parameter refused."""
    where = f"output '{name}'"
    _refuse_unknown(parameters, where, (BINARY,))
    return _bool(parameters, BINARY, where)


def _bool(parameters: Mapping[str, Value], key: str, where: str) -> bool | None:
    value = parameters.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise InvalidArgumentError(f"{where}: parameter '{key}' must be a boolean")


def _refuse_unknown(parameters: Mapping[str, Value], where: str, allowed: tuple[str, ...]) -> None:
    unknown = sorted(key for key in parameters if key not in allowed)
    if unknown:
        raise InvalidArgumentError(f"{where}: parameter '{shown(unknown[0])}' is not supported by this gateway")
