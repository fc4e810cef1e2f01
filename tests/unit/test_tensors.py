"""Tensor decoding: every datatype both ways, sizes checked before any buffer is touched."""

from __future__ import annotations

import numpy as np
import pytest

from gateway import tensors
from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway.errors import InvalidArgumentError

NUMERIC = [name for name in tensors.BY_NAME if name != "BYTES"]


@pytest.mark.parametrize("name", NUMERIC)
def test_every_datatype_round_trips_through_raw_bytes(name):
    dtype = tensors.BY_NAME[name].dtype
    array = (np.arange(12) % 2).astype(dtype).reshape(3, 4)
    decoded = tensors.decode(tensors.encode("x", array), max_elements=100)
    assert decoded.dtype == dtype and decoded.shape == (3, 4)
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("name", NUMERIC)
def test_every_datatype_decodes_from_typed_contents(name):
    row = tensors.BY_NAME[name]
    values = [1, 0, 1, 1] if name == "BOOL" else [1, 2, 3, 4]
    tensor = pb.Tensor(name="x", datatype=row.enum, shape=[2, 2])
    getattr(tensor.contents, row.contents_field).extend(values)
    decoded = tensors.decode(tensor, max_elements=100)
    np.testing.assert_array_equal(decoded, np.array(values, dtype=row.dtype).reshape(2, 2))


def test_raw_bytes_are_decoded_without_a_copy():
    tensor = tensors.encode("x", np.ones((2, 2), np.float32))
    raw = tensor.raw_data
    decoded = tensors.decode(
        pb.Tensor(name="x", datatype=pb.DATA_TYPE_FP32, shape=[2, 2], raw_data=raw), max_elements=9
    )
    assert not decoded.flags.writeable  # a view over protobuf's bytes, not a copy


def test_raw_data_is_little_endian():
    tensor = tensors.encode("x", np.array([1], dtype=np.int32))
    assert tensor.raw_data == b"\x01\x00\x00\x00"
    big_endian = np.array([1], dtype=">i4")
    assert tensors.encode("x", big_endian).raw_data == b"\x01\x00\x00\x00"


def test_typed_values_that_do_not_fit_are_refused():
    tensor = pb.Tensor(name="x", datatype=pb.DATA_TYPE_INT8, shape=[1], contents=pb.TensorContents(int_contents=[300]))
    with pytest.raises(InvalidArgumentError, match="does not fit in INT8"):
        tensors.decode(tensor, max_elements=10)


def test_bool_bytes_other_than_zero_or_one_are_refused():
    tensor = pb.Tensor(name="x", datatype=pb.DATA_TYPE_BOOL, shape=[2], raw_data=b"\x01\x07")
    with pytest.raises(InvalidArgumentError, match="BOOL bytes"):
        tensors.decode(tensor, max_elements=10)


def test_huge_shapes_are_refused_before_multiplying_out():
    with pytest.raises(InvalidArgumentError, match="more than 1000 elements"):
        tensors.element_count([10**18, 10**18, 10**18], name="x", max_elements=1000)


def test_count_mismatch_in_typed_contents_is_refused():
    tensor = pb.Tensor(name="x", datatype=pb.DATA_TYPE_FP32, shape=[3], contents=pb.TensorContents(fp32_contents=[1]))
    with pytest.raises(InvalidArgumentError, match=r"1 values in contents\.fp32_contents, shape \[3\] needs 3"):
        tensors.decode(tensor, max_elements=10)


def test_fp32_contents_past_the_fp16_range_are_refused_not_turned_into_infinity():
    def fp16(values: list[float]) -> pb.Tensor:
        return pb.Tensor(
            name="x", datatype=pb.DATA_TYPE_FP16, shape=[len(values)], contents=pb.TensorContents(fp32_contents=values)
        )

    with pytest.raises(InvalidArgumentError, match="does not fit in FP16"):
        tensors.decode(fp16([1.0, 1e6]), max_elements=10)
    # An infinity the caller sent stays an infinity: only values that would change are refused.
    assert np.isinf(tensors.decode(fp16([float("inf"), 1.0]), max_elements=10)[0])


def test_a_zero_dimension_does_not_let_other_dimensions_past_the_limit():
    with pytest.raises(InvalidArgumentError, match="more than 1000 elements"):
        tensors.element_count([0, 2**62, 2**62], name="x", max_elements=1000)
    assert tensors.element_count([0, 1000], name="x", max_elements=1000) == 0


