"""OpenTelemetry tracing over real mutual TLS: spans recorded by the SDK's in-memory exporter, W3C trace context
from the caller continued (or a new trace), the trace id in the audit record; and a gateway with tracing off that
runs, and serves, where opentelemetry cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, format_span_id, format_trace_id

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.inference import grpc_service_pb2 as oip_pb
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
from gateway.tracing import Tracing
from tests.conftest import wait_until, without_modules_env
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub
from tests.e2e.test_call_boundary import one_then_hold

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
X = np.zeros((1, 784), np.float32)
CALL_STEPS = {"gateway.authenticate", "gateway.authorize", "gateway.infer", "gateway.audit.commit"}


@pytest.fixture
def traced(start_gateway):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw = start_gateway(tracing=Tracing(provider))
    gw.extra["spans"] = exporter
    return gw


def spans_of(gw, request_id: str) -> list:
    """The spans of the call with ``request_id``: its call span and the spans under it."""
    spans = gw.extra["spans"].get_finished_spans()
    (call,) = [s for s in spans if s.attributes.get("gateway.request_id") == request_id]
    trace_id = call.context.trace_id
    return [s for s in spans if s.context.trace_id == trace_id]


def call_span(spans: list):
    (call,) = [s for s in spans if "gateway.request_id" in s.attributes]
    return call


def record_of(gw, request_id: str) -> dict:
    (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id]
    return record


def test_predict_continues_the_callers_trace_and_the_record_carries_it(traced):
    with traced.channel() as channel:
        stub(channel).Predict(
            predict_request("mlp", {"input": X}),
            metadata=auth(traced.token(), ("traceparent", TRACEPARENT), ("x-request-id", "traced-1")),
            timeout=TIMEOUT,
        )
    spans = spans_of(traced, "traced-1")
    assert {format_trace_id(s.context.trace_id) for s in spans} == {TRACE_ID}
    call = call_span(spans)
    assert call.name == "gateway.v1.InferenceService/Predict"
    assert format_span_id(call.parent.span_id) == PARENT_ID and call.parent.is_remote
    assert {s.name for s in spans if s is not call} == CALL_STEPS
    assert all(s.parent.span_id == call.context.span_id for s in spans if s is not call)
    assert call.attributes["rpc.grpc.status_code"] == 0
    infer = next(s for s in spans if s.name == "gateway.infer")
    assert infer.attributes["gateway.model"] == "mlp" and infer.attributes["gateway.version"] == 2
    authorize = next(s for s in spans if s.name == "gateway.authorize")
    assert authorize.attributes["gateway.decision"] == "allow" and authorize.attributes["gateway.rule"] == "alice-all"
    assert record_of(traced, "traced-1")["trace_id"] == TRACE_ID


def test_open_inference_protocol_calls_get_the_same_spans(traced):
    request = oip_pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=X.shape)
    request.raw_input_contents.append(X.tobytes())
    with traced.channel() as channel:
        oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request,
            metadata=auth(traced.token(), ("traceparent", TRACEPARENT), ("x-request-id", "traced-oip")),
            timeout=TIMEOUT,
        )
    spans = spans_of(traced, "traced-oip")
    assert {format_trace_id(s.context.trace_id) for s in spans} == {TRACE_ID}
    assert call_span(spans).name == "inference.GRPCInferenceService/ModelInfer"
    assert {s.name for s in spans} - {call_span(spans).name} == CALL_STEPS
    assert record_of(traced, "traced-oip")["trace_id"] == TRACE_ID


@pytest.mark.parametrize(
    "traceparent",
    [
        None,
        "garbage",
        f"00-{'0' * 32}-{PARENT_ID}-01",  # an all-zero trace id is invalid
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",  # upper case is not W3C
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # version ff is forbidden
        TRACEPARENT + "-" + "a" * 4000,  # version 00 has nothing after the flags
    ],
    ids=["absent", "garbage", "zero-trace-id", "upper-case", "version-ff", "long"],
)
def test_without_a_valid_traceparent_the_call_starts_a_new_trace(traced, traceparent):
    extra = (("traceparent", traceparent),) if traceparent else ()
    with traced.channel() as channel:
        stub(channel).Predict(
            predict_request("mlp", {"input": X}),
            metadata=auth(traced.token(), *extra, ("x-request-id", "new-trace")),
            timeout=TIMEOUT,
        )
    call = call_span(spans_of(traced, "new-trace"))
    assert call.parent is None
    trace_id = format_trace_id(call.context.trace_id)
    assert trace_id != TRACE_ID and trace_id != "0" * 32
    assert record_of(traced, "new-trace")["trace_id"] == trace_id


def test_a_refused_call_is_traced_as_an_error_and_its_record_carries_the_trace(traced):
    with traced.channel() as channel:
        error = rpc_error(
            lambda: stub(channel).Predict(
                predict_request("mlp", {"input": X}),
                metadata=(("traceparent", TRACEPARENT), ("x-request-id", "refused-1")),
                timeout=TIMEOUT,
            )
        )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    spans = spans_of(traced, "refused-1")
    call = call_span(spans)
    assert call.status.status_code == StatusCode.ERROR and call.status.description == "UNAUTHENTICATED"
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    (authenticate,) = [s for s in spans if s.name == "gateway.authenticate"]
    assert authenticate.status.status_code == StatusCode.ERROR
    assert "gateway.infer" not in {s.name for s in spans}
    record = record_of(traced, "refused-1")
    assert record["code"] == "UNAUTHENTICATED" and record["trace_id"] == TRACE_ID


def test_stream_messages_are_traced_under_the_stream_and_their_records_carry_the_trace(traced):
    requests = [pb.PredictRequest(model_name="mlp", inputs=predict_request("mlp", {"input": X}).inputs)] * 2
    with traced.channel() as channel:
        replies = list(
            stub(channel).PredictStream(
                iter(requests),
                metadata=auth(traced.token(), ("traceparent", TRACEPARENT), ("x-request-id", "stream-1")),
                timeout=TIMEOUT,
            )
        )
    assert len(replies) == 2
    spans = spans_of(traced, "stream-1")
    assert {format_trace_id(s.context.trace_id) for s in spans} == {TRACE_ID}
    infers = [s for s in spans if s.name == "gateway.infer"]
    assert sorted(s.attributes["gateway.message_index"] for s in infers) == [0, 1]
    records = [r for r in traced.audit_records() if r["request_id"] == "stream-1"]
    assert [r["event"] for r in records] == ["stream_message", "stream_message", "stream"]
    assert {r["trace_id"] for r in records} == {TRACE_ID}


def test_a_stream_the_client_cancels_ends_its_span_with_the_code_of_its_record(traced):
    release = threading.Event()
    request = pb.PredictRequest(model_name="mlp", inputs=predict_request("mlp", {"input": X}).inputs)
    with traced.channel() as channel:
        stream = stub(channel).PredictStream(
            one_then_hold(request, release),
            metadata=auth(traced.token(), ("traceparent", TRACEPARENT), ("x-request-id", "cancelled-1")),
            timeout=TIMEOUT,
        )
        assert next(stream).WhichOneof("outcome") == "response"
        stream.cancel()
        release.set()
        wait_until(
            lambda: any(r["event"] == "stream" for r in traced.audit_records() if r["request_id"] == "cancelled-1")
        )
    finished = traced.extra["spans"].get_finished_spans
    wait_until(lambda: any(s.attributes.get("gateway.request_id") == "cancelled-1" for s in finished()))
    (record,) = [r for r in traced.audit_records() if r["request_id"] == "cancelled-1" and r["event"] == "stream"]
    call = call_span(spans_of(traced, "cancelled-1"))
    # Almost always CANCELLED; OK when grpcio's second cancel event came too late (docs/audit.md): the span says
    # whatever the record says.
    assert (call.status.description or "OK") == record["code"] and record["trace_id"] == TRACE_ID


def test_span_attributes_carry_no_token_tensor_or_unchecked_caller_text(traced):
    token = traced.token()
    invented = "model\nwith a newline " + "x" * 200
    with traced.channel() as channel:
        stub(channel).Predict(
            predict_request("mlp", {"input": np.full((1, 784), 0.123, np.float32)}),
            metadata=auth(token, ("x-request-id", "checked-1")),
            timeout=TIMEOUT,
        )
        rpc_error(
            lambda: stub(channel).Predict(
                predict_request(invented, {"input": X}),
                metadata=auth(token, ("x-request-id", "bad-name")),
                timeout=TIMEOUT,
            )
        )
        unknown = channel.unary_unary("/evil.Service/" + "y" * 300)
        rpc_error(lambda: unknown(b"", metadata=auth(token, ("x-request-id", "unknown-1")), timeout=TIMEOUT))
    values = [str(value) for span in traced.extra["spans"].get_finished_spans() for value in span.attributes.values()]
    assert values and not [v for v in values if token in v or "0.123" in v or "model\n" in v or "yyy" in v]
    names = {s.name for s in spans_of(traced, "bad-name")}
    assert "gateway.authorize" not in names  # refused by the grammar check, before any span names the model
    assert call_span(spans_of(traced, "unknown-1")).name == "unknown/method"


def test_a_caller_that_asks_not_to_be_sampled_is_not_traced_but_its_record_carries_the_trace_id(traced):
    with traced.channel() as channel:
        stub(channel).Predict(
            predict_request("mlp", {"input": X}),
            metadata=auth(
                traced.token(), ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00"), ("x-request-id", "unsampled")
            ),
            timeout=TIMEOUT,
        )
    spans = traced.extra["spans"].get_finished_spans()
    assert not [s for s in spans if format_trace_id(s.context.trace_id) == TRACE_ID]
    assert record_of(traced, "unsampled")["trace_id"] == TRACE_ID


def test_a_call_whose_record_cannot_be_written_is_traced_unavailable(traced):
    audit = traced.gateway.audit
    saved = os.dup(audit._file.fd)
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, audit._file.fd)  # the trail's own descriptor now fails with ENOSPC, as on a full disk
        with traced.channel() as channel:
            error = rpc_error(
                lambda: stub(channel).Predict(
                    predict_request("mlp", {"input": X}),
                    metadata=auth(traced.token(), ("traceparent", TRACEPARENT), ("x-request-id", "sink-down")),
                    timeout=TIMEOUT,
                )
            )
    finally:
        os.dup2(saved, audit._file.fd)
        os.close(saved)
        os.close(full)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    spans = spans_of(traced, "sink-down")
    assert call_span(spans).status.description == "UNAVAILABLE"
    (commit,) = [s for s in spans if s.name == "gateway.audit.commit"]
    assert commit.status.status_code == StatusCode.ERROR and commit.status.description == "UNAVAILABLE"


class Collector(otlp_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[otlp.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return otlp.ExportTraceServiceResponse()


@pytest.fixture
def collector():
    receiver = Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    otlp_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver
    server.stop(0)


def test_spans_are_exported_over_otlp_where_the_otel_variables_say(start_gateway, collector, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    gw = start_gateway(overrides={"tracing.enabled": True})
    with gw.channel() as channel:
        stub(channel).Predict(
            predict_request("mlp", {"input": X}),
            metadata=auth(gw.token(), ("traceparent", TRACEPARENT), ("x-request-id", "exported")),
            timeout=TIMEOUT,
        )
    gw.gateway.stop(0.5)  # exports what the batch processor still holds
    exported = [
        (resource_spans.resource, span)
        for request in collector.requests
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    assert {span.name for _, span in exported} >= CALL_STEPS | {"gateway.v1.InferenceService/Predict"}
    assert {span.trace_id.hex() for _, span in exported} == {TRACE_ID}
    resource = {kv.key: kv.value.string_value for kv in exported[0][0].attributes}
    assert resource["service.name"] == "gateway" and resource["deployment.environment"] == "test"
    assert record_of(gw, "exported")["trace_id"] == TRACE_ID


def test_records_carry_a_null_trace_id_when_tracing_is_off(start_gateway):
    gw = start_gateway()
    with gw.channel() as channel:
        stub(channel).Predict(
            predict_request("mlp", {"input": X}),
            metadata=auth(gw.token(), ("traceparent", TRACEPARENT), ("x-request-id", "untraced")),
            timeout=TIMEOUT,
        )
    record = record_of(gw, "untraced")
    assert "trace_id" in record and record["trace_id"] is None


_SERVE = """
import json, sys
from pathlib import Path
from gateway.config import certs_dir_overrides, load_settings
from gateway.server import Gateway

