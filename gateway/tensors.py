"""Protobuf tensors <-> numpy arrays, through one datatype table.

Raw bytes are decoded with ``numpy.frombuffer`` (no copy beyond the one protobuf makes when the field is
read); every size is checked before any buffer is touched, so a hostile shape cannot make us allocate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway.errors import InvalidArgumentError
from gateway.identifiers import shown


@dataclass(frozen=True, slots=True)
class DataType:
    """One row of the datatype table: the API's name, its enum, numpy's dtype and the typed-contents field."""

    name: str
    enum: pb.DataType
    dtype: np.dtype
    contents_field: str
    onnx: str


_ROWS = (
    DataType("BOOL", pb.DATA_TYPE_BOOL, np.dtype(np.bool_), "bool_contents", "tensor(bool)"),
    DataType("UINT8", pb.DATA_TYPE_UINT8, np.dtype("<u1"), "uint_contents", "tensor(uint8)"),
    DataType("UINT16", pb.DATA_TYPE_UINT16, np.dtype("<u2"), "uint_contents", "tensor(uint16)"),
    DataType("UINT32", pb.DATA_TYPE_UINT32, np.dtype("<u4"), "uint_contents", "tensor(uint32)"),
    DataType("UINT64", pb.DATA_TYPE_UINT64, np.dtype("<u8"), "uint64_contents", "tensor(uint64)"),
    DataType("INT8", pb.DATA_TYPE_INT8, np.dtype("<i1"), "int_contents", "tensor(int8)"),
    DataType("INT16", pb.DATA_TYPE_INT16, np.dtype("<i2"), "int_contents", "tensor(int16)"),
    DataType("INT32", pb.DATA_TYPE_INT32, np.dtype("<i4"), "int_contents", "tensor(int32)"),
    DataType("INT64", pb.DATA_TYPE_INT64, np.dtype("<i8"), "int64_contents", "tensor(int64)"),
    DataType("FP16", pb.DATA_TYPE_FP16, np.dtype("<f2"), "fp32_contents", "tensor(float16)"),
    DataType("FP32", pb.DATA_TYPE_FP32, np.dtype("<f4"), "fp32_contents", "tensor(float)"),
    DataType("FP64", pb.DATA_TYPE_FP64, np.dtype("<f8"), "fp64_contents", "tensor(double)"),
)
BY_NAME = {row.name: row for row in _ROWS}
BY_ENUM = {row.enum: row for row in _ROWS}
BY_ONNX = {row.onnx: row for row in _ROWS}
BY_DTYPE = {row.dtype.newbyteorder("="): row for row in _ROWS}


def datatype_of(array: np.ndarray) -> DataType:
    """The table row for a numpy array's dtype (native or little-endian byte order)."""
    row = BY_DTYPE.get(array.dtype.newbyteorder("="))
    if row is None:
        raise InvalidArgumentError(f"unsupported dtype {array.dtype}")
    return row


MAX_RANK = 32  # numpy's own limit is 64; no served model comes near either


def element_count(shape: Sequence[int], *, name: str, max_elements: int) -> int:
    """Product of a shape's dims, refusing negative dims, a rank or a count over the limits before any overflow
    (``name`` as messages may show it: see ``identifiers.shown``).

    Every dim is also held to ``max_elements`` on its own: with a zero dim elsewhere the product stays 0 however
    large the others are, and numpy refuses such shapes (``[0, 2**62, 2**62]``) when reshaping.
    """
    if len(shape) > MAX_RANK:
        raise InvalidArgumentError(f"input '{name}': rank {len(shape)} is over the limit of {MAX_RANK}")
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgumentError(f"input '{name}': negative dimension {dim} in shape {list(shape)}")
        count *= dim
        if count > max_elements or dim > max_elements:
            raise InvalidArgumentError(
                f"input '{name}': shape {list(shape)} has more than {max_elements} elements (the limit)"
            )
    return count


def decode(tensor: pb.Tensor, *, max_elements: int) -> np.ndarray:
    """A protobuf tensor as a numpy array of its declared datatype and shape."""
    name = shown(tensor.name)
    row = BY_ENUM.get(tensor.datatype)
    if row is None:
        raise InvalidArgumentError(f"input '{name}': unknown or unspecified datatype {tensor.datatype}")
    shape = tuple(tensor.shape)
    count = element_count(shape, name=name, max_elements=max_elements)
    raw = tensor.raw_data
    if raw:
        expected = count * row.dtype.itemsize
        if len(raw) != expected:
            raise InvalidArgumentError(
                f"input '{name}': raw_data has {len(raw)} bytes, shape {list(shape)} of {row.name} needs {expected}"
            )
        array = np.frombuffer(raw, dtype=row.dtype)
        if row.dtype == np.bool_ and count and array.view(np.uint8).max() > 1:
            raise InvalidArgumentError(f"input '{name}': BOOL bytes must be 0 or 1")
        return array.reshape(shape)
    values = getattr(tensor.contents, row.contents_field)
    if len(values) != count:
        raise InvalidArgumentError(
            f"input '{name}': {len(values)} values in contents.{row.contents_field}, shape {list(shape)} needs {count}"
        )
    try:
        # The wire types are wider than INT8/INT16/UINT8/UINT16; numpy >= 2 refuses values that would wrap. FP32
        # values past FP16's range would become infinities: refused too, rather than served as something else.
        with np.errstate(over="raise"):
            array = np.asarray(values, dtype=row.dtype)
    except (OverflowError, FloatingPointError):
        raise InvalidArgumentError(f"input '{name}': a value does not fit in {row.name}") from None
    return array.reshape(shape)


def encode(name: str, array: np.ndarray) -> pb.Tensor:
    """A numpy array as a protobuf tensor with little-endian raw bytes."""
    row = datatype_of(array)
    data = np.ascontiguousarray(array, dtype=row.dtype)
    return pb.Tensor(name=name, datatype=row.enum, shape=data.shape, raw_data=data.tobytes())


def encode_all(outputs: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    """Every output, in the model's output order."""
    return [encode(name, array) for name, array in outputs.items()]
