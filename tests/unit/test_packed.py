"""The simple form's flat values read as their wire bytes (gateway.api.packed): the same values as protobuf's own
reading of the field, whatever encoding the client's library chose."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway.api.packed import PackedFloats

INPUT_DATA = PackedFloats(pb.PredictRequest, "input_data")
FIELD = pb.PredictRequest.DESCRIPTOR.fields_by_name["input_data"].number


def _values(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f4")


def test_values_equal_protobufs_own_reading_bit_for_bit():
    x = np.random.default_rng(3).standard_normal(784).astype(np.float32)
    x[:4] = [np.nan, np.inf, -np.inf, -0.0]  # every bit pattern travels as sent
    request = pb.PredictRequest.FromString(
        pb.PredictRequest(model_name="mlp", input_data=x, id="m-1").SerializeToString()
    )
    raw = INPUT_DATA(request)
    assert raw == x.astype("<f4").tobytes()
    assert _values(raw).tobytes() == np.array(request.input_data, dtype="<f4").tobytes()


def _packed_record(values: list[float]) -> bytes:
    return struct.pack("<BB", (FIELD << 3) | 2, 4 * len(values)) + struct.pack(f"<{len(values)}f", *values)


def test_unpacked_and_split_encodings_read_as_one_array():
    # Parsers must accept a repeated float as separate fixed32 records and as several packed records: a client
    # library may send either. Both are read back as the one array protobuf parsed.
    values = [1.5, -2.0, 3.25, 4.0]
    unpacked = b"".join(struct.pack("<B", (FIELD << 3) | 5) + struct.pack("<f", v) for v in values)
    split = _packed_record(values[:1]) + _packed_record(values[1:])
    for wire in (unpacked, split, _packed_record(values[:2]) + unpacked[10:]):
        request = pb.PredictRequest.FromString(wire)
        assert list(request.input_data) == values
        assert _values(INPUT_DATA(request)).tolist() == values


def test_an_empty_field_reads_as_no_bytes():
    assert INPUT_DATA(pb.PredictRequest(model_name="mlp")) == b""


def test_only_a_repeated_float_field_can_be_read_so():
    with pytest.raises(ValueError, match="not a repeated float"):
        PackedFloats(pb.PredictRequest, "model_name")
    with pytest.raises(ValueError, match="not a repeated float"):
        PackedFloats(pb.Tensor, "shape")  # repeated, but varints: not 4 bytes each on the wire


def test_the_view_is_not_in_the_default_pool():
    from google.protobuf import descriptor_pool

    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("gateway.packed.View")