def _fp32(**fields) -> pb.Tensor:
    return pb.Tensor(name="x", datatype=pb.DATA_TYPE_FP32, shape=[2], **fields)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            _fp32(raw_data=np.ones(2, np.float32).tobytes(), contents=pb.TensorContents(fp32_contents=[5, 6])),
            "both raw_data and contents.fp32_contents are set",
        ),
        (
            _fp32(raw_data=np.ones(2, np.float32).tobytes(), contents=pb.TensorContents(int64_contents=[5, 6])),
            "both raw_data and contents.int64_contents are set",
        ),
        (
            _fp32(contents=pb.TensorContents(fp32_contents=[1, 2], int64_contents=[1, 2])),
            "values in contents.int64_contents and contents.fp32_contents; send them in one field",
        ),
        (
            _fp32(contents=pb.TensorContents(int64_contents=[1, 2])),
            "values in contents.int64_contents, but FP32 values go in contents.fp32_contents",
        ),
        (
            pb.Tensor(name="x", datatype=pb.DATA_TYPE_FP32, shape=[0], contents=pb.TensorContents(fp64_contents=[1])),
            "values in contents.fp64_contents, but FP32 values go in contents.fp32_contents",
        ),
        (
            pb.Tensor(name="x", datatype=pb.DATA_TYPE_INT64, shape=[1], contents=pb.TensorContents(int_contents=[1])),
            "values in contents.int_contents, but INT64 values go in contents.int64_contents",
        ),
    ],
    ids=[
        "raw-and-matching-field",
        "raw-and-other-field",
        "two-fields",
        "wrong-field",
        "wrong-field-empty-shape",
        "narrower-field",
    ],
)
def test_values_in_more_than_one_place_or_the_wrong_field_are_refused(tensor, message):
    with pytest.raises(InvalidArgumentError, match=message):
        tensors.decode(tensor, max_elements=10)


@pytest.mark.parametrize("name", list(tensors.BY_NAME))
def test_every_other_typed_field_is_refused_for_each_datatype(name):
    row = tensors.BY_NAME[name]
    for field in pb.TensorContents.DESCRIPTOR.fields:
        if field.name == row.contents_field:
            continue
        tensor = pb.Tensor(name="x", datatype=row.enum, shape=[1])
        value = {"bool_contents": True, "bytes_contents": b"x"}.get(field.name, 1)
        getattr(tensor.contents, field.name).append(value)
        with pytest.raises(InvalidArgumentError, match=f"values in contents.{field.name}, but {name} values go in"):
            tensors.decode(tensor, max_elements=10)


def test_an_empty_contents_message_beside_raw_data_is_not_ambiguous():
    tensor = _fp32(raw_data=np.ones(2, np.float32).tobytes(), contents=pb.TensorContents())
    np.testing.assert_array_equal(tensors.decode(tensor, max_elements=10), np.ones(2, np.float32))


TEXTS = np.array([["cat", ""], ["Wörld", "a\x00b"]], dtype=object)


def test_bytes_round_trip_through_length_prefixed_raw_data_as_text():
    tensor = tensors.encode("x", TEXTS)
    assert tensor.datatype == pb.DATA_TYPE_BYTES
    assert tensor.raw_data.startswith(b"\x03\x00\x00\x00cat\x00\x00\x00\x00\x06\x00\x00\x00W\xc3\xb6rld")
    decoded = tensors.decode(tensor, max_elements=100)
    assert decoded.dtype == object and decoded.shape == (2, 2)
    assert decoded.tolist() == TEXTS.tolist() and all(type(v) is str for v in decoded.ravel())


def test_bytes_from_typed_contents_and_from_numpy_text_arrays():
    tensor = pb.Tensor(name="x", datatype=pb.DATA_TYPE_BYTES, shape=[2])
    tensor.contents.bytes_contents.extend([b"dog", "\u00e9".encode()])
    assert tensors.decode(tensor, max_elements=10).tolist() == ["dog", "\u00e9"]
    assert tensors.decode(tensors.encode("x", np.array(["ab", "c"])), max_elements=10).tolist() == ["ab", "c"]
    assert tensors.decode(tensors.encode("x", np.array([b"ab"])), max_elements=10).tolist() == ["ab"]


