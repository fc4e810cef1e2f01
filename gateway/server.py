"""Builds and runs the gRPC server (grpc.aio, one event loop per process): credentials, the call boundary,
services, health, reflection, graceful drain and shutdown.

The event loop runs in a thread of its own, started by ``Gateway.start``, so that the same object serves the
command line (``serve_forever``, the main thread waiting for signals) and tests (start, call, stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import platform
import resource
import signal
import ssl
import threading
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Protocol, cast

import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from gateway import package_version
from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway._pb.inference import grpc_service_pb2 as oip_pb
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
from gateway.api.inference import InferenceServicer
from gateway.api.oip import OpenInferenceServicer
from gateway.api.rest import RestEndpoints
from gateway.audit import AuditError, AuditLog, FsyncPolicy
from gateway.auth.authenticator import Authenticator
from gateway.auth.certs import CrlStore, check_validity, inspect_peer
from gateway.auth.keys import KeyStore
from gateway.auth.remote_keys import RemoteKeyStore
from gateway.auth.verifier import TokenVerifier
from gateway.backends.fleet import Fleet
from gateway.boundary import CallBoundary, HandlerCollector, MessageLimits, Recorder
from gateway.config import AuthSettings, ConfigError, Settings, listen_error, read_secret
from gateway.errors import AuthenticationError, UnavailableError
from gateway.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from gateway.health import HealthServicer
from gateway.limits import Admission, RefusalLimit
from gateway.metrics import ListenerLimits, MetricsListener, MetricsTls, registry, start_counting
from gateway.metrics import recording as metrics_recording
from gateway.models.placement import Placement
from gateway.models.repository import ModelRepository
from gateway.models.runtime import RuntimeOptions
from gateway.pipeline import Pipeline
from gateway.policy import PolicyStore
from gateway.rest import METHOD_NAMES as REST_METHOD_NAMES
from gateway.rest import RestListener, RestService
from gateway.tls import ServerCredentials
from gateway.tracing import Tracing, from_environment

log = structlog.get_logger(__name__)

_SIGNAL_POLL_S = 0.1
_RECORDS_WAIT_S = 5.0
_STOP_MARGIN_S = 10.0
_ANSWER_FLUSH_S = 0.2  # after the last call's end, before the connections close: its answer's time to leave
_PROBE_MAX_MESSAGE_BYTES = 4096
_PROBE_AGE_GRACE_MS = 5000  # a Check in flight when the probe connection reaches its age
_NOFILE_UNLIMITED_TARGET = 1 << 20  # Linux's default nr_open: what an unlimited hard limit is raised to
_DESCRIPTOR_MARGIN = 64  # beyond the listeners' connection caps: files, models, the audit trail, grpc's own
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
OIP_SERVICE_NAME = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    limits, keepalive = settings.limits, settings.keepalive
    return [
        # A backstop above the limit the call boundary enforces: between the two, refusals are audited.
        ("grpc.max_receive_message_length", 2 * limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        # Soft and hard metadata limits equal: between them grpc refuses at random, which no client can rely on.
        ("grpc.max_metadata_size", limits.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_metadata_bytes),
        # Per connection: how many calls may be open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS), and how
        # long a connection may take to finish its TLS handshake before it is closed.
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        ("grpc.server_handshake_timeout_ms", int(limits.handshake_timeout_s * 1000)),
        # Connections held at once, handshakes in progress included: grpc closes the next at accept. grpc sees no
        # per-source-address count to cap (docs/operations.md, "Connection limits").
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_connection_idle_ms", int(keepalive.max_connection_idle_s * 1000)),
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


class Reloadable(Protocol):
    """A component read from files: watched in the background, and re-read at once on request."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def reload_now(self) -> bool: ...


def catch_signals() -> list[int]:
    """A list that SIGTERM, SIGINT (stop) and SIGHUP (reload) append to from now on; the caller polls it (the
    supervisor does too). Without a handler SIGHUP would end the process with its audit trail unclosed.

    The handler only appends: a handler that took a lock could wait for the very lock the code it interrupted
    holds, so the work happens in the polling loop instead.
    """
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    return received


