"""Prometheus metrics (docs/operations.md): the metric objects, the bounded label values, and the listener.

Every label value comes from a fixed set or from the gateway's own configuration (models in the repository,
policy rule ids), never from what a caller sends, so no caller can grow the number of series. With ``workers: N``
the workers write their values to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode,
set up by the supervisor before the workers start) and the supervisor serves them all on one listener.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client import multiprocess as _multiprocess

from gateway.auth import reasons
from gateway.config import ConfigError
from gateway.errors import (
    ERRORS_BY_CODE,
    AuthenticationError,
    GatewayError,
    PermissionDeniedError,
    ResourceExhaustedError,
)

if TYPE_CHECKING:
    from gateway.context import Outcome

log = structlog.get_logger(__name__)

NONE = "-"  # the label value for "no model", "unknown method", "no detail"
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# grpc.StatusCode's names (this module imports no grpc: gateway/auth uses it): what a backend may answer.
GRPC_CODES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip

# No ``*_created`` series: a sample per series that dashboards and alerts never read, doubling what is scraped.
disable_created_metrics()

# The gateway's steps take from under 10 us (the token check of a known connection: a remembered verdict) or ~70 us
# (the demo model's run) to seconds (a large model, an fsync on a busy disk). The library's default buckets start
# at 5 ms: every call of the demo model landed in the first, and p50 and p99 were flat lines.
LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.000075, 0.0001, 0.00015, 0.0002, 0.0003, 0.0004, 0.0006, 0.0008,
    0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

BUILD_INFO = Gauge(
    "gateway_build_info",
    "1, labelled with the versions serving",
    ["version", "python", "grpc", "onnxruntime"],
    multiprocess_mode="livemax",
)
CALLS = Counter(
    "gateway_calls", "Calls by method, model, version and status code", ["method", "model", "version", "code"]
)
CALL_SECONDS = Histogram(
    "gateway_call_duration_seconds", "Whole call, first step to committed record", ["method"], buckets=LATENCY_BUCKETS
)
IN_FLIGHT = Gauge("gateway_calls_in_flight", "Calls being served", multiprocess_mode="livesum")
REFUSALS = Counter("gateway_refusals", "Calls refused, by reason class and bounded detail", ["reason", "detail"])
AUTH_SECONDS = Histogram(
    "gateway_authentication_duration_seconds", "Certificate and token checks of one call", buckets=LATENCY_BUCKETS
)
MODEL_RUN_SECONDS = Histogram(
    "gateway_model_run_duration_seconds", "One model run", ["model", "version"], buckets=LATENCY_BUCKETS
)
AUDIT_COMMIT_SECONDS = Histogram(
    "gateway_audit_commit_duration_seconds", "A call's wait for its record to commit", buckets=LATENCY_BUCKETS
)
AUDIT_FSYNC_SECONDS = Histogram(
    "gateway_audit_fsync_duration_seconds", "One fsync of the audit file", buckets=LATENCY_BUCKETS
)
AUDIT_RECORDS = Counter("gateway_audit_records_written", "Audit records written")
AUDIT_BYTES = Counter("gateway_audit_written_bytes", "Audit bytes written")
AUDIT_GROUP_SIZE = Histogram("gateway_audit_group_size", "Records per group commit", buckets=_COUNT_BUCKETS)
AUDIT_SINK_UP = Gauge("gateway_audit_sink_up", "1 while the audit trail is writable", multiprocess_mode="livemin")
MODEL_VERSIONS = Gauge(
    "gateway_model_versions_loaded", "Versions loaded, by model", ["model"], multiprocess_mode="livemax"
)
MODEL_LOAD_FAILURES = Counter("gateway_model_load_failures", "Model versions that failed to load", ["model"])
# models.signatures: a version whose signature did not verify; mode "required" refused it, "warn" served it.
MODEL_SIGNATURE_FAILURES = Counter(
    "gateway_model_signature_failures", "Model versions whose signature did not verify, by mode", ["model", "mode"]
)
BATCH_SIZE = Histogram("gateway_batch_size", "Requests per dynamic batch", ["model"], buckets=_COUNT_BUCKETS)
# Remote backends (docs/backends.md), labelled by the backend names of the configuration.
BACKEND_CALLS = Counter("gateway_backend_calls", "Calls sent to a backend, by its status code", ["backend", "code"])
BACKEND_SECONDS = Histogram(
    "gateway_backend_call_duration_seconds", "One call to a backend", ["backend"], buckets=LATENCY_BUCKETS
)
BACKEND_IN_FLIGHT = Gauge(
    "gateway_backend_calls_in_flight", "Calls open to a backend", ["backend"], multiprocess_mode="livesum"
)
BACKEND_UP = Gauge(
    "gateway_backend_up",
    "1 while the backend answered ready at its last poll",
    ["backend"],
    multiprocess_mode="livemin",
)
# Security posture. Expiry times take the minimum over workers: an alert fires while any worker still has the old.
NOT_AFTER = Gauge(
    "gateway_certificate_not_after_timestamp_seconds",
    "notAfter of the server certificate and of the client CA (the earliest of its certificates)",
    ["role"],
    multiprocess_mode="livemin",
)
STORES = ("policies", "jwks", "crl", "server-tls", "models")  # the ``store`` label: what is read from files or URLs
LAST_RELOAD = Gauge(
    "gateway_last_reload_timestamp_seconds",
    "Last successful load of a store (policies, jwks, crl, server-tls, models)",
    ["store"],
    multiprocess_mode="livemax",
)
RELOAD_FAILURES = Counter(
    "gateway_reload_failures",
    "Loads of a store that were refused (a bad file, a failed fetch); the last good value stayed in force",
    ["store"],
)
JWKS_FETCH_FAILURES = Counter(
    "gateway_jwks_fetch_failures",
    "Fetches of the issuer's JWKS or discovery document that failed; the last good key set stayed in force",
    ["reason"],
)


# Gauges of features that may be off are made by the first store that sets them: a gauge without labels is
# exported from the moment it exists, and a 0 there reads as "expired in 1970" to every alert on it.
@functools.cache
def crl_next_update() -> Gauge:
    """The CRL's nextUpdate gauge, exported only by a gateway that has a CRL (``tls.crl``)."""
    return Gauge(
        "gateway_crl_next_update_timestamp_seconds", "nextUpdate of the CRL in force", multiprocess_mode="livemin"
    )