out, sys.stdout = sys.stdout, sys.stderr  # the gateway's logs go to stdout: this script's answers are alone there


def answer(**fields):
    print(json.dumps(fields), file=out, flush=True)


certs, models, policies, audit = map(Path, sys.argv[1:5])
overrides = {
    **certs_dir_overrides(certs), "listen": "127.0.0.1:0", "models.repository": models,
    "policies.directory": policies, "audit.path": audit, "tracing.enabled": sys.argv[5] == "on",
}
try:
    gateway = Gateway(load_settings(None, overrides))
except Exception as exc:
    answer(error=str(exc))
    sys.exit(2)
answer(port=gateway.start())
sys.stdin.read()
gateway.stop(0.5)
answer(otel=sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""


def _serve_without_opentelemetry(pki, demo_models, tmp_path, tracing: str) -> subprocess.Popen:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "all.yaml").write_text(
        "rules:\n  - {id: alice-all, effect: allow, principals: {subjects: [alice]}, models: ['*'], actions: '*'}\n"
    )
    env = without_modules_env(tmp_path, ("opentelemetry",), "the otel extra is not installed")
    args = [pki.server_dir, demo_models, policies, tmp_path / "audit.log", tracing]
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SERVE), *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_tracing_off_serves_without_opentelemetry_installed(pki, demo_models, tmp_path, start_gateway):
    helper = start_gateway()  # for its token and channel helpers only, on the same PKI
    server = _serve_without_opentelemetry(pki, demo_models, tmp_path, "off")
    try:
        assert server.stdout is not None and server.stdin is not None
        port = json.loads(server.stdout.readline())["port"]
        with grpc.secure_channel(f"127.0.0.1:{port}", pki.channel_credentials("alice")) as channel:
            for _ in range(2):
                stub(channel).Predict(
                    predict_request("mlp", {"input": X}),
                    metadata=auth(helper.token(), ("traceparent", TRACEPARENT)),
                    timeout=TIMEOUT,
                )
        server.stdin.close()
        assert json.loads(server.stdout.readline()) == {"otel": []}
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(r["code"], r["trace_id"]) for r in records] == [("OK", None)] * 2


