"""Small helpers for end-to-end tests: raw stubs with explicit metadata, so tests control every header."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import grpc
import numpy as np

from gateway import tensors
from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc

TIMEOUT = 10.0


def stub(channel: grpc.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)


def auth(token: str | None, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    headers = (("authorization", f"Bearer {token}"),) if token else ()
    return headers + extra


def tensor(name: str, array: np.ndarray) -> pb.Tensor:
    return tensors.encode(name, array)


def predict_request(model: str, inputs: dict[str, np.ndarray], version: str = "") -> pb.PredictRequest:
    return pb.PredictRequest(model_name=model, model_version=version, inputs=[tensor(n, a) for n, a in inputs.items()])


def outputs(response: pb.PredictResponse) -> dict[str, np.ndarray]:
    return {t.name: tensors.decode(t, max_elements=2**40) for t in response.outputs}


def rpc_error(call: Any) -> grpc.RpcError:
    """The RpcError a call raises (fails the test if it succeeds)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded but should have been refused")


def trailer(exc_or_call: Any, key: str) -> str | None:
    for name, value in exc_or_call.trailing_metadata() or ():
        if name == key:
            return str(value)
    return None


# A hand-made HTTP/2 client, for headers that grpc's own clients refuse to send (a value ending in a newline) but
# that a hostile client can: one call per connection, HPACK literals without Huffman coding, which is all that
# grpc core sends in its replies.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x7
_END_STREAM, _END_HEADERS, _ACK = 0x1, 0x4, 0x1


def closed_by_server(s: socket.socket) -> bool:
    """Whether the peer closed (or reset) a plain socket: reads what is there without waiting."""
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _frame(kind: int, flags: int, payload: bytes, stream: int = 1) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header field as an HPACK literal without indexing, with a new name, no Huffman coding (RFC 7541 6.2.2)."""
    return b"\x00" + _hpack_length(name) + name + _hpack_length(value) + value


def _hpack_length(text: bytes) -> bytes:
    """A string length as an HPACK integer with a 7-bit prefix (RFC 7541 5.1)."""
    if len(text) < 127:
        return bytes([len(text)])
    out, rest = bytearray([127]), len(text) - 127
    while rest >= 128:
        out.append(rest % 128 | 0x80)
        rest //= 128
    return bytes([*out, rest])


def _hpack_int(data: bytes, i: int, bits: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 5.1) with a ``bits``-bit prefix at ``data[i]``, and the index after it."""
    mask = (1 << bits) - 1
    value, i = data[i] & mask, i + 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        byte, i = data[i], i + 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _hpack_fields(block: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    i = 0
    while i < len(block):
        first = block[i]
        if first & 0x80:  # indexed: grpc core sends ":status 200" (static entry 8) this way
            index, i = _hpack_int(block, i, 7)
            assert index == 8, f"unexpected indexed header field {index}"
            fields[":status"] = "200"
            continue
        if first & 0xE0 == 0x20:  # dynamic table size update
            _, i = _hpack_int(block, i, 5)
            continue
        index, i = _hpack_int(block, i, 6 if first & 0x40 else 4)
        assert index == 0, "literal with an indexed name"  # grpc names each field of a call anew
        strings = []
        for _ in range(2):
            assert not block[i] & 0x80, "Huffman-coded string"
            length, i = _hpack_int(block, i, 7)
            strings.append(block[i : i + length].decode("latin-1"))
            i += length
        fields[strings[0]] = strings[1]
    return fields


def raw_unary_call(
    gw: Any, method: str, message: bytes, headers: tuple[tuple[str, str], ...], client: str = "alice"
) -> dict[str, str]:
    """One unary call over mutual TLS on a hand-made HTTP/2 connection; the reply's header and trailer fields
    (``grpc-status`` among them), or what was sent before the server reset the stream."""
    context = ssl.create_default_context(cafile=str(gw.pki.path("ca.crt")))
    context.load_cert_chain(gw.pki.path(f"{client}.crt"), gw.pki.path(f"{client}.key"))
    context.set_alpn_protocols(["h2"])
    pseudo = ((":method", "POST"), (":scheme", "https"), (":path", method), (":authority", "localhost"))
    plain = (("content-type", "application/grpc"), ("te", "trailers"))
    block = b"".join(_hpack_literal(n.encode(), v.encode("latin-1")) for n, v in (*pseudo, *plain, *headers))
    with (
        socket.create_connection(("127.0.0.1", gw.port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(_PREFACE + _frame(_SETTINGS, 0, b"", stream=0))
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        tls.sendall(_frame(_HEADERS, _END_HEADERS, block) + _frame(_DATA, _END_STREAM, body))
        fields: dict[str, str] = {}
        buffered = b""
        while "grpc-status" not in fields:
            while len(buffered) < 9 or len(buffered) < 9 + int.from_bytes(buffered[:3], "big"):
                chunk = tls.recv(65536)
                if not chunk:
                    return fields
                buffered += chunk
            size = int.from_bytes(buffered[:3], "big")
            kind, flags, payload = buffered[3], buffered[4], buffered[9 : 9 + size]
            buffered = buffered[9 + size :]
            if kind == _SETTINGS and not flags & _ACK:
                tls.sendall(_frame(_SETTINGS, _ACK, b"", stream=0))
            elif kind == _HEADERS:
                fields.update(_hpack_fields(payload))
            elif kind in (_RST_STREAM, _GOAWAY):
                return fields
        return fields
