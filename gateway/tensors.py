"""Protobuf tensors <-> numpy arrays, through one datatype table shared by every protocol the gateway serves.

Raw bytes are decoded with ``numpy.frombuffer`` (no copy beyond the one protobuf makes when the field is
read); every size is checked before any buffer is touched, so a hostile shape cannot make us allocate.
BYTES tensors (ONNX string tensors) travel, raw, as each element's 4-byte little-endian length then its bytes (the
Open Inference Protocol's form); the gateway holds them as numpy object arrays of ``str``, which is what ONNX Runtime
takes and gives (it would turn a ``bytes`` element into the text "b'...'"), so every element must be UTF-8.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

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
T = TypeVar("T")
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


class WireTensor(NamedTuple):
    """One input as the wire gave it, nothing decoded: its name, datatype, shape, and its values either raw
    (``raw``) or typed (``values``, the one typed-contents field of its datatype). ``raw_field`` and
    ``values_field`` name them as the caller's protocol does, for messages."""

    name: str
    row: DataType
    shape: tuple[int, ...]
    raw: bytes | None
    values: Sequence[Any] | None
    raw_field: str = "raw_data"
    values_field: str = ""

    @property
    def datatype(self) -> str:
        """The datatype's API name ("FP32", "BYTES"...)."""
        return self.row.name


def wire_tensor(
    name: str, row: DataType, shape: Sequence[int], *, raw: bytes | None, contents: Any, raw_field: str
) -> WireTensor:
    """A tensor's values from the raw field (``raw`` not None) or from any protocol's typed-contents message,
    refusing values in more than one place; nothing is decoded."""
    if len(shape) > MAX_RANK:  # before the shape is copied: a packed shape may hold millions of dims
        raise InvalidArgumentError(f"input '{shown(name)}': rank {len(shape)} is over the limit of {MAX_RANK}")
    _refuse_ambiguous_contents(shown(name), row, raw=raw, contents=contents, raw_field=raw_field)
    values = None if raw is not None else getattr(contents, row.contents_field)
    return WireTensor(
        name, row, tuple(shape), raw, values, raw_field=raw_field, values_field=f"contents.{row.contents_field}"
    )


def check(tensor: WireTensor, *, max_elements: int, max_bytes_elements: int) -> int:
    """The tensor's element count, once its shape, limits and the length of its values agree: every check that
    needs no look at the values themselves, so a decode never starts on a request it would refuse for its size.

    BYTES tensors have their own, lower limit (each element becomes a Python object), and their raw form must
    hold at least a 4-byte length prefix per element.
    """
    name, row, shape = shown(tensor.name), tensor.row, tensor.shape
    limit = min(max_elements, max_bytes_elements) if row is BYTES else max_elements
    count = element_count(shape, name=name, max_elements=limit)
    if tensor.raw is not None:
        size = len(tensor.raw)
        needed = count * (_LENGTH_PREFIX if row is BYTES else row.dtype.itemsize)
        if row is not BYTES and size != needed:
            raise InvalidArgumentError(
                f"input '{name}': {tensor.raw_field} has {size} bytes, shape {list(shape)} of {row.name} needs {needed}"
            )
        if size < needed:
            raise InvalidArgumentError(
                f"input '{name}': {tensor.raw_field} has {size} bytes, too few for the {count} elements of shape "
                f"{list(shape)} (each takes a {_LENGTH_PREFIX}-byte length prefix)"
            )
        return count
    values = tensor.values if tensor.values is not None else ()
    if len(values) != count:
        raise InvalidArgumentError(
            f"input '{name}': {len(values)} values in {tensor.values_field}, shape {list(shape)} needs {count}"
        )
    return count


Steps = Generator[None, None, np.ndarray]


def decode_steps(tensor: WireTensor) -> Steps:
    """Decode a tensor that ``check`` passed, a slice at a time: each step (``next``) does at most about a
    millisecond of work, and the generator's return value is the array of its datatype and shape. The event loop
    serves other calls between steps (gateway.pipeline); a small tensor takes one step."""
    name, row, shape = shown(tensor.name), tensor.row, tensor.shape
    count = math.prod(shape)  # bounded by check(): no overflow to guard against
    if row is BYTES:
        if tensor.raw is not None:
            texts = yield from _split_texts(tensor.raw, count, name, tensor.raw_field)
        else:
            texts = yield from _texts(tensor.values or (), name)
        return texts.reshape(shape)
    if tensor.raw is not None:
        array = np.frombuffer(tensor.raw, dtype=row.dtype)  # a view: no work whatever the size
        if row.dtype == np.bool_:
            as_bytes = array.view(np.uint8)
            for start in range(0, count, _BOOL_SLICE):
                if as_bytes[start : start + _BOOL_SLICE].max() > 1:
                    raise InvalidArgumentError(f"input '{name}': BOOL bytes must be 0 or 1")
                if start + _BOOL_SLICE < count:
                    yield
        return array.reshape(shape)
    typed = yield from _typed(tensor.values or (), row, count, name)
    return typed.reshape(shape)


def decode_checked(tensor: WireTensor) -> np.ndarray:
    """The values of a tensor that ``check`` passed, decoded in one go (every step of ``decode_steps``)."""
    return run_steps(decode_steps(tensor))


async def in_steps(steps: Generator[None, None, T]) -> tuple[T, int]:
    """Run ``steps`` to its end on the event loop, serving others between two steps (issue 27): what it returns,
    and how many pauses it took."""
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value, pauses
        pauses += 1
        await asyncio.sleep(0)


