"""The simple form's flat input_data: shaped by the model's signature, so checked by construction."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from gateway.errors import InvalidArgumentError
from gateway.models.schema import TensorSpec, flat_input
from gateway.pipeline import _flat_input

SPECS = (TensorSpec("input", "FP32", (-1, 4)),)


def model(max_elements: int = 1000) -> SimpleNamespace:
    return SimpleNamespace(max_elements=max_elements, flat_input=lambda size: flat_input(SPECS, size))


def test_the_values_take_the_signatures_name_and_shape() -> None:
    values = np.arange(8, dtype="<f4").tobytes()
    ((name, tensor),) = _flat_input(model(), values).items()
    assert (name, tensor.name, tensor.datatype, tensor.shape, tensor.raw) == (
        "input",
        "input_data",
        "FP32",
        (2, 4),
        values,
    )


@pytest.mark.parametrize(
    ("data", "max_elements", "message"),
    [
        (b"\0" * 17, 1000, "input_data has 17 bytes, not a whole number of FP32 values"),
        (b"\0" * 4 * 12, 8, "more than 8 elements"),
        (b"\0" * 4 * 6, 1000, "input_data has 6 values, which do not fill input 'input' [-1, 4]"),
    ],
    ids=["partial-value", "over-the-limit", "not-filling-the-shape"],
)
def test_values_that_cannot_take_the_shape_are_refused(data: bytes, max_elements: int, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        _flat_input(model(max_elements), data)
    assert message in str(refused.value)