@functools.cache
def jwks_last_success() -> Gauge:
    """The issuer key set's last good fetch, exported only with ``auth.jwks_url`` or ``auth.discovery``."""
    return Gauge(
        "gateway_jwks_last_success_timestamp_seconds",
        "Last fetch of the issuer's JWKS (auth.jwks_url, auth.discovery) that gave a valid key set",
        multiprocess_mode="livemin",
    )


_LIMIT_DETAILS = frozenset(
    {
        "concurrent call limit",
        "per-principal in_flight limit",
        "per-principal streams limit",
        "message too large",
        "response too large",
    }
)


def refusal_labels(error: GatewayError, outcome: Outcome) -> tuple[str, str]:
    """(reason class, detail) of a refusal, both from fixed sets or the operator's policy rule ids."""
    reason = error.reason
    if isinstance(error, AuthenticationError):  # the vocabulary's term: one spelling in logs, labels, messages
        term = reasons.TERMS[reasons.term_of(reason)]
        return ("token" if term.error else "certificate"), term.term
    if isinstance(error, PermissionDeniedError):
        return "policy_deny", outcome.rule or "default deny"
    if isinstance(error, ResourceExhaustedError):
        return "limit", reason if reason in _LIMIT_DETAILS else "other"
    return error.code.lower(), NONE


def refusal_series() -> Iterator[tuple[str, str]]:
    """Every (reason class, detail) a refusal is counted under, but the ids of the operator's deny rules."""
    for term in reasons.TERMS.values():  # the vocabulary of authentication refusals (gateway/auth/reasons.py)
        yield ("token" if term.error else "certificate"), term.term
    yield "policy_deny", "default deny"
    for detail in (*sorted(_LIMIT_DETAILS), "other"):
        yield "limit", detail
    classed = {AuthenticationError.code, PermissionDeniedError.code, ResourceExhaustedError.code}
    for code in sorted(ERRORS_BY_CODE.keys() - classed):
        yield code.lower(), NONE