def test_tracing_on_without_opentelemetry_is_a_startup_error_naming_the_extra(pki, demo_models, tmp_path):
    server = _serve_without_opentelemetry(pki, demo_models, tmp_path, "on")
    out, _ = server.communicate(timeout=60)
    assert server.returncode == 2
    assert json.loads(out)["error"] == (
        "tracing.enabled: OpenTelemetry is not installed (no module 'opentelemetry'); pip install 'gateway[otel]'"
    )


def test_rest_requests_continue_the_callers_trace_with_the_same_steps(start_gateway):
    import http.client
    import json
    import ssl

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gw = start_gateway(tracing=Tracing(provider), overrides={"http.listen": "127.0.0.1:0"})
    gw.extra["spans"] = exporter
    context = ssl.create_default_context(cafile=str(gw.pki.path("ca.crt")))
    context.load_cert_chain(gw.pki.path("alice.crt"), gw.pki.path("alice.key"))
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}]})
    connection = http.client.HTTPSConnection("localhost", gw.gateway.http_port, context=context, timeout=TIMEOUT)
    headers = {"Authorization": f"Bearer {gw.token()}", "traceparent": TRACEPARENT, "x-request-id": "traced-rest"}
    connection.request("POST", "/v2/models/mlp/infer", body=body, headers=headers)
    assert connection.getresponse().status == 200
    connection.close()
    spans = spans_of(gw, "traced-rest")
    assert {format_trace_id(s.context.trace_id) for s in spans} == {TRACE_ID}
    call = call_span(spans)
    assert call.name == "POST /v2/models/{model}/infer"
    assert call.attributes["http.route"] == "/v2/models/{model}/infer" and call.attributes["gateway.status_code"] == 0
    assert format_span_id(call.parent.span_id) == PARENT_ID
    assert {s.name for s in spans if s is not call} == CALL_STEPS
    assert record_of(gw, "traced-rest")["trace_id"] == TRACE_ID


def test_a_start_line_says_where_the_spans_go(start_gateway, monkeypatch):
    from structlog.testing import capture_logs

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://user:secret@collector.example:4317")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu")
    with capture_logs() as logs:
        start_gateway(overrides={"tracing.enabled": True})
    (line,) = [entry for entry in logs if entry["event"] == "tracing_enabled"]
    assert line == {
        "event": "tracing_enabled",
        "log_level": "info",
        "exporter": "otlp-grpc",
        "endpoint": "https://collector.example:4317",  # no user or password
        "tls": True,
        "service_name": "gateway-eu",
        "sampler": "parentbased_always_on",
    }


def test_no_tracing_line_when_tracing_is_off(start_gateway):
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        start_gateway()
    assert "tracing_enabled" not in [entry["event"] for entry in logs]
