"""Builds and runs the gRPC server: credentials, interceptor order, services, health, graceful shutdown."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any, cast

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.api.inference import InferenceServicer
from gateway.audit import AuditLog, FsyncPolicy
from gateway.auth.certs import CrlStore
from gateway.auth.keys import KeyStore
from gateway.auth.verifier import TokenVerifier
from gateway.config import ConfigError, Settings
from gateway.errors import UnavailableError
from gateway.executor import HandlerExecutor
from gateway.interceptors import AuditInterceptor, AuthenticationInterceptor
from gateway.models.repository import ModelInfo, ModelRepository
from gateway.models.runtime import RuntimeOptions
from gateway.pipeline import Pipeline
from gateway.policy import PolicyStore
from gateway.tls import ServerCredentials

log = structlog.get_logger(__name__)

_SIGNAL_POLL_S = 0.1
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name


def model_health_name(model: str) -> str:
    """The health-check service name of one model."""
    return f"model/{model}"


def _grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    limits, keepalive = settings.limits, settings.keepalive
    return [
        # A backstop above the limit the audit boundary enforces: between the two, refusals are audited.
        ("grpc.max_receive_message_length", 2 * limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        # Soft and hard metadata limits equal: between them grpc refuses at random, which no client can rely on.
        ("grpc.max_metadata_size", limits.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_metadata_bytes),
        ("grpc.keepalive_time_ms", int(keepalive.time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive.timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(keepalive.min_ping_interval_s * 1000)),
        # Connections outlive certificate expiry, revocation and rotation: bound their age.
        ("grpc.max_connection_age_ms", int(keepalive.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(keepalive.max_connection_age_grace_s * 1000)),
        # Workers share the port on purpose; otherwise a second gateway on it must fail to bind, not share traffic.
        ("grpc.so_reuseport", int(settings.workers > 1)),
    ]


def catch_stop_signals() -> list[int]:
    """A list that SIGTERM and SIGINT append to from now on; the caller polls it (the supervisor does too).

    The handler only appends: a handler that took a lock could wait for the very lock the code it interrupted
    holds, so the work happens in the polling loop instead.
    """
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return received


def _at_concurrency_limit(server: grpc.Server | None) -> bool:
    """Whether grpcio will refuse the call it is routing now for ``maximum_concurrent_rpcs``.

    grpcio runs the interceptors, then compares its count of active calls with the limit, under one lock that
    routing holds: reading the same two numbers here gives its verdict, so the refusal can be audited. They are
    private to grpcio; if they are gone, refusals are only counted (``unobserved``), as before.
    """
    state = getattr(server, "_state", None)
    limit = getattr(state, "maximum_concurrent_rpcs", None)
    active = getattr(state, "active_rpc_count", None)
    return isinstance(limit, int) and isinstance(active, int) and active >= limit


class Gateway:
    """The gateway process: every component, wired once, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port: int | None = None
        self._stopped = threading.Event()
        limits = settings.limits
        self._executor = HandlerExecutor(unary_workers=limits.unary_workers, stream_workers=limits.stream_workers)
        self.models = ModelRepository(
            settings.models.repository,
            options=RuntimeOptions(
                intra_op_threads=settings.models.intra_op_threads,
                inter_op_threads=settings.models.inter_op_threads,
                execution_mode=settings.models.execution_mode,
                max_elements=settings.models.max_elements,
                batching=settings.models.batching,
            ),
            poll_interval_s=settings.models.poll_interval_s,
            on_publish=self._models_changed,
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.credentials = None if settings.dev_insecure_transport else ServerCredentials(settings.tls)
        self.policies = (
            None
            if settings.dev_no_auth
            else PolicyStore(settings.policies.directory, interval_s=settings.policies.reload_interval_s)
        )
        self.keys: KeyStore | None = None
        self.crl: CrlStore | None = None
        interceptors: list[grpc.ServerInterceptor] = []
        hmac_key = settings.audit.hmac_key_file.read_bytes().strip() if settings.audit.hmac_key_file else None
        self.audit = AuditLog(
            settings.audit.path,
            fsync=cast(FsyncPolicy, settings.audit.fsync),  # one of FSYNC_POLICIES, checked by config
            hmac_key=hmac_key,
            max_bytes=settings.audit.max_bytes,
            chain_id=settings.audit.chain_id,
            dev_fail_open=settings.dev_audit_fail_open,
        )
        self.audit_interceptor = AuditInterceptor(
            audit=self.audit,
            max_message_bytes=settings.limits.max_message_bytes,
            at_concurrency_limit=lambda: _at_concurrency_limit(self._server),
            streams_full=lambda: self._executor.streams_full,
        )
        interceptors.append(self.audit_interceptor)  # outermost: refusals by the next ones are audited
        if not settings.dev_no_auth:
            auth = settings.auth
            if auth.jwks is None:
                raise ConfigError("auth.jwks: required to verify tokens")
            self.keys = KeyStore(auth.jwks, interval_s=auth.reload_interval_s, allowed_algorithms=auth.algorithms)
            verifier = TokenVerifier(
                keys=self.keys,
                issuer=auth.issuer,
                audience=auth.audience,
                algorithms=auth.algorithms,
                leeway_s=auth.leeway_s,
                max_lifetime_s=auth.max_token_lifetime_s,
                required_claims=auth.required_claims,
                groups_claim=auth.groups_claim,
                scopes_claim=auth.scopes_claim,
                hmac_secret=auth.hmac_secret_file.read_bytes().strip() if auth.hmac_secret_file else None,
                cache_size=auth.token_cache_size,
            )
            if settings.tls.crl is not None and settings.tls.client_ca is not None:
                self.crl = CrlStore(settings.tls.crl, settings.tls.client_ca, interval_s=settings.tls.reload_interval_s)
            interceptors.append(
                AuthenticationInterceptor(
                    verifier=verifier, crl=self.crl, require_certificate=not settings.dev_insecure_transport
                )
            )
        self.pipeline = Pipeline(models=self.models, policies=self.policies, before_run=self._audit_gate)
        self._interceptors = tuple(interceptors)
        self._server: grpc.Server | None = None

    def _audit_gate(self) -> None:
        # No model runs while the audit sink is known to be down: its record could not be written.
        if not self.audit.healthy and not self.settings.dev_audit_fail_open:
            raise UnavailableError("audit trail unavailable", reason="audit sink unhealthy")

    def _models_changed(self, models: list[ModelInfo], removed: list[str]) -> None:
        for info in models:
            self.health.set(model_health_name(info.name), health_pb2.HealthCheckResponse.SERVING)
        for name in removed:
            self.health.set(model_health_name(name), health_pb2.HealthCheckResponse.NOT_SERVING)

    def _warn_dev_options(self) -> None:
        for name in ("dev_insecure_transport", "dev_no_auth", "dev_audit_fail_open"):
            if getattr(self.settings, name):
                log.warning("dev_option_enabled", option=name, detail="development only: never in production")

    def start(self) -> int:
        """Load everything, bind, start serving; returns the bound port."""
        self._warn_dev_options()
        self.models.load_all()
        self.audit.open()
        limits = self.settings.limits
        server = grpc.server(
            self._executor,
            interceptors=self._interceptors,
            options=_grpc_options(self.settings),
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        pb_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(
                self.pipeline, max_elements=self.settings.models.max_elements, record=self.audit_interceptor.record
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        listen = self.settings.listen
        if self.credentials is None:
            self.port = server.add_insecure_port(listen)
        else:
            self.port = server.add_secure_port(listen, self.credentials.credentials())
        if not self.port:
            raise OSError(f"cannot listen on {listen}")
        server.start()
        self._server = server
        for component in (self.models, self.policies, self.keys, self.crl, self.credentials):
            if component is not None:
                component.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("gateway_started", listen=listen, port=self.port, mtls=self.credentials is not None)
        return self.port

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight calls finish within the grace period, then flush the audit trail."""
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        self.health.enter_graceful_shutdown()
        log.info("gateway_stopping", drain_s=self.settings.shutdown_drain_s, grace_s=grace)
        # Draining: health says NOT_SERVING while calls are still accepted, so that balancers checking health stop
        # sending new calls before the listener closes.
        time.sleep(self.settings.shutdown_drain_s)
        self._server.stop(grace).wait()
        self._executor.shutdown(wait=False)  # every call has ended or been cancelled: only idle threads are left
        for component in (self.credentials, self.crl, self.keys, self.policies, self.models):
            if component is not None:
                component.stop()
        self.audit.close()
        # Calls grpcio refused after routing and before our boundary (see docs/audit.md) are only counted.
        log.info("gateway_stopped", calls=self.audit_interceptor.counts())

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully."""
        received = catch_stop_signals()
        self.start()
        while not received:
            time.sleep(_SIGNAL_POLL_S)
        log.info("signal_received", signal=signal.Signals(received[0]).name)
        self.stop()