def start_counting(*, methods: Iterable[str], versions: Mapping[str, str], backends: Iterable[str] = ()) -> None:
    """Make the fixed series of the call, refusal and backend counters at 0, and ``gateway_build_info``.

    A series born at its first increment has no earlier sample, so ``rate()`` and ``increase()`` miss the first
    burst of a refusal class; these exist from the start. ``methods`` are the methods served: each with model
    and version ``-`` and every status code the gateway answers (as go-grpc-prometheus's ``InitializeMetrics``
    does); ``backends`` the configured backends' names, each with every gRPC status code."""
    for method in (*methods, NONE):
        for code in ("OK", *ERRORS_BY_CODE):
            _calls(method, NONE, NONE, code)
    for reason, detail in refusal_series():
        REFUSALS.labels(reason=reason, detail=detail)
    for backend in backends:
        for code in GRPC_CODES:
            BACKEND_CALLS.labels(backend=backend, code=code)
    BUILD_INFO.labels(**versions).set(1)


def recording(listen: str | None) -> bool:
    """Whether a server's per-call metrics are worth their cost (~15 us a call, docs/performance.md): only when its
    ``metrics.listen`` serves them, or when it is a worker whose supervisor may (prometheus_client's multiprocess
    mode). Otherwise nothing could ever read them."""
    return listen is not None or MULTIPROCESS_DIR_ENV in os.environ


def observe_call(*, method: str, started: float, outcome: Outcome, error: GatewayError | None) -> None:
    """Count one finished call (``started``: its perf_counter at entry); ``method`` is the method's name when the
    gateway serves it, else NONE.

    The model and version are labels only once the version resolved, which proves the model exists."""
    resolved = outcome.version is not None and outcome.model is not None
    model = outcome.model if resolved and outcome.model is not None else NONE
    version = outcome.version if resolved and outcome.version is not None else NONE
    _calls(method, model, version, "OK" if error is None else error.code).inc()
    _call_seconds(method).observe(time.perf_counter() - started)
    if error is not None:
        REFUSALS.labels(*refusal_labels(error, outcome)).inc()


# Every call looks up its series: prometheus_client's labels() checks and joins the values each time, a cost on
# every call that a cache of the (bounded, see the module docstring) series takes off the path.
@functools.lru_cache(maxsize=4096)
def _calls(method: str, model: str, version: str, code: str) -> Counter:
    return CALLS.labels(method=method, model=model, version=version, code=code)


@functools.lru_cache(maxsize=256)
def _call_seconds(method: str) -> Histogram:
    return CALL_SECONDS.labels(method=method)


def set_timestamp(gauge: Gauge, moment: datetime | None) -> None:
    """A posture gauge set to ``moment`` as Unix seconds (unchanged when there is none)."""
    if moment is not None:
        gauge.set(moment.timestamp())


class Watched(Protocol):
    """A store read from files that polls them while started (the CRL)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class MetricsTls:
    """The files the metrics listener serves HTTPS with; clients must present a certificate signed by client_ca.

    ``admit`` takes the client's leaf certificate (DER) and says why it may not scrape (revoked, not an allowed
    identity), or None; ``watched`` are the stores it reads, started and stopped with the listener."""

    cert: str
    key: str
    client_ca: str
    admit: Callable[[bytes], str | None] | None = None
    watched: tuple[Watched, ...] = ()


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What peers may hold on the metrics listener: connections at once, per source address, and the time the TLS
    handshake and then each read and write may take (metrics.max_connections, ...)."""

    max_connections: int = 16
    max_connections_per_source: int = 4
    timeout_s: float = 10.0


# A connection may last this many timeout_s in all: the handshake, the request and the answer, each one at most.
_CONNECTION_TIMEOUTS = 3


def registry(multiprocess_dir: str | None = None) -> CollectorRegistry:
    """What a scrape returns: this process's metrics, or every worker's from their ``multiprocess_dir``."""
    if multiprocess_dir is None:
        return REGISTRY
    combined = CollectorRegistry()
    _multiprocess.MultiProcessCollector(combined, path=multiprocess_dir)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        combined.register(collector)  # the supervisor's own: workers' process metrics are not in the files
    return combined


_REFUSAL = "gateway.scrape_refused"  # the WSGI environ key carrying why this connection may not scrape