@functools.cache
def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, once per process, and log both; the soft limit now.

    Every connection holds a descriptor: the default soft limit (often 1024) is what a flood of idle connections
    exhausts first, while the hard limit, which only root can raise, is usually far higher."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _NOFILE_UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    now = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            now = target
        except (ValueError, OSError) as exc:  # an unlimited hard limit above the kernel's nr_open
            log.warning("open_files_limit_not_raised", soft=soft, hard=_limit_text(hard), error=str(exc))
    log.info("open_files_limit", soft_was=_limit_text(soft), soft=_limit_text(now), hard=_limit_text(hard))
    return target if now == resource.RLIM_INFINITY else now


def _limit_text(limit: int) -> int | str:
    return "unlimited" if limit == resource.RLIM_INFINITY else limit


def metrics_tls(settings: Settings) -> MetricsTls | None:
    """The metrics listener's HTTPS files (the server's certificate, the client CA) and its check of each scraper's
    certificate (validity, the CRL the gRPC port uses, ``metrics.allowed_identities``), or None for plain HTTP."""
    tls = settings.tls
    if not settings.metrics.tls or tls.cert is None or tls.key is None or tls.client_ca is None:
        return None
    crl = None if tls.crl is None else CrlStore(tls.crl, tls.client_ca, interval_s=tls.reload_interval_s)
    return MetricsTls(
        cert=str(tls.cert),
        key=str(tls.key),
        client_ca=str(tls.client_ca),
        admit=functools.partial(_admit_scraper, crl=crl, allowed=frozenset(settings.metrics.allowed_identities)),
        watched=() if crl is None else (crl,),
    )


def _admit_scraper(der: bytes, *, crl: CrlStore | None, allowed: frozenset[str]) -> str | None:
    """Why the client certificate ``der`` may not scrape, or None: the checks a gRPC call's certificate gets."""
    try:
        peer = inspect_peer(ssl.DER_cert_to_PEM_cert(der).encode("ascii"))
        check_validity(peer, datetime.now(UTC))
        if crl is not None:
            crl.check(peer)
    except AuthenticationError as exc:
        return exc.reason
    if allowed and peer.identity not in allowed:
        return "identity not allowed to scrape"
    return None


def metrics_limits(settings: Settings) -> ListenerLimits:
    """What peers may hold on the metrics listener."""
    metrics = settings.metrics
    return ListenerLimits(
        max_connections=metrics.max_connections,
        max_connections_per_source=metrics.max_connections_per_source,
        timeout_s=metrics.timeout_s,
    )


def _versions() -> dict[str, str]:
    """The versions ``gateway_build_info`` carries: the gateway's and those of what runs the calls."""
    import onnxruntime

    return {
        "version": package_version(),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _tracing(settings: Settings) -> Tracing:
    if not settings.tracing.enabled:
        return Tracing(None)
    try:
        tracing = from_environment()
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"tracing.enabled: OpenTelemetry is not installed (no module {exc.name!r}); pip install 'gateway[otel]'"
        ) from None
    log.info("tracing_enabled", **(tracing.destination or {}))
    return tracing


