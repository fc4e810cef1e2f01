"""Protobuf tensors <-> numpy arrays, through one datatype table shared by every protocol the gateway serves.

Raw bytes are decoded with ``numpy.frombuffer`` (no copy beyond the one protobuf makes when the field is
read); every size is checked before any buffer is touched, so a hostile shape cannot make us allocate.
BYTES tensors (ONNX string tensors) travel, raw, as each element's 4-byte little-endian length then its bytes (the
Open Inference Protocol's form); the gateway holds them as numpy object arrays of ``str``, which is what ONNX Runtime
takes and gives (it would turn a ``bytes`` element into the text "b'...'"), so every element must be UTF-8.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


ROWS = (
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
    DataType("BYTES", pb.DATA_TYPE_BYTES, np.dtype(object), "bytes_contents", "tensor(string)"),
)
BY_NAME = {row.name: row for row in ROWS}
BY_ENUM = {row.enum: row for row in ROWS}
BY_ONNX = {row.onnx: row for row in ROWS}
BY_DTYPE = {row.dtype.newbyteorder("="): row for row in ROWS}
BYTES = BY_NAME["BYTES"]
_LENGTH_PREFIX = 4


def datatype_of(array: np.ndarray) -> DataType:
    """The table row for a numpy array's dtype (native or little-endian byte order; text arrays are BYTES)."""
    if array.dtype.kind in "OUS":
        return BYTES
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


def _refuse_ambiguous_contents(name: str, row: DataType, *, raw: bytes | None, contents: Any, raw_field: str) -> None:
    """Values in one place only: the raw field, or the one typed-contents field of the declared datatype.

    Reading one form and dropping another would run the model on values the caller may not have meant.
    """
    used = [f"contents.{field.name}" for field, _ in contents.ListFields()]
    if raw is not None and used:
        raise InvalidArgumentError(f"input '{name}': both {raw_field} and {used[0]} are set; send the values once")
    if len(used) > 1:
        raise InvalidArgumentError(f"input '{name}': values in {' and '.join(used)}; send them in one field")
    if used and used[0] != f"contents.{row.contents_field}":
        raise InvalidArgumentError(
            f"input '{name}': values in {used[0]}, but {row.name} values go in contents.{row.contents_field}"
        )


def decode(tensor: pb.Tensor, *, max_elements: int) -> np.ndarray:
    """A gateway.v1 tensor as a numpy array of its declared datatype and shape."""
    row = BY_ENUM.get(tensor.datatype)
    if row is None:
        raise InvalidArgumentError(f"input '{shown(tensor.name)}': unknown or unspecified datatype {tensor.datatype}")
    return decode_values(
        tensor.name,
        row,
        tuple(tensor.shape),
        raw=tensor.raw_data or None,
        contents=tensor.contents,
        raw_field="raw_data",
        max_elements=max_elements,
    )


def decode_values(
    tensor_name: str,
    row: DataType,
    shape: tuple[int, ...],
    *,
    raw: bytes | None,
    contents: Any,
    raw_field: str,
    max_elements: int,
) -> np.ndarray:
    """Values sent raw (``raw`` is not None) or typed (``contents``, any protocol's typed-contents message)."""
    name = shown(tensor_name)
    count = element_count(shape, name=name, max_elements=max_elements)
    _refuse_ambiguous_contents(name, row, raw=raw, contents=contents, raw_field=raw_field)
    if row is BYTES:
        elements = _split_elements(raw, count, name, raw_field) if raw is not None else contents.bytes_contents
        if len(elements) != count:
            raise InvalidArgumentError(
                f"input '{name}': {len(elements)} values in contents.bytes_contents, shape {list(shape)} needs {count}"
            )
        return _texts(elements, name).reshape(shape)
    if raw is not None:
        expected = count * row.dtype.itemsize
        if len(raw) != expected:
            raise InvalidArgumentError(
                f"input '{name}': {raw_field} has {len(raw)} bytes, shape {list(shape)} of {row.name} needs {expected}"
            )
        array = np.frombuffer(raw, dtype=row.dtype)
        if row.dtype == np.bool_ and count and array.view(np.uint8).max() > 1:
            raise InvalidArgumentError(f"input '{name}': BOOL bytes must be 0 or 1")
        return array.reshape(shape)
    values = getattr(contents, row.contents_field)
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


def _split_elements(raw: bytes, count: int, name: str, raw_field: str) -> list[bytes]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    elements: list[bytes] = []
    view, offset = memoryview(raw), 0
    while offset < len(raw):
        if len(elements) == count:
            raise InvalidArgumentError(f"input '{name}': {raw_field} holds more than the shape's {count} elements")
        if offset + _LENGTH_PREFIX > len(raw):
            raise InvalidArgumentError(f"input '{name}': {raw_field} ends inside an element's length prefix")
        size = int.from_bytes(view[offset : offset + _LENGTH_PREFIX], "little")
        offset += _LENGTH_PREFIX
        if offset + size > len(raw):
            raise InvalidArgumentError(f"input '{name}': element {len(elements)} runs past the end of {raw_field}")
        elements.append(bytes(view[offset : offset + size]))
        offset += size
    if len(elements) != count:
        raise InvalidArgumentError(f"input '{name}': {raw_field} holds {len(elements)} elements, the shape {count}")
    return elements


def _texts(elements: Sequence[bytes], name: str) -> np.ndarray:
    texts = np.empty(len(elements), dtype=object)
    for index, element in enumerate(elements):
        try:
            texts[index] = element.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgumentError(
                f"input '{name}': element {index} is not UTF-8 text (ONNX string tensors hold text)"
            ) from None
    return texts


def to_raw(array: np.ndarray) -> tuple[DataType, bytes]:
    """An array's datatype and raw little-endian bytes (BYTES: length-prefixed UTF-8 elements)."""
    row = datatype_of(array)
    if row is BYTES:
        parts: list[bytes] = []
        for element in np.asarray(array).ravel():
            if not isinstance(element, str | bytes):
                raise TypeError(f"a BYTES tensor holds str or bytes elements, not {type(element).__name__}")
            data = element.encode("utf-8") if isinstance(element, str) else element
            parts += (len(data).to_bytes(_LENGTH_PREFIX, "little"), data)
        return row, b"".join(parts)
    return row, np.ascontiguousarray(array, dtype=row.dtype).tobytes()


def encode(name: str, array: np.ndarray) -> pb.Tensor:
    """A numpy array as a gateway.v1 tensor with little-endian raw bytes."""
    row, raw = to_raw(array)
    return pb.Tensor(name=name, datatype=row.enum, shape=array.shape, raw_data=raw)


def encode_all(outputs: Mapping[str, np.ndarray]) -> list[pb.Tensor]:
    """Every output, in the model's output order."""
    return [encode(name, array) for name, array in outputs.items()]
