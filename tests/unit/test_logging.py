"""The operational log: the standard library's logging (grpcio, asyncio, other libraries) comes out as the same
structlog lines, with the call's request id and the same redaction."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from gateway import logging as oplog
from gateway.logging import configure

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


@pytest.fixture
def output():
    """The log stream; the process-wide logging is put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure(fmt="json", level="info", stream=stream)
    yield stream
    root.handlers, root.level = handlers, level
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_library_log_record_is_a_json_line_with_the_calls_request_id(output):
    token = oplog.request_id.set("abc123")  # as the call boundary sets it for the call's duration
    try:
        logging.getLogger("grpc._cython.cygrpc").warning("handshake failed: %s", "peer went away")
        structlog.get_logger("gateway.test").info("model_ran")
        structlog.get_logger("gateway.test").info("named", request_id="other")  # a line's own id wins
    finally:
        oplog.request_id.reset(token)
    structlog.get_logger("gateway.test").info("after_the_call")
    library, own, named, after = lines(output)
    assert library["event"] == "handshake failed: peer went away"
    assert library["level"] == "warning" and library["logger"] == "grpc._cython.cygrpc"
    assert library["request_id"] == own["request_id"] == "abc123"
    assert named["request_id"] == "other"
    assert "request_id" not in after
    assert "timestamp" in library


def test_a_library_log_record_is_redacted_like_the_gateways_own(output):
    logging.getLogger("somelib").warning("sent Authorization: Bearer %s", JWT)
    logging.getLogger("somelib").warning("retrying", extra={"token": JWT})  # extras are not rendered at all
    text = output.getvalue()
    assert JWT not in text and "[redacted-jwt]" in text


def test_a_library_exception_is_rendered_in_its_line(output):
    try:
        raise ValueError("bad frame")
    except ValueError:
        logging.getLogger("asyncio").exception("Exception in callback")
    (line,) = lines(output)
    assert line["level"] == "error" and "ValueError: bad frame" in line["exception"]


def test_the_log_level_applies_to_library_records(output):
    configure(fmt="json", level="warning", stream=output)
    logging.getLogger("grpc").info("chatty")
    logging.getLogger("grpc").warning("worth saying")
    assert [line["event"] for line in lines(output)] == ["worth saying"]


def test_a_workers_lines_carry_its_index_its_libraries_lines_too(output):
    configure(fmt="json", level="info", stream=output, worker=3)
    structlog.get_logger("gateway.test").info("model_ran")
    logging.getLogger("grpc._cython.cygrpc").warning("peer went away")
    assert [(line["event"], line["worker"]) for line in lines(output)] == [("model_ran", 3), ("peer went away", 3)]


def test_a_single_process_lines_carry_no_worker(output):
    structlog.get_logger("gateway.test").info("model_ran")
    assert "worker" not in lines(output)[0]


class _Writes:
    """A stream that keeps each write call apart, as an unbuffered stderr hands each to the kernel."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_every_line_is_one_write_so_workers_sharing_stderr_never_interleave(output):
    # print() writes the message and its newline apart: two workers' lines then ran into each other mid-line.
    stream = _Writes()
    configure(fmt="json", level="info", stream=stream, worker=1)  # the fixture puts the logging back afterwards
    structlog.get_logger("gateway.test").info("gateway_started", port=1)
    logging.getLogger("grpc.test").warning("a library line")
    assert len(stream.calls) == 2
    for call in stream.calls:
        assert call.endswith("\n") and call.count("\n") == 1
        assert json.loads(call)["worker"] == 1