class Gateway:
    """The gateway process: every component, wired once, started and stopped together."""

    def __init__(self, settings: Settings, *, tracing: Tracing | None = None) -> None:
        """``tracing``: where call spans go; by default as ``settings.tracing`` and the ``OTEL_*`` variables say."""
        self.settings = settings
        self.tracing = tracing or _tracing(settings)
        self.port: int | None = None
        self._stopped = threading.Event()
        metered = self._metered = metrics_recording(settings.metrics.listen)
        models = settings.models
        self.placement = Placement(threads=models.run_threads, inline_max_s=models.inline_max_ms / 1000)
        self.models = ModelRepository(
            models.repository,
            options=RuntimeOptions(
                intra_op_threads=models.intra_op_threads,
                inter_op_threads=models.inter_op_threads,
                execution_mode=models.execution_mode,
                max_elements=models.max_elements,
                max_bytes_elements=models.max_bytes_elements,
                batching=models.batching,
                metered=metered,
                providers=models.provider_settings,
            ),
            placement=self.placement,
            poll_interval_s=models.poll_interval_s,
            strict=models.strict,
            signatures=models.signature_policy,
            max_version_bytes=models.max_version_bytes,
            routing=models.versions,
        )
        self.credentials = None if settings.dev_insecure_transport else ServerCredentials(settings.tls)
        self.policies = (
            None
            if settings.dev_no_auth
            else PolicyStore(settings.policies.directory, interval_s=settings.policies.reload_interval_s)
        )
        self.keys: KeyStore | RemoteKeyStore | None = None
        self.crl: CrlStore | None = None
        hmac_key_file = settings.audit.hmac_key_file
        hmac_key = read_secret(hmac_key_file, key="audit.hmac_key_file").strip() if hmac_key_file else None
        self.audit = AuditLog(
            settings.audit.path,
            fsync=cast(FsyncPolicy, settings.audit.fsync),  # one of FSYNC_POLICIES, checked by config
            hmac_key=hmac_key,
            max_bytes=settings.audit.max_bytes,
            chain_id=settings.audit.chain_id,
            dev_fail_open=settings.dev_audit_fail_open,
            metered=metered,
        )
        limits = settings.limits
        self.admission = Admission(max_concurrent_rpcs=limits.max_concurrent_rpcs, per_principal=limits.per_principal)
        self.boundary = CallBoundary(
            recorder=Recorder(self.audit, metered=metered, refusals=RefusalLimit(limits.per_principal)),
            authenticator=None if settings.dev_no_auth else self._authenticator(),
            admission=self.admission,
            limits=MessageLimits(
                max_message_bytes=limits.max_message_bytes,
                message_timeout_s=limits.message_timeout_s,
                stream_idle_timeout_s=limits.stream_idle_timeout_s,
                max_call_s=limits.max_call_s,
                max_stream_s=limits.max_stream_s,
            ),
            tracing=self.tracing,
            metered=metered,
        )
        self.backends = Fleet(
            settings.backends,
            max_elements=models.max_elements,
            max_bytes_elements=models.max_bytes_elements,
            metered=metered,
        )
        self.pipeline = Pipeline(
            models=self.models, policies=self.policies, before_run=self._audit_gate, routes=self.backends.routes
        )
        self.health = HealthServicer(self.ready, max_watches=limits.max_watch_streams)
        self.probe_health = HealthServicer(self.ready, max_watches=0)
        self._server: grpc.aio.Server | None = None
        self._probe: grpc.aio.Server | None = None
        self.probe_port: int | None = None
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self.metrics: MetricsListener | None = None
        self.rest = self._rest_listener()
        self.http_port: int | None = None

    def _rest_listener(self) -> RestListener | None:
        """The REST binding's listener (``http.listen``), served by the same boundary and pipeline as gRPC."""
        settings = self.settings
        if settings.http.listen is None or self.credentials is None:  # config refuses http with dev transport
            return None
        service = RestService(
            boundary=self.boundary,
            endpoints=RestEndpoints(self.pipeline),
            ready=self.ready,
            max_body_bytes=settings.limits.max_message_bytes,
        )
        return RestListener(
            settings.http,
            context=self.credentials.ssl_context,
            handle=service.handle,
            handshake_timeout_s=settings.limits.handshake_timeout_s,
            reuse_port=settings.workers > 1,
        )

    def _authenticator(self) -> Authenticator:
        settings = self.settings
        auth = settings.auth
        self.keys = self._key_source(auth)
        secret_file = auth.hmac_secret_file
        hmac_secret = read_secret(secret_file, key="auth.hmac_secret_file").strip() if secret_file else None
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
            hmac_secret=hmac_secret,
            cache_size=auth.token_cache_size,
        )
        if settings.tls.crl is not None and settings.tls.client_ca is not None:
            self.crl = CrlStore(settings.tls.crl, settings.tls.client_ca, interval_s=settings.tls.reload_interval_s)
        return Authenticator(verifier=verifier, crl=self.crl, require_certificate=not settings.dev_insecure_transport)

    @staticmethod
    def _key_source(auth: AuthSettings) -> KeyStore | RemoteKeyStore:
        """The JWKS file, or the issuer's key set over HTTPS (fetched now: a failure stops the start)."""
        if auth.jwks is not None:
            return KeyStore(auth.jwks, interval_s=auth.reload_interval_s, allowed_algorithms=auth.algorithms)
        if auth.jwks_url is None and not auth.discovery:
            raise ConfigError("auth.jwks: required to verify tokens")
        return RemoteKeyStore(
            url=auth.jwks_url,
            issuer=auth.issuer,
            ca=auth.jwks_ca,
            refresh_interval_s=auth.jwks_refresh_interval_s,
            min_refresh_interval_s=auth.jwks_min_refresh_interval_s,
            allowed_algorithms=auth.algorithms,
        )

    def _audit_gate(self) -> None:
        # No model runs while the audit sink is known to be down: its record could not be written.
        if not self.audit.healthy and not self.settings.dev_audit_fail_open:
            raise UnavailableError("audit trail unavailable", reason="audit sink unhealthy")

    def _warn_dev_options(self) -> None:
        for name in ("dev_insecure_transport", "dev_no_auth", "dev_audit_fail_open"):
            if getattr(self.settings, name):
                log.warning("dev_option_enabled", option=name, detail="development only: never in production")
        if self.settings.audit.hmac_key_file is None:
            log.warning(
                "audit_trail_unkeyed",
                path=str(self.settings.audit.path),
                detail="the hash chain proves order, not origin: whoever can write the file can rewrite it and "
                "recompute the chain; set audit.hmac_key_file (docs/audit.md)",
            )

    def _check_descriptor_budget(self, soft_limit: int) -> None:
        """Warn when the listeners' connection caps together could use up the descriptor limit: then a flood on
        one listener could still starve the others."""
        settings = self.settings
        caps = settings.limits.max_connections
        if settings.health.listen is not None:
            caps += settings.health.max_connections
        if settings.metrics.listen is not None:
            caps += settings.metrics.max_connections
        if settings.http.listen is not None:
            caps += settings.http.max_connections
        if caps + _DESCRIPTOR_MARGIN > soft_limit:
            log.warning(
                "descriptor_budget_exceeded",
                connection_caps=caps,
                margin=_DESCRIPTOR_MARGIN,
                open_files_limit=soft_limit,
                detail="lower limits.max_connections or raise the hard RLIMIT_NOFILE (ulimit -Hn)",
            )

    def _on_loop(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float | None = None) -> Any:
        if self._loop is None:
            raise RuntimeError("the gateway's event loop is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)

    def start(self) -> int:
        """Load everything, bind, start serving on a new event-loop thread; returns the bound port.

        The port is bound before the audit trail is opened, so that a port in use fails the start without
        creating or touching the trail, and served only once the trail is open, so that no call comes in
        before its record can be written.
        """
        self._warn_dev_options()
        self._check_descriptor_budget(raise_open_files_limit())
        self.models.load_all()
        self.backends.check_local(lambda name: self.models.info(name) is not None)
        loop = self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=loop.run_forever, name="gateway-loop", daemon=True)
        self._loop_thread.start()
        try:
            self._server, self.port = self._on_loop(self._bind())
            if self.settings.health.listen is not None:
                self._probe, self.probe_port = self._on_loop(self._bind_probe(self.settings.health.listen))
            if self.rest is not None:
                self.http_port = self.rest.bind()
                self.boundary.recorder.methods |= REST_METHOD_NAMES  # each a metric label, as gRPC's methods
            self._listen_for_metrics()
            self._on_loop(self.backends.start())  # one health poll each: a backend down does not stop the start
            self._open_audit()
            self._on_loop(self._serve(self._server, self._probe))
        except BaseException:
            for server in (self._server, self._probe):
                if server is not None:
                    self._on_loop(server.stop(0))
            if self.rest is not None:
                self._on_loop(self.rest.stop(0))
            self._on_loop(self.backends.close())
            self._server = self._probe = None
            if self.metrics is not None:
                self.metrics.stop()
                self.metrics = None
            self._close_loop()
            self.audit.close()
            raise
        for component in self._reloadable().values():
            component.start()
        log.info(
            "gateway_started",
            listen=self.settings.listen,
            port=self.port,
            mtls=self.credentials is not None,
            probe_port=self.probe_port,
            http_port=self.http_port,
        )
        return self.port

    def _open_audit(self) -> None:
        """Open the trail; a path the gateway cannot create or write is an error naming audit.path."""
        try:
            self.audit.open()
        except OSError as exc:
            path = exc.filename or self.settings.audit.path
            raise AuditError(f"audit.path: cannot open {path}: {exc.strerror or exc}") from None

    def _listen_for_metrics(self) -> None:
        """Bind ``metrics.listen``, if set, before the audit trail is opened (a port in use fails the start)."""
        listen = self.settings.metrics.listen
        if listen is not None:
            self.metrics = MetricsListener(
                listen, tls=metrics_tls(self.settings), source=registry(), limits=metrics_limits(self.settings)
            )
            log.info("metrics_listening", listen=listen, port=self.metrics.port, https=self.settings.metrics.tls)

    async def _bind(self) -> tuple[grpc.aio.Server, int]:
        """The server with every service, bound to the listen address but not serving yet, and its port."""
        server = grpc.aio.server(options=_grpc_options(self.settings))
        collector = HandlerCollector()
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.pipeline), collector)
        oip = OpenInferenceServicer(self.pipeline, ready=self.ready)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(oip, collector)
        names = (SERVICE_NAME, OIP_SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), collector)
        # Health answers with mutual TLS alone (balancers and kubelets carry no token): outside the boundary,
        # and before it, since the boundary's generic handler claims every other method name. Without a token it
        # gives the overall status only (gateway.health says why).
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_generic_rpc_handlers((self.boundary.generic_handler(collector.services),))
        if self._metered:
            methods = [f"/{service}/{name}" for service, handlers in collector.services.items() for name in handlers]
            if self.rest is not None:
                methods += sorted(REST_METHOD_NAMES)
            start_counting(methods=methods, versions=_versions(), backends=self.settings.backends)
        listen = self.settings.listen
        try:
            if self.credentials is None:
                return server, server.add_insecure_port(listen)
            return server, server.add_secure_port(listen, self.credentials.credentials())
        except RuntimeError:  # grpc's "Failed to bind to address": config.check_listen says why, where it runs
            raise listen_error(listen, "the address is in use or not one of this machine's") from None

    async def _bind_probe(self, listen: str) -> tuple[grpc.aio.Server, int]:
        """The plaintext probe listener: Health alone, for kubelet's gRPC probe, which cannot do TLS. Any address
        is allowed: it tells only SERVING or NOT_SERVING, the same answer the main port gives without a token."""
        health = self.settings.health
        idle_ms = int(health.max_connection_idle_s * 1000)
        options = [
            # A Check request is a service name: nothing bigger is needed from callers without any identity.
            ("grpc.max_receive_message_length", _PROBE_MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", int(self.settings.workers > 1)),
            # Callers with no identity: a few connections, a few calls each, closed once idle or old, so that a
            # flood of them holds a bounded number of descriptors and streams (issue 27).
            ("grpc.max_allowed_incoming_connections", health.max_connections),
            ("grpc.max_concurrent_streams", health.max_streams_per_connection),
            ("grpc.max_connection_idle_ms", idle_ms),
            ("grpc.server_handshake_timeout_ms", idle_ms),
            ("grpc.max_connection_age_ms", int(health.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", _PROBE_AGE_GRACE_MS),
        ]
        probe = grpc.aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(self.probe_health, probe)
        try:
            return probe, probe.add_insecure_port(listen)
        except RuntimeError:
            raise listen_error(
                listen, "the address is in use or not one of this machine's", key="health.listen"
            ) from None

    async def _serve(self, server: grpc.aio.Server, probe: grpc.aio.Server | None) -> None:
        await server.start()
        if probe is not None:
            await probe.start()
        if self.rest is not None:
            self.rest.start()

    def stop(self, grace_s: float | None = None) -> None:
        """Drain, then refuse new calls while those in flight finish within the grace period, then close the
        listener and flush the audit trail."""
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        log.info("gateway_stopping", drain_s=self.settings.shutdown_drain_s, grace_s=grace)
        # Bounded: grpcio's server shutdown has been seen (rarely) to block the loop thread for good; the process
        # must still flush and close its audit trail then.
        bound = self.settings.shutdown_drain_s + grace + _RECORDS_WAIT_S + _STOP_MARGIN_S
        try:
            self._on_loop(self._shutdown(self._server, grace), bound)
        except TimeoutError:
            log.error("gateway_stop_timed_out", waited_s=bound, detail="the grpc server did not stop in time")
        for component in reversed(self._reloadable().values()):
            component.stop()
        with contextlib.suppress(TimeoutError):  # a backend channel that will not close holds no record back
            self._on_loop(self.backends.close(), _STOP_MARGIN_S)
        if self.metrics is not None:
            self.metrics.stop()
        self.placement.close()
        self.audit.close()  # while the loop still runs: records it commits wake their (cancelled) callers there
        self._close_loop()
        self.tracing.shutdown()
        log.info("gateway_stopped")

    def _reloadable(self) -> dict[str, Reloadable]:
        """What is read from files and reloaded, by name, in start order."""
        components: dict[str, Reloadable | None] = {
            "models": self.models,
            "policies": self.policies,
            "jwks": self.keys,
            "crl": self.crl,
            "certificates": self.credentials,
        }
        return {name: component for name, component in components.items() if component is not None}

    def reload(self) -> None:
        """Re-read every file now (SIGHUP) instead of at the next poll; each store logs what it changed."""
        changed = [name for name, component in self._reloadable().items() if component.reload_now()]
        log.info("gateway_reloaded", changed=changed)

    def ready(self) -> bool:
        """Serving inference now: started, not draining, audit trail writable, at least one model loaded or a
        backend configured, every ``required`` backend up. The one definition: health (both ports) and
        ServerReady answer with it. The key set needs no check: a JWKS without keys is refused at start and on
        every reload, so one is always present."""
        audit_ok = self.audit.healthy or self.settings.dev_audit_fail_open
        started = self._server is not None and not self._draining
        serving = bool(self.models.models()) or bool(self.settings.backends)
        return started and audit_ok and serving and self.backends.ready()

    async def _shutdown(self, server: grpc.aio.Server, grace_s: float) -> None:
        # Draining: health says NOT_SERVING while calls are still accepted, so that balancers checking health stop
        # sending new calls before the listener closes.
        self._draining = True
        await asyncio.sleep(self.settings.shutdown_drain_s)
        # Then new calls are refused (UNAVAILABLE, safe to retry) while the listener and connections stay open
        # until the calls in flight are done and their answers on their way: grpc closes each connection as soon
        # as its last call ends, and a close while an answer is still being read resets the connection and loses
        # the answer (docs/deploy.md, "Termination"). Stopping only then lets grpc's GOAWAY ping round trip
        # follow the answers out.
        self.boundary.close()
        loop = asyncio.get_running_loop()
        until = loop.time() + grace_s
        await self.boundary.wait_delivered(grace_s, _ANSWER_FLUSH_S)
        if self.rest is not None:
            await self.rest.stop(max(0.0, until - loop.time()))
        await server.stop(max(0.0, until - loop.time()))
        if self._probe is not None:  # answering NOT_SERVING to the end
            await self._probe.stop(0)
        # Calls cut off at the end of the grace period are still recording their outcome: wait for them, so that
        # the audit log closes after their records.
        if not await self.boundary.wait_idle(_RECORDS_WAIT_S):
            log.error("gateway_stopped_with_calls_unrecorded", detail="handlers still running after the grace period")

    def _close_loop(self) -> None:
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):  # generators still open are closed in their own context, not by GC
            asyncio.run_coroutine_threadsafe(loop.shutdown_asyncgens(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_STOP_MARGIN_S)
        self._loop = self._loop_thread = None
        if thread.is_alive():  # stuck in grpcio (see stop): a daemon thread, left to end with the process
            log.error("gateway_loop_stuck", detail="the event loop thread did not stop")
            return
        loop.close()

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then shut down gracefully; reload on SIGHUP."""
        received = catch_signals()
        self.start()
        while True:
            while not received:
                time.sleep(_SIGNAL_POLL_S)
            signum = received.pop(0)
            log.info("signal_received", signal=signal.Signals(signum).name)
            if signum != signal.SIGHUP:
                break
            self.reload()
        self.stop()