class _Handler(WSGIRequestHandler):
    """One scrape; says in the environ whether the peer's certificate may scrape, and logs nothing per request."""

    server: _MetricsServer

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        environ[_REFUSAL] = self.server.refusal(self.connection)
        return environ

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's WSGI app behind a listener that accepts in one thread and does everything a peer can
    stall (the TLS handshake, reading the request) in a thread per connection, under a timeout and a cap.

    prometheus_client's own HTTPS listener does the handshake in its accepting thread with no timeout, so one
    idle TCP connection stops every scrape (issue 27)."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        family: socket.AddressFamily,
        limits: ListenerLimits,
        tls: ssl.SSLContext | None,
        admit: Callable[[bytes], str | None] | None,
    ) -> None:
        self.address_family = family
        self._limits = limits
        self._tls = tls
        self._admit = admit
        self._lock = threading.Lock()
        self._open: collections.Counter[str] = collections.Counter()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection on a thread of its own, or close it at once past a cap."""
        source = str(client_address[0])
        with self._lock:
            full = self._open.total() >= self._limits.max_connections
            if full or self._open[source] >= self._limits.max_connections_per_source:
                refused = True
            else:
                refused = False
                self._open[source] += 1
        if refused:
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread: the slot is free again
            self._release(source)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(str(client_address[0]))

    def _release(self, source: str) -> None:
        with self._lock:
            self._open[source] -= 1
            if self._open[source] <= 0:
                del self._open[source]

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self._limits.timeout_s)  # the handshake, then each read and write
        # And one deadline for the whole connection (handshake, request, answer): a peer sending a byte just
        # inside each timeout would otherwise hold its slot for hours without a certificate.
        current = [request]  # the socket the deadline cuts: the accepted one, then its TLS wrapper
        deadline = threading.Timer(_CONNECTION_TIMEOUTS * self._limits.timeout_s, lambda: _cut(current[-1]))
        deadline.daemon = True
        deadline.start()
        try:
            if self._tls is None:
                super().finish_request(request, client_address)
                return
            try:
                wrapped = self._tls.wrap_socket(request, server_side=True)
            except OSError:  # no or a bad certificate, a timeout, a reset, the deadline: nothing to answer
                return
            current.append(wrapped)
            # The wrapper owns the descriptor now: closed here, since socketserver closes only the socket it
            # accepted (detached by the wrap), and the descriptor would otherwise wait for a garbage collection.
            with wrapped:
                super().finish_request(wrapped, client_address)
        finally:
            deadline.cancel()

    def refusal(self, connection: Any) -> str | None:
        """Why the peer on ``connection`` may not scrape, or None."""
        if self._admit is None or not isinstance(connection, ssl.SSLSocket):
            return None
        der = connection.getpeercert(binary_form=True)
        reason = "no client certificate" if der is None else self._admit(der)
        if reason is not None:
            log.warning("metrics_scrape_refused", reason=reason, peer=str(connection.getpeername()[0]))
        return reason

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that stalls past the timeout or goes away: not worth a traceback on stderr."""


def _guarded(app: Callable[..., Any]) -> Callable[..., Any]:
    """prometheus_client's app, answering 403 to a peer whose certificate may not scrape."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get(_REFUSAL) is not None:
            start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"forbidden\n"]
        return app(environ, start_response)

    return guarded


def _cut(connection: socket.socket) -> None:
    """End a connection past its deadline: shutdown wakes the thread blocked reading or writing it."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class MetricsListener:
    """The ``/metrics`` HTTP(S) listener on its own threads; TLS by the stdlib ssl module, client certificates
    required and checked by ``tls.admit``."""

    def __init__(
        self,
        listen: str,
        *,
        tls: MetricsTls | None,
        source: CollectorRegistry,
        limits: ListenerLimits | None = None,
    ) -> None:
        host, _, port = listen.rpartition(":")
        self._tls = tls
        try:
            self._server = self._bind(host.strip("[]"), int(port), tls, limits or ListenerLimits())
        except OSError as exc:  # a port in use, an address not this machine's, unreadable TLS files
            raise ConfigError(f"metrics.listen: cannot listen on {listen}: {exc.strerror or exc}") from None
        self._server.set_app(_guarded(make_wsgi_app(source)))
        self.port: int = self._server.server_port
        for store in tls.watched if tls is not None else ():
            store.start()
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-listener", daemon=True)
        self._thread.start()

    @staticmethod
    def _bind(host: str, port: int, tls: MetricsTls | None, limits: ListenerLimits) -> _MetricsServer:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        context = None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(tls.cert, tls.key)
            context.load_verify_locations(tls.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return _MetricsServer((host, port), family=family, limits=limits, tls=context, admit=tls.admit if tls else None)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        for store in self._tls.watched if self._tls is not None else ():
            store.stop()


def mark_worker_dead(pid: int, multiprocess_dir: str) -> None:
    """Drop a stopped worker's live gauges from the multiprocess directory (its counters stay counted)."""
    _multiprocess.mark_process_dead(pid, path=multiprocess_dir)
