"""The Open Inference Protocol parameters accepted with their meaning, and the refusal of every other one."""

from __future__ import annotations

import pytest

from gateway.api import parameters
from gateway.errors import InvalidArgumentError


def test_the_request_parameters_stock_clients_send_are_read():
    assert parameters.request_parameters({}) == parameters.RequestParameters(False, False)
    read = parameters.request_parameters({"triton_enable_empty_final_response": True, "binary_data_output": True})
    assert (read.final_response_flag, read.binary_output) == (True, True)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"priority": 1}, "the request: parameter 'priority' is not supported"),
        ({"sequence_id": 7}, "parameter 'sequence_id' is not supported"),
        ({"timeout": 100}, "parameter 'timeout' is not supported"),
        ({"triton_enable_empty_final_response": 0}, "must be a boolean"),
        ({"binary_data_output": "true"}, "must be a boolean"),
    ],
)
def test_request_parameters_that_would_change_the_answer_or_have_the_wrong_type_are_refused(given, message):
    with pytest.raises(InvalidArgumentError, match=message):
        parameters.request_parameters(given)


def test_input_binary_size_and_content_type():
    assert parameters.input_binary_size({}, name="x", datatype="BYTES") is None
    assert (
        parameters.input_binary_size({"binary_data_size": 16, "content_type": "str"}, name="x", datatype="BYTES") == 16
    )
    assert parameters.input_binary_size({"content_type": "np"}, name="x", datatype="FP32") is None
    for bad in (-1, True, "16", 1.5):
        with pytest.raises(InvalidArgumentError, match="non-negative integer"):
            parameters.input_binary_size({"binary_data_size": bad}, name="x", datatype="FP32")
    # A codec hint that would make a backend (MLServer) decode the values otherwise than the gateway checked them.
    for datatype, hint in (("BYTES", "base64"), ("BYTES", "np"), ("FP32", "str"), ("INT64", "datetime"), ("FP32", 3)):
        with pytest.raises(InvalidArgumentError, match="'content_type' may only be"):
            parameters.input_binary_size({"content_type": hint}, name="x", datatype=datatype)
    with pytest.raises(InvalidArgumentError, match="input 'x': parameter 'shared_memory_region'"):
        parameters.input_binary_size({"shared_memory_region": "r"}, name="x", datatype="FP32")


def test_output_binary_flag_and_refused_output_parameters():
    assert parameters.output_binary({}, name="y") is None
    assert parameters.output_binary({"binary_data": False}, name="y") is False
    with pytest.raises(InvalidArgumentError, match="output 'y': parameter 'classification'"):
        parameters.output_binary({"classification": 3, "binary_data": True}, name="y")
    with pytest.raises(InvalidArgumentError, match="must be a boolean"):
        parameters.output_binary({"binary_data": 1}, name="y")