def run_steps(steps: Generator[None, None, T]) -> T:
    """Every step of ``steps`` at once, and what it returns (where no event loop needs serving meanwhile)."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def wire_of(tensor: pb.Tensor) -> WireTensor:
    """A gateway.v1 tensor as it came, nothing read from its values yet."""
    row = BY_ENUM.get(tensor.datatype)
    if row is None:
        raise InvalidArgumentError(f"input '{shown(tensor.name)}': unknown or unspecified datatype {tensor.datatype}")
    raw = tensor.raw_data or None
    return wire_tensor(tensor.name, row, tensor.shape, raw=raw, contents=tensor.contents, raw_field="raw_data")


def decode(tensor: pb.Tensor, *, max_elements: int) -> np.ndarray:
    """A gateway.v1 tensor as a numpy array of its declared datatype and shape."""
    wire = wire_of(tensor)
    check(wire, max_elements=max_elements, max_bytes_elements=max_elements)
    return decode_checked(wire)


# Elements per step, each about a millisecond on the test machine (2 cores, loaded): typed values become Python
# objects on their way through protobuf; texts are split and decoded one by one; BOOL bytes are one numpy max.
_TYPED_SLICE = 16_384
_TEXT_SLICE = 2_048
_BOOL_SLICE = 4 * 1024 * 1024


def _typed(values: Sequence[Any], row: DataType, count: int, name: str) -> Steps:
    """Typed contents (a protobuf repeated field) as an array, converted a slice per step."""
    array = np.empty(count, dtype=row.dtype)
    for start in range(0, count, _TYPED_SLICE):
        try:
            # The wire types are wider than INT8/INT16/UINT8/UINT16; numpy >= 2 refuses values that would wrap.
            # FP32 values past FP16's range would become infinities: refused too, rather than served as something
            # else.
            with np.errstate(over="raise"):
                array[start : start + _TYPED_SLICE] = np.asarray(values[start : start + _TYPED_SLICE], dtype=row.dtype)
        except (OverflowError, FloatingPointError):
            raise InvalidArgumentError(f"input '{name}': a value does not fit in {row.name}") from None
        if start + _TYPED_SLICE < count:
            yield
    return array


_PREFIX = struct.Struct("<I")


def _split_texts(raw: bytes, count: int, name: str, raw_field: str) -> Steps:
    """The elements of a raw BYTES tensor (each a 4-byte little-endian length, then that many bytes) as text, a
    slice per step.

    ``check`` bounded ``count`` and made sure ``raw`` is long enough for its prefixes; this one pass stops at
    ``count`` elements whatever the prefixes say.
    """
    texts = np.empty(count, dtype=object)
    view, offset, end = memoryview(raw), 0, len(raw)
    unpack = _PREFIX.unpack_from
    for index in range(count):
        if index and not index % _TEXT_SLICE:
            yield
        if offset + _LENGTH_PREFIX > end:
            if offset == end:
                raise InvalidArgumentError(f"input '{name}': {raw_field} holds {index} elements, the shape {count}")
            raise InvalidArgumentError(f"input '{name}': {raw_field} ends inside an element's length prefix")
        (size,) = unpack(raw, offset)
        offset += _LENGTH_PREFIX
        if offset + size > end:
            raise InvalidArgumentError(f"input '{name}': element {index} runs past the end of {raw_field}")
        try:
            texts[index] = str(view[offset : offset + size], "utf-8")
        except UnicodeDecodeError:
            raise _not_text(name, index) from None
        offset += size
    if offset != end:
        raise InvalidArgumentError(f"input '{name}': {raw_field} holds more than the shape's {count} elements")
    return texts


def _texts(elements: Sequence[bytes], name: str) -> Steps:
    texts = np.empty(len(elements), dtype=object)
    for index, element in enumerate(elements):
        if index and not index % _TEXT_SLICE:
            yield
        try:
            texts[index] = element.decode("utf-8")
        except UnicodeDecodeError:
            raise _not_text(name, index) from None
    return texts


def _not_text(name: str, index: int) -> InvalidArgumentError:
    return InvalidArgumentError(f"input '{name}': element {index} is not UTF-8 text (ONNX string tensors hold text)")


def encode_steps(array: np.ndarray) -> Generator[None, None, tuple[DataType, bytes]]:
    """An array's datatype and raw little-endian bytes (BYTES: length-prefixed UTF-8 elements), a slice per step
    (``next``) as ``decode_steps`` does: numeric arrays take one step, texts one per 2,048 elements."""
    row = datatype_of(array)
    if row is not BYTES:
        return row, np.ascontiguousarray(array, dtype=row.dtype).tobytes()
    parts: list[bytes] = []
    for index, element in enumerate(np.asarray(array).ravel()):
        if index and not index % _TEXT_SLICE:
            yield
        if not isinstance(element, str | bytes):
            raise TypeError(f"a BYTES tensor holds str or bytes elements, not {type(element).__name__}")
        data = element.encode("utf-8") if isinstance(element, str) else element
        parts += (_PREFIX.pack(len(data)), data)
    return row, b"".join(parts)


def to_raw(array: np.ndarray) -> tuple[DataType, bytes]:
    """An array's datatype and raw little-endian bytes (BYTES: length-prefixed UTF-8 elements), in one go."""
    return run_steps(encode_steps(array))


def encode(name: str, array: np.ndarray) -> pb.Tensor:
    """A numpy array as a gateway.v1 tensor with little-endian raw bytes."""
    row, raw = to_raw(array)
    return pb.Tensor(name=name, datatype=row.enum, shape=array.shape, raw_data=raw)