def _raw_bytes_tensor(raw: bytes, shape: list[int]) -> pb.Tensor:
    return pb.Tensor(name="x", datatype=pb.DATA_TYPE_BYTES, shape=shape, raw_data=raw)


@pytest.mark.parametrize(
    ("raw", "shape", "message"),
    [
        (b"\x02\x00\x00\x00ab\x01\x00\x00\x00c", [1], "more than the shape's 1 elements"),
        (b"\x04\x00\x00\x00abcd", [2], "holds 1 elements, the shape 2"),
        (b"\x02\x00\x00\x00ab\x00\x00", [2], "ends inside an element's length prefix"),
        # Refused before any element is read: fewer bytes than the shape's length prefixes take.
        (b"\x02\x00\x00\x00ab", [2], r"has 6 bytes, too few for the 2 elements of shape \[2\]"),
        (b"\x02\x00\x00", [1], "has 3 bytes, too few for the 1 elements"),
        (b"\xff\xff\xff\xffab", [1], "element 0 runs past the end of raw_data"),
        (b"\x02\x00\x00\x00\xff\xfe", [1], "element 0 is not UTF-8 text"),
    ],
)
def test_malformed_raw_bytes_are_refused(raw, shape, message):
    with pytest.raises(InvalidArgumentError, match=message):
        tensors.decode(_raw_bytes_tensor(raw, shape), max_elements=10)


def test_typed_bytes_count_and_text_are_checked():
    tensor = pb.Tensor(name="x", datatype=pb.DATA_TYPE_BYTES, shape=[2])
    tensor.contents.bytes_contents.append(b"a")
    with pytest.raises(InvalidArgumentError, match=r"1 values in contents.bytes_contents, shape \[2\] needs 2"):
        tensors.decode(tensor, max_elements=10)
    tensor.contents.bytes_contents.append(b"\x80")
    with pytest.raises(InvalidArgumentError, match="element 1 is not UTF-8"):
        tensors.decode(tensor, max_elements=10)


def test_bytes_tensors_hold_only_text():
    with pytest.raises(TypeError, match="str or bytes elements, not int"):
        tensors.encode("x", np.array(["a", 1], dtype=object))


def _wire_bytes(shape: list[int], raw: bytes) -> tensors.WireTensor:
    return tensors.wire_tensor("x", tensors.BYTES, shape, raw=raw, contents=pb.TensorContents(), raw_field="raw_data")


def test_a_bytes_tensor_over_its_own_limit_is_refused_before_any_element_is_read():
    wire = _wire_bytes([2_000_000], b"\x01\x00\x00\x00a" * 2_000_000)
    with pytest.raises(InvalidArgumentError, match="more than 1048576 elements"):
        tensors.check(wire, max_elements=16 * 2**20, max_bytes_elements=2**20)
    assert tensors.check(wire, max_elements=16 * 2**20, max_bytes_elements=2_000_000) == 2_000_000


def test_an_element_count_the_raw_length_cannot_hold_is_refused_before_any_element_is_read():
    # A million elements claimed, 5 bytes sent: refused from the lengths alone, whatever the bytes hold.
    wire = _wire_bytes([1_000_000], b"\xff\xff\xff\xffa")
    with pytest.raises(InvalidArgumentError, match="has 5 bytes, too few for the 1000000 elements"):
        tensors.check(wire, max_elements=2**24, max_bytes_elements=2**24)


def _steps(wire: tensors.WireTensor) -> tuple[int, np.ndarray]:
    steps, pauses = tensors.decode_steps(wire), 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return pauses, done.value
        pauses += 1


def test_large_decodes_pause_between_slices_and_small_ones_do_not():
    texts = np.array([f"t{i}" for i in range(10_000)], dtype=object)
    wire = _wire_bytes([10_000], tensors.to_raw(texts)[1])
    pauses, decoded = _steps(wire)
    assert pauses == 4 and decoded.tolist() == texts.tolist()  # slices of 2,048 texts
    typed = pb.TensorContents(fp32_contents=np.arange(100_000, dtype=np.float32).tolist())
    wire = tensors.wire_tensor("x", tensors.BY_NAME["FP32"], [100_000], raw=None, contents=typed, raw_field="raw_data")
    pauses, decoded = _steps(wire)
    assert pauses == 6 and decoded.tolist() == list(range(100_000))  # slices of 16,384 values
    assert _steps(_wire_bytes([2], tensors.to_raw(np.array(["a", "b"]))[1]))[0] == 0
