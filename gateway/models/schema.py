"""A model's inputs and outputs, and the checks of a request against them, for local and remote models alike:
refusals say what is wrong before any tensor is decoded or sent on."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

from gateway import tensors
from gateway.errors import InvalidArgumentError
from gateway.identifiers import shown


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, datatype (API name, e.g. "FP32") and shape (-1 for a dynamic dim) of one input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]


def name_inputs(specs: tuple[TensorSpec, ...], inputs: dict[str, tensors.WireTensor]) -> dict[str, tensors.WireTensor]:
    """An unnamed single tensor is the model's only input (so clients need no metadata round-trip)."""
    if len(inputs) == 1 and "" in inputs and len(specs) == 1:
        return {specs[0].name: inputs[""]}
    return inputs


def validate(specs: tuple[TensorSpec, ...], inputs: Mapping[str, tensors.WireTensor]) -> None:
    """Refuse inputs whose names, datatypes or shapes do not match ``specs``, before any is decoded, with a message
    safe to return to the caller."""
    by_name = {spec.name: spec for spec in specs}
    for name in inputs:
        if name not in by_name:
            raise InvalidArgumentError(f"unknown input '{shown(name)}' (model inputs: {', '.join(by_name)})")
    for spec in specs:
        tensor = inputs.get(spec.name)
        if tensor is None:
            raise InvalidArgumentError(f"missing input '{spec.name}'")
        if tensor.datatype != spec.datatype:
            raise InvalidArgumentError(
                f"input '{spec.name}': datatype {tensor.datatype}, model expects {spec.datatype}"
            )
        if len(tensor.shape) != len(spec.shape):
            raise InvalidArgumentError(
                f"input '{spec.name}': rank {len(tensor.shape)}, model expects shape {list(spec.shape)}"
            )
        for got, want in zip(tensor.shape, spec.shape, strict=True):
            if want != -1 and got != want:
                raise InvalidArgumentError(
                    f"input '{spec.name}': shape {list(tensor.shape)}, model expects {list(spec.shape)}"
                )


@functools.lru_cache(maxsize=1024)
def flat_input(specs: tuple[TensorSpec, ...], size: int) -> tuple[str, tuple[int, ...]]:
    """The name and shape that ``size`` simple-form flat FP32 values take in a one-input model, inferring its one
    dynamic dim. Remembered per signature and size (each call of a client asks the same); refusals are not."""
    if len(specs) != 1 or specs[0].datatype != "FP32":
        raise InvalidArgumentError("input_data is only for models with exactly one FP32 input")
    spec = specs[0]
    known = 1
    for dim in spec.shape:
        known *= dim if dim != -1 else 1
    dynamic = spec.shape.count(-1)
    if dynamic > 1:
        raise InvalidArgumentError(
            f"input '{spec.name}' has {dynamic} dynamic dimensions; send a typed tensor instead of input_data"
        )
    if known == 0 or size % known or (dynamic == 0 and size != known):
        raise InvalidArgumentError(
            f"input_data has {size} values, which do not fill input '{spec.name}' {list(spec.shape)}"
        )
    return spec.name, tuple(size // known if dim == -1 else dim for dim in spec.shape)


class InputChecks:
    """The checks above, for a model whose signature's inputs are ``self.inputs``: one set of methods for a local
    version (models.runtime) and a routed model (backends.route)."""

    __slots__ = ()
    inputs: tuple[TensorSpec, ...]

    def name_inputs(self, inputs: dict[str, tensors.WireTensor]) -> dict[str, tensors.WireTensor]:
        """An unnamed single tensor is the model's only input (``name_inputs``)."""
        return name_inputs(self.inputs, inputs)

    def validate(self, inputs: Mapping[str, tensors.WireTensor]) -> None:
        """Refuse inputs that do not match the signature, before any is decoded or sent on (``validate``)."""
        validate(self.inputs, inputs)

    def flat_input(self, size: int) -> tuple[str, tuple[int, ...]]:
        """The name and shape of ``size`` simple-form flat FP32 values (``flat_input``)."""
        return flat_input(self.inputs, size)
