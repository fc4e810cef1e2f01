"""OpenTelemetry tracing of calls (docs/tracing.md): off unless ``tracing.enabled``, and then the only module that
imports opentelemetry (the optional extra ``gateway[otel]``), so that the gateway runs without it.

One span per call, continuing the caller's W3C ``traceparent`` (a malformed one is ignored: a new trace), with
children for authentication, authorization, the model run and the audit commit. The children name the call span
as their parent explicitly (``CallTrace.context``) instead of making spans current: a stream's handler yields
between its steps, and nothing here must depend on which task resumes it. A call without tracing has
``Call.trace`` None, and every hook is then one attribute check.

Attributes carry no token, no tensor value and no caller text that the pipeline's grammar has not checked
(gateway/identifiers.py): model names and versions only once checked, request ids only when well-formed.
"""

from __future__ import annotations

import contextlib
import os
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.context import Call

# The W3C trace-context headers a call may carry (https://www.w3.org/TR/trace-context/).
_HEADERS = ("traceparent", "tracestate")


@dataclass(slots=True)
class CallTrace:
    """The span of one call, shared by the contexts of its stream messages; ``code`` is its latest recorded
    outcome, so the call's own record (always its last) decides the status the span ends with."""

    tracer: Any  # opentelemetry.trace.Tracer
    span: Any  # opentelemetry.trace.Span
    context: Any  # opentelemetry.context.Context holding ``span``: the parent of the call's other spans
    trace_id: str  # 32 lowercase hex digits, as W3C writes it
    code: str = "OK"
    rpc: bool = True  # a gRPC call; False: a request of the REST binding


class Tracing:
    """Starts call spans; ``Tracing(None)`` is tracing off."""

    def __init__(self, provider: Any | None, *, destination: Mapping[str, str | bool] | None = None) -> None:
        """``provider``: an opentelemetry TracerProvider, or None for no tracing; ``destination``: where its spans
        go, for the start-up log line."""
        self._provider = provider
        self.destination = destination
        self._tracer = provider.get_tracer("gateway") if provider is not None else None

    def start_call(self, method: str, metadata: Sequence[tuple[str, Any]], request_id: str) -> CallTrace | None:
        """The span of a call to ``method`` (a known method's name, or a fixed one for unknown methods)."""
        if self._tracer is None:
            return None
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(_trace_headers(metadata))
        rpc = method.startswith("/")  # gRPC's /service/method; the REST binding's names are "VERB /route"
        full_name = method.lstrip("/")
        if rpc:
            service, _, name = full_name.rpartition("/")
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        else:
            verb, _, route = method.partition(" ")
            attributes = {"http.request.method": verb, "http.route": route}
        attributes["gateway.request_id"] = request_id
        span = self._tracer.start_span(full_name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
        trace_id = trace.format_trace_id(span.get_span_context().trace_id)
        return CallTrace(self._tracer, span, trace.set_span_in_context(span), trace_id, rpc=rpc)

    def shutdown(self) -> None:
        """Export the spans still buffered and stop the provider (each gateway is given one of its own)."""
        if self._provider is not None:
            self._provider.shutdown()


def from_environment() -> Tracing:
    """Tracing with a provider configured by the standard ``OTEL_*`` variables: OTLP over gRPC
    (``OTEL_EXPORTER_OTLP_*``), the sampler (``OTEL_TRACES_SAMPLER``), batching (``OTEL_BSP_*``) and the resource
    (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``; the service name is ``gateway`` unless set)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "gateway"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    service = str(resource.attributes.get(SERVICE_NAME))
    return Tracing(provider, destination=export_destination(os.environ, service_name=service))


def export_destination(environ: Mapping[str, str], *, service_name: str) -> dict[str, str | bool]:
    """Where ``from_environment``'s spans go, as the OTLP exporter reads the same variables (for the start-up log
    line; never the headers, which carry credentials, nor a user and password in the URL)."""
    endpoint = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or "http://localhost:4317"
    )
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.username is not None or parsed.password is not None:
        endpoint = parsed._replace(netloc=parsed.netloc.rpartition("@")[2]).geturl()
    insecure = environ.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE") or environ.get("OTEL_EXPORTER_OTLP_INSECURE")
    return {
        "exporter": "otlp-grpc",
        "endpoint": endpoint,
        "tls": not (insecure.lower() == "true" if insecure is not None else parsed.scheme == "http"),
        "service_name": service_name,
        "sampler": environ.get("OTEL_TRACES_SAMPLER") or "parentbased_always_on",
    }


def _trace_headers(metadata: Sequence[tuple[str, Any]]) -> dict[str, str]:
    """The first value of each trace-context header (text only: a binary value is not W3C trace context)."""
    headers: dict[str, str] = {}
    for name, value in metadata:
        if name in _HEADERS and name not in headers and isinstance(value, str):
            headers[name] = value
    return headers


_NO_SPAN = contextlib.nullcontext()


def span(
    call: Call, name: str, attributes: Mapping[str, str | int] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A child span of ``call``'s span around the block (None without tracing); an exception leaving the block
    marks it as an error, by its gRPC code or its class name (never its message). Without tracing, one shared
    no-op: this is on every call's path."""
    trace = call.trace
    if trace is None:
        return _NO_SPAN
    return _child_span(call, trace, name, attributes)


@contextlib.contextmanager
def _child_span(call: Call, trace: CallTrace, name: str, attributes: Mapping[str, str | int] | None) -> Iterator[Any]:
    from opentelemetry.trace import Status, StatusCode

    attributes = dict(attributes or {})
    if call.message_index is not None:
        attributes["gateway.message_index"] = call.message_index
    child = trace.tracer.start_span(name, context=trace.context, attributes=attributes)
    try:
        yield child
    except BaseException as exc:
        child.set_status(Status(StatusCode.ERROR, exc.code if isinstance(exc, GatewayError) else type(exc).__name__))
        raise
    finally:
        child.end()


def propagation_headers(span: Any) -> tuple[tuple[str, str], ...]:
    """The W3C trace-context headers that make ``span`` (from ``span()``; None without tracing) the parent of what
    the callee does: passed on to a remote backend."""
    if span is None:
        return ()
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=set_span_in_context(span))
    return tuple(carrier.items())


def note_outcome(call: Call, code: str) -> None:
    """The gRPC code just recorded for ``call`` (or one of its stream messages)."""
    if call.trace is not None:
        call.trace.code = code


def end_call(call: Call) -> None:
    """End ``call``'s span with the code of its last record."""
    trace = call.trace
    if trace is None:
        return
    from opentelemetry.trace import Status, StatusCode

    # Both transports: the gRPC code (the REST binding's HTTP status is one per code, docs/rest.md).
    key = "rpc.grpc.status_code" if trace.rpc else "gateway.status_code"
    trace.span.set_attribute(key, grpc.StatusCode[trace.code].value[0])
    if trace.code != "OK":
        trace.span.set_status(Status(StatusCode.ERROR, trace.code))
    trace.span.end()
