"""Prometheus metrics (docs/operations.md): the metric objects, the bounded label values, and the listener.

Every label value comes from a fixed set or from the gateway's own configuration (models in the repository,
policy rule ids), never from what a caller sends, so no caller can grow the number of series. With ``workers: N``
the workers write their values to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode,
set up by the supervisor before the workers start) and the supervisor serves them all on one listener.
"""

from __future__ import annotations

import functools
import ssl
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess

from gateway.config import ConfigError
from gateway.errors import AuthenticationError, GatewayError, PermissionDeniedError, ResourceExhaustedError

if TYPE_CHECKING:
    from gateway.context import CallContext

NONE = "-"  # the label value for "no model", "unknown method", "no detail"
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"

CALLS = Counter(
    "gateway_calls", "Calls by method, model, version and status code", ["method", "model", "version", "code"]
)
CALL_SECONDS = Histogram("gateway_call_duration_seconds", "Whole call, first step to committed record", ["method"])
IN_FLIGHT = Gauge("gateway_calls_in_flight", "Calls being served", multiprocess_mode="livesum")
REFUSALS = Counter("gateway_refusals", "Calls refused, by reason class and bounded detail", ["reason", "detail"])
AUTH_SECONDS = Histogram("gateway_authentication_duration_seconds", "Certificate and token checks of one call")
MODEL_RUN_SECONDS = Histogram("gateway_model_run_duration_seconds", "One model run", ["model", "version"])
AUDIT_COMMIT_SECONDS = Histogram("gateway_audit_commit_duration_seconds", "A call's wait for its record to commit")
AUDIT_FSYNC_SECONDS = Histogram("gateway_audit_fsync_duration_seconds", "One fsync of the audit file")
AUDIT_RECORDS = Counter("gateway_audit_records_written", "Audit records written")
AUDIT_BYTES = Counter("gateway_audit_bytes_written", "Audit bytes written")
AUDIT_GROUP_SIZE = Histogram(
    "gateway_audit_group_size", "Records per group commit", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
AUDIT_SINK_UP = Gauge("gateway_audit_sink_up", "1 while the audit trail is writable", multiprocess_mode="livemin")
MODEL_VERSIONS = Gauge(
    "gateway_model_versions_loaded", "Versions loaded, by model", ["model"], multiprocess_mode="livemax"
)
MODEL_LOAD_FAILURES = Counter("gateway_model_load_failures", "Model versions that failed to load", ["model"])
# models.signatures: a version whose signature did not verify; mode "required" refused it, "warn" served it.
MODEL_SIGNATURE_FAILURES = Counter(
    "gateway_model_signature_failures", "Model versions whose signature did not verify, by mode", ["model", "mode"]
)
BATCH_SIZE = Histogram(
    "gateway_batch_size", "Requests per dynamic batch", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
# Security posture. Expiry times take the minimum over workers: an alert fires while any worker still has the old.
NOT_AFTER = Gauge(
    "gateway_certificate_not_after_timestamp_seconds",
    "notAfter of the server certificate and of the client CA (the earliest of its certificates)",
    ["role"],
    multiprocess_mode="livemin",
)
CRL_NEXT_UPDATE = Gauge(
    "gateway_crl_next_update_timestamp_seconds", "nextUpdate of the CRL in force", multiprocess_mode="livemin"
)
LAST_RELOAD = Gauge(
    "gateway_last_reload_timestamp_seconds",
    "Last successful load of a watched store (jwks, policies, crl, server-tls, models)",
    ["store"],
    multiprocess_mode="livemax",
)
JWKS_LAST_SUCCESS = Gauge(
    "gateway_jwks_last_success_timestamp_seconds",
    "Last fetch of the issuer's JWKS (auth.jwks_url, auth.discovery) that gave a valid key set",
    multiprocess_mode="livemin",
)
JWKS_FETCH_FAILURES = Counter(
    "gateway_jwks_fetch_failures",
    "Fetches of the issuer's JWKS or discovery document that failed; the last good key set stayed in force",
    ["reason"],
)

# Reasons the verifier and authenticator give for a bad token (gateway/auth): anything else is "other".
_TOKEN_DETAILS = frozenset(
    {
        "no authorization header",
        "several authorization headers",
        "authorization header too large",
        "authorization scheme is not Bearer",
        "malformed bearer token",
        "malformed token",
        "token too large",
        "token bound to another certificate",
        "algorithm none",
        "unsupported critical header",
        "unexpected token type",
        "missing kid",
        "unknown kid",
        "expired",
        "not yet valid",
        "token lifetime over the maximum",
        "wrong issuer",
        "wrong audience",
        "bad signature",
        "algorithm not allowed",
        "unusable key",
        "missing claim",
        "malformed claim",
        "unsupported confirmation method",
        "invalid token",
    }
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
_CERTIFICATE_PREFIXES = ("no client certificate", "client certificate", "ambiguous identity", "no CRL")


def _token_detail(reason: str) -> str:
    for prefix in ("missing claim", "malformed claim", "algorithm"):  # these name a claim or an algorithm
        if reason.startswith(prefix) and reason != "algorithm none":
            reason = "algorithm not allowed" if prefix == "algorithm" else prefix
    return reason if reason in _TOKEN_DETAILS else "other"


def refusal_labels(error: GatewayError, call: CallContext) -> tuple[str, str]:
    """(reason class, detail) of a refusal, both from fixed sets or the operator's policy rule ids."""
    reason = error.reason
    if isinstance(error, AuthenticationError):
        if reason.startswith(_CERTIFICATE_PREFIXES):
            return "certificate", NONE
        return "token", _token_detail(reason)
    if isinstance(error, PermissionDeniedError):
        return "policy_deny", call.rule or "default_deny"
    if isinstance(error, ResourceExhaustedError):
        return "limit", reason if reason in _LIMIT_DETAILS else "other"
    return error.code.lower(), NONE


def observe_call(call: CallContext, error: GatewayError | None, *, method: str) -> None:
    """Count one finished call; ``method`` is the method's name when the gateway serves it, else NONE.

    The model and version are labels only once the version resolved, which proves the model exists."""
    resolved = call.version is not None and call.model is not None
    model = call.model if resolved and call.model is not None else NONE
    version = call.version if resolved and call.version is not None else NONE
    _calls(method, model, version, "OK" if error is None else error.code).inc()
    _call_seconds(method).observe(time.perf_counter() - call.started)
    if error is not None:
        REFUSALS.labels(*refusal_labels(error, call)).inc()


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


@dataclass(frozen=True, slots=True)
class MetricsTls:
    """The files the metrics listener serves HTTPS with; clients must present a certificate signed by client_ca."""

    cert: str
    key: str
    client_ca: str


def registry(multiprocess_dir: str | None = None) -> CollectorRegistry:
    """What a scrape returns: this process's metrics, or every worker's from their ``multiprocess_dir``."""
    if multiprocess_dir is None:
        return REGISTRY
    combined = CollectorRegistry()
    _multiprocess.MultiProcessCollector(combined, path=multiprocess_dir)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        combined.register(collector)  # the supervisor's own: workers' process metrics are not in the files
    return combined


class MetricsListener:
    """The ``/metrics`` HTTP(S) listener (prometheus_client's, on its own thread); TLS by the stdlib ssl module."""

    def __init__(self, listen: str, *, tls: MetricsTls | None, source: CollectorRegistry) -> None:
        host, _, port = listen.rpartition(":")
        self._server: WSGIServer
        try:
            self._server = self._start(host.strip("[]"), int(port), tls, source)
        except OSError as exc:  # a port in use, an address not this machine's, unreadable TLS files
            raise ConfigError(f"metrics.listen: cannot listen on {listen}: {exc.strerror or exc}") from None
        self.port: int = self._server.server_port

    @staticmethod
    def _start(host: str, port: int, tls: MetricsTls | None, source: CollectorRegistry) -> WSGIServer:
        if tls is None:
            return start_http_server(port, addr=host, registry=source)[0]
        return start_http_server(
            port,
            addr=host,
            registry=source,
            certfile=tls.cert,
            keyfile=tls.key,
            client_cafile=tls.client_ca,
            client_auth_required=True,
            tls_min_version=ssl.TLSVersion.TLSv1_2,
        )[0]

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()


def mark_worker_dead(pid: int, multiprocess_dir: str) -> None:
    """Drop a stopped worker's live gauges from the multiprocess directory (its counters stay counted)."""
    _multiprocess.mark_process_dead(pid, path=multiprocess_dir)
