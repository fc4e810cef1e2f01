"""The client commands' JSON output without a server: strict RFC 8259 JSON whatever the model returns."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway.cli import _array_json


def _refuse(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_numbers_are_printed_as_strings(dtype) -> None:
    array = np.array([[np.nan, np.inf], [-np.inf, 1.5]], dtype=dtype)
    text = json.dumps(_array_json(array), allow_nan=False)
    printed = json.loads(text, parse_constant=_refuse)
    assert printed["data"] == [["NaN", "Infinity"], ["-Infinity", 1.5]]
    assert printed["shape"] == [2, 2]


def test_finite_and_integer_arrays_are_printed_as_numbers() -> None:
    assert _array_json(np.array([1, 2], np.int64))["data"] == [1, 2]
    assert _array_json(np.array([0.5], np.float32)) == {"datatype": "FP32", "shape": [1], "data": [0.5]}
