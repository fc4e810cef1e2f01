"""Typed settings from ``gateway.yaml``, ``GATEWAY_*`` environment variables and ``gateway serve`` flags; every
error names the bad key, variable or flag.

Precedence, in ``load_settings`` only: CLI flag > environment > file > default. The file is the one named by
``--config``, else ``./gateway.yaml`` when it exists (``default_config_file``), else none. Relative paths in the file
are relative to the file's folder; relative paths from flags and variables are relative to the working directory.
Each setting's variable is ``GATEWAY_`` + its dotted key upper-cased with ``.`` -> ``__`` (``environment_variable``),
derived from the dataclasses below, so a new setting has its variable without more code; an unknown ``GATEWAY_*``
variable is an error, except the client commands' own (``gateway/cli.py`` passes them as ``ignored``). With
``tracing.enabled``, OpenTelemetry also reads the standard ``OTEL_*`` variables (docs/tracing.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import ipaddress
import math
import os
import socket
import stat
import types
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.audit.chain import validate_chain_id, worker_chain_id, worker_path
from gateway.auth import (
    DEFAULT_ALGORITHMS,
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    HMAC_ALGORITHMS,
    MAX_TOKEN_BYTES,
    SUPPORTED_ALGORITHMS,
    https_url_problem,
)
from gateway.auth.principal import identity_spelling_problem
from gateway.document import DocumentError, did_you_mean, loads_json, read_yaml
from gateway.errors import StartupError
from gateway.identifiers import NAME
from gateway.limits import PrincipalLimits
from gateway.models import providers as execution_providers
from gateway.models.batching import BatchingOptions
from gateway.models.providers import ProviderSettings
from gateway.models.routing import VersionRouting
from gateway.models.signature import (
    DEFAULT_MAX_VERSION_BYTES,
    SignaturePolicy,
    SignatureTrust,
    signer_spelling_problem,
)
from gateway.models.signature import MODES as SIGNATURE_MODES

DEFAULT_CONFIG = Path("gateway.yaml")
MIB = 1024 * 1024
MAX_MESSAGE_BYTES = 2**30 - 1  # twice this still fits grpc's 32-bit limit options
# How to give the material mutual TLS and tokens need, for the errors that say it is missing.
_MATERIAL_HINT = (
    "give --certs DIR (a folder written by scripts/gen_certs.sh) or set {key} in the config file "
    "(--config FILE; ./gateway.yaml is read when it exists)"
)


class ConfigError(StartupError):
    """A bad configuration file, value or flag; the message names the key. Exit code 2."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Server certificate, client CA (mutual TLS is always on outside dev mode), CRL and rotation."""

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    crl: Path | None = None
    # Names a rotated server certificate must still cover before it is swapped in.
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    reload_interval_s: float = 5.0


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """JWT verification (RFC 7519) with keys from exactly one of: a JWKS file, a JWKS URL, or OIDC Discovery."""

    jwks: Path | None = None
    jwks_url: str | None = None  # https only
    discovery: bool = False  # the jwks_uri of ISSUER/.well-known/openid-configuration
    jwks_ca: Path | None = None  # PEM bundle the key server's certificate must chain to; default: system store
    jwks_refresh_interval_s: float = 300.0
    jwks_min_refresh_interval_s: float = 30.0  # at most one refetch per this for tokens with an unknown kid
    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_s: float = 30.0
    max_token_lifetime_s: float = 86400.0
    required_claims: tuple[str, ...] = ("exp", "iss", "aud", "sub")
    groups_claim: str = "groups"
    scopes_claim: str = "scope"
    hmac_secret_file: Path | None = None
    token_cache_size: int = 10000
    reload_interval_s: float = 5.0


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Where the authorization policy files live."""

    directory: Path = Path("policies")
    reload_interval_s: float = 2.0


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """The model repository and ONNX Runtime options."""

    repository: Path = Path("models")
    # A version that fails to load at start is logged and left out, the rest served; strict makes it stop the start.
    strict: bool = False
    poll_interval_s: float = 2.0
    intra_op_threads: int = 1  # per session; 0 lets ONNX Runtime choose (a pool as large as the machine)
    inter_op_threads: int = 1  # only with execution_mode: parallel
    execution_mode: str = "sequential"
    max_elements: int = 16 * MIB
    # BYTES tensors hold fewer: each element becomes a Python str (~60 bytes), decoded one by one.
    max_bytes_elements: int = MIB
    # Runs predicted to take at most this long run inline on the event loop; longer ones on run_threads threads
    # (gateway/models/placement.py). 0 sends every run to the pool.
    inline_max_ms: float = 1.0
    run_threads: int = 2
    # Dynamic batching by model name, off for every model not named: see docs/performance.md for when it pays.
    batching: Mapping[str, BatchingOptions] = field(default_factory=dict)
    # OpenSSF model signatures (docs/model-signing.md): off | warn (verify, log, count, serve) | required (a version
    # without a valid model.sig is not loaded; the last good load keeps serving). Per model: signatures_by_model.
    signatures: str = "off"
    signatures_by_model: Mapping[str, str] = field(default_factory=dict)
    signature_trust: SignatureTrust = field(default_factory=SignatureTrust)
    # ONNX Runtime execution providers, tried in this order (docs/providers.md): CUDA, TensorRT, OpenVINO, CPU...
    providers: tuple[str, ...] = ("CPU",)
    providers_by_model: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # by provider: {CUDA: {...}}
    # False: a listed provider this ONNX Runtime lacks stops the start; true: it is skipped, with a log line.
    provider_fallback: bool = False
    # Per model: a pinned default version and a canary share for requests that name no version (docs/versions.md).
    versions: Mapping[str, VersionRouting] = field(default_factory=dict)
    # Each load copies the version folder privately (verified and loaded from the copy): at most this many bytes.
    max_version_bytes: int = DEFAULT_MAX_VERSION_BYTES

    @property
    def provider_settings(self) -> ProviderSettings:
        """The execution providers each model's sessions ask for."""
        return ProviderSettings(
            self.providers, dict(self.providers_by_model), dict(self.provider_options), self.provider_fallback
        )

    @property
    def signature_policy(self) -> SignaturePolicy:
        """What the model repository verifies."""
        return SignaturePolicy(self.signatures, dict(self.signatures_by_model), self.signature_trust)


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The tamper-evident audit trail."""

    path: Path = Path("var/audit/audit.log")
    fsync: str = "batch"
    hmac_key_file: Path | None = None
    max_bytes: int = 64 * MIB
    chain_id: str = "main"  # with workers, each worker's chain is <chain_id>-w<index>, in <stem>-w<index><suffix>


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Sizes and concurrency."""

    max_message_bytes: int = 64 * MIB
    # Well above the 8 KiB bearer-token limit, so an oversized token is refused (and audited) by the gateway,
    # not by grpc core, which refuses metadata over this before any Python code sees the call.
    max_metadata_bytes: int = 64 * 1024
    max_concurrent_rpcs: int = 512  # calls in flight on the server, streams included
    per_principal: PrincipalLimits = field(default_factory=PrincipalLimits)
    # The call boundary reads a unary request, and each message of a stream, with a bounded wait.
    message_timeout_s: float = 5.0
    stream_idle_timeout_s: float = 300.0
    # The longest a call (unary response), or a stream, may last from its start, whatever its pace; past it,
    # DEADLINE_EXCEEDED (issue 27, E11: a stream sending just under the idle timeout would otherwise never end).
    max_call_s: float = 60.0
    max_stream_s: float = 3600.0
    max_streams_per_connection: int = 100  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS
    # Connections that never send a ClientHello hold a descriptor each until this: short, so that a trickle of
    # them cannot keep the port's connection cap full (a full TLS 1.3 handshake is one round trip).
    handshake_timeout_s: float = 5.0
    # Connections open on the main port at once, TLS handshakes in progress included; past it grpc closes new
    # ones at accept. Below the descriptor limit, so that a flood fills this cap, not the process's table.
    max_connections: int = 1000
    max_watch_streams: int = 100  # grpc.health.v1 Watch streams open at once; past it, RESOURCE_EXHAUSTED


@dataclass(frozen=True, slots=True)
class KeepaliveSettings:
    """HTTP/2 keepalive and connection age (connections must not outlive certificate rotation forever)."""

    time_s: float = 60.0
    timeout_s: float = 20.0
    permit_without_calls: bool = False
    min_ping_interval_s: float = 10.0
    max_connection_age_s: float = 3600.0
    max_connection_age_grace_s: float = 30.0
    # A connection with no call open for this long is closed (GOAWAY); clients reconnect when they next call.
    max_connection_idle_s: float = 300.0


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    """The Prometheus listener (docs/operations.md): off unless ``listen`` is set."""

    listen: str | None = None  # HOST:PORT
    tls: bool = False  # HTTPS with the server certificate; clients need a certificate signed by tls.client_ca
    # Client-certificate identities allowed to scrape, typed as in policies (spiffe://..., dns:NAME, cn:NAME);
    # empty: any certificate the client CA signed and the CRL does not revoke. Needs tls.
    allowed_identities: tuple[str, ...] = ()
    max_connections: int = 16  # open at once; past it a new connection is closed at once
    max_connections_per_source: int = 4  # from one client address
    timeout_s: float = 10.0  # for the TLS handshake, then for each read and write of the request and response


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """OpenTelemetry tracing (the ``gateway[otel]`` extra); where spans go is set by ``OTEL_*`` variables."""

    enabled: bool = False


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """The plaintext probe listener (kubelet, load balancers): ``grpc.health.v1.Health``, overall status only."""

    listen: str | None = None  # HOST:PORT; off unless set
    # Anyone who can reach the port may connect, with no identity: every resource is capped, and Watch (a stream
    # held open for good) is not served here; kubelet's probe and grpc_health_probe use Check.
    max_connections: int = 64
    max_streams_per_connection: int = 4
    max_connection_idle_s: float = 5.0  # a connection with no call open (or that never sent one) is closed then
    max_connection_age_s: float = 60.0


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The Open Inference Protocol's REST binding (docs/rest.md): HTTPS with the main port's certificate, client CA
    and CRL, a client certificate required; off unless ``listen`` is set. Bodies are held to
    ``limits.max_message_bytes`` and read within ``limits.message_timeout_s``."""

    listen: str | None = None  # HOST:PORT
    max_connections: int = 1000  # open at once, TLS handshakes in progress included; past it closed at accept
    # A connection must send a complete request head within this of its start or of its last answer (slow headers
    # and idle keep-alive connections are closed).
    idle_timeout_s: float = 10.0
    # The longest request line or header field (the bearer token's 8 KiB fits); past it, 431 or 400 from aiohttp.
    max_header_bytes: int = 16 * 1024


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """A remote Open Inference Protocol gRPC server (MLServer, KServe, Triton, another gateway) that serves some
    models for the gateway, behind its boundary, policies and audit trail (docs/backends.md)."""

    addresses: tuple[str, ...] = ()  # HOST:PORT, one or more: calls go round robin over those that are up
    # Mutual TLS by default: the backend's CA, and the gateway's own client certificate and key towards it.
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None  # the name the backend's certificate must carry, when not the address's host
    # A bearer token the gateway sends as its own (a backend that is another gateway wants one bound to ``cert``).
    # The caller's token is never forwarded: it is bound to the caller's certificate (RFC 8705), not the gateway's.
    token_file: Path | None = None
    # Plaintext, only where every address is loopback (a sidecar in the same pod): logged at WARNING on every start.
    plaintext: bool = False
    deadline_s: float = 30.0  # each call to the backend (at most limits.max_call_s)
    max_in_flight: int = 64  # calls open at once; past it, RESOURCE_EXHAUSTED without sending
    max_message_bytes: int = 64 * MIB  # each way; a larger answer is refused (RESOURCE_EXHAUSTED)
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    health_interval_s: float = 5.0  # ServerReady, metadata of the routed models, RepositoryIndex for patterns
    required: bool = False  # the gateway is not ready while this backend is down
    # Gateway model name -> the backend's model name; and globs of names served under the same name, found in the
    # backend's RepositoryIndex at each health poll.
    models: Mapping[str, str] = field(default_factory=dict)
    model_patterns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    """Every option of ``gateway serve``."""

    listen: str = "127.0.0.1:50051"
    workers: int = 1  # processes sharing the port (SO_REUSEPORT), each with its own audit chain
    shutdown_drain_s: float = 1.0  # NOT_SERVING but still serving, so health-checking balancers move away first
    shutdown_grace_s: float = 10.0
    log_format: str = "json"
    log_level: str = "info"
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    policies: PolicySettings = field(default_factory=PolicySettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    keepalive: KeepaliveSettings = field(default_factory=KeepaliveSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    # Remote Open Inference Protocol servers by name, and the models they serve (docs/backends.md).
    backends: Mapping[str, BackendSettings] = field(default_factory=dict)
    # Development only, each logged at WARNING on every start.
    dev_insecure_transport: bool = False  # plaintext, and only on a loopback address
    dev_no_auth: bool = False  # no token, no policy: every call is allowed; only on a loopback address
    dev_audit_fail_open: bool = False  # serve even when the audit record cannot be written

    @property
    def host_port(self) -> tuple[str, int]:
        """The listen address split into host and port."""
        return _split_listen(self.listen)


CHOICES = {
    "audit.fsync": ("none", "batch", "always"),
    "models.execution_mode": ("sequential", "parallel"),
    "models.signatures": SIGNATURE_MODES,
    "log_format": ("json", "console"),
    "log_level": ("debug", "info", "warning", "error"),
}


def _split_listen(listen: str, key: str = "listen") -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host or not 0 <= int(port) <= 65535:
        example = listen.strip() if listen.strip().isdigit() else "8081"
        raise ConfigError(
            f"{key}: {listen!r} is not HOST:PORT: write 127.0.0.1:{example} (this machine only) or "
            f"0.0.0.0:{example} (every interface)"
        )
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _convert(value: Any, annotation: Any, key: str, base: Path) -> Any:
    """One value checked against its field's type; paths resolved against ``base``."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        (inner,) = (arg for arg in typing.get_args(annotation) if arg is not type(None))
        return _convert(value, inner, key, base)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key, base)
    if origin is Mapping:
        if not isinstance(value, dict) or not all(isinstance(name, str) and name for name in value):
            raise ConfigError(f"{key}: expected a mapping of names, got {value!r}")
        _, inner = typing.get_args(annotation)
        return {name: _convert(item, inner, f"{key}.{name}", base) for name, item in value.items()}
    if annotation is Path:
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        path = Path(value)
        return path if path.is_absolute() else base / path
    if origin is tuple:
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{key}: expected a non-negative integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            raise ConfigError(f"{key}: expected a non-negative number, got {value!r}")
        return float(value)
    if annotation is str:
        if (
            key.startswith("models.provider_options.")
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ):
            value = str(value)  # ONNX Runtime takes every provider option as text: device_id: 0 means "0"
        if value is False and ("off" in CHOICES.get(key, ()) or key.startswith("models.signatures_by_model.")):
            value = "off"  # YAML 1.1 reads a bare `off` as false: `signatures: off` means the word
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(CHOICES[key])}")
        return value
    raise ConfigError(f"{key}: unsupported setting type")  # pragma: no cover - a programming error


def _build(cls: Any, data: Any, prefix: str, base: Path) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown key{did_you_mean(key, names)}")
    values = {
        name: _convert(value, hints[name], f"{prefix}.{name}" if prefix else name, base) for name, value in data.items()
    }
    return cls(**values)


def _merge(into: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = into
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{part}: expected a mapping")
    node[leaf] = value


def certs_dir_overrides(directory: Path) -> dict[str, Any]:
    """The settings the server folder of ``scripts/gen_certs.sh`` provides (``--certs DIR``).

    A folder that also holds signing keys is refused: the gateway never needs them, so it must not be handed them.
    """
    if not directory.is_dir():
        raise ConfigError(f"--certs: {directory} is not a directory")
    if not (directory / "server.crt").exists() and (directory / "server").is_dir():
        raise ConfigError(
            f"--certs: {directory} holds the whole set; give the gateway its own: --certs {directory}/server"
        )
    if not (directory / "server.crt").exists():
        kind = _certs_folder_kind(directory)
        if kind is not None:
            server = next((d for d in (directory.parent, directory.parent.parent) if (d / "server").is_dir()), None)
            where = f"--certs {server / 'server'}" if server is not None else "the server folder gen_certs.sh wrote"
            raise ConfigError(f"--certs: {directory} is {kind}; give the gateway's own folder: {where}")
    for name in ("ca.key", "jwt-signing.key", "model-signing.key"):
        if (directory / name).exists():
            raise ConfigError(
                f"--certs: {directory} holds {name}, a signing key the gateway never needs; move it out "
                "(scripts/gen_certs.sh keeps signing keys in signing/, apart from the server's folder)"
            )
    overrides: dict[str, Any] = {
        "tls.cert": directory / "server.crt",
        "tls.key": directory / "server.key",
        "tls.client_ca": directory / "ca.crt",
        "auth.jwks": directory / "jwks.json",
    }
    if (directory / "crl.pem").exists():
        overrides["tls.crl"] = directory / "crl.pem"
    if (directory / "audit-hmac.key").exists():
        overrides["audit.hmac_key_file"] = directory / "audit-hmac.key"
    return overrides


def _certs_folder_kind(directory: Path) -> str | None:
    """What a folder of scripts/gen_certs.sh that is not the server's is for, or None."""
    if (directory / "jwt-signing.key").exists() or (directory / "ca.key").exists():
        return "the signing folder (the CA and the token signing key, for gateway token issue --key)"
    if (directory / f"{directory.name}.crt").exists() and (directory / f"{directory.name}.key").exists():
        return f"the client folder of {directory.name} (for the client commands' --ca, --cert and --key)"
    return None


def default_config_file() -> Path | None:
    """``./gateway.yaml`` when it exists: the file ``--config`` defaults to."""
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _read_file(config: Path | None) -> tuple[dict[str, Any], Path]:
    """The file's settings as parsed (empty without a file), and the folder its relative paths start from."""
    if config is None:
        return {}, Path.cwd()
    try:
        loaded = read_yaml(config)
    except DocumentError as exc:
        raise ConfigError(str(exc)) from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{config}: expected a mapping at the top level")
    return loaded or {}, config.parent.resolve()


ENV_PREFIX = "GATEWAY_"


def environment_variable(key: str) -> str:
    """A setting's variable: ``GATEWAY_LIMITS__PER_PRINCIPAL__MAX_IN_FLIGHT`` for
    ``limits.per_principal.max_in_flight``."""
    return ENV_PREFIX + key.upper().replace(".", "__")


def setting_types(cls: Any = Settings, prefix: str = "") -> dict[str, Any]:
    """Every settings key with its type: sections recurse; a mapping keyed by names (``models.batching``) is one key."""
    found: dict[str, Any] = {}
    for name, annotation in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(annotation):
            found.update(setting_types(annotation, f"{key}."))
        else:
            found[key] = annotation
    return found


def environment_settings(environ: Mapping[str, str], ignored: Collection[str] = ()) -> dict[str, Any]:
    """The settings ``GATEWAY_*`` variables give (dotted key -> value as a YAML file would give it; ``load_settings``
    checks it). Any other ``GATEWAY_*`` variable that is not in ``ignored`` is an error naming it."""
    by_variable = {environment_variable(key): (key, kind) for key, kind in setting_types().items()}
    found: dict[str, Any] = {}
    unknown: list[str] = []
    for variable, text in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or variable in ignored:
            continue
        if variable not in by_variable:
            unknown.append(variable + did_you_mean(variable, by_variable, ENV_PREFIX))
            continue
        key, kind = by_variable[variable]
        found[key] = _from_text(text, kind, variable)
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise ConfigError(f"{', '.join(unknown)}: unknown environment variable{plural} (docs/deploy.md lists them)")
    return found


def _from_text(text: str, annotation: Any, variable: str) -> Any:
    """A variable's text as the value a YAML file would hold; text that is not of the type is passed on as is, for
    ``_convert`` to refuse with the same message a file's bad value gets."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        (annotation,) = (arg for arg in typing.get_args(annotation) if arg is not type(None))
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {"true": True, "false": False}.get(text, text)
    if annotation is int:
        return int(text) if text.isascii() and text.isdigit() else text
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            return text
    if origin is tuple:  # comma-separated; items are names, which never hold a comma
        return [item.strip() for item in text.split(",")] if text else []
    if origin is Mapping:  # keyed by names a variable's name cannot spell (model names): a JSON object
        try:
            return loads_json(text)
        except DocumentError as exc:
            raise ConfigError(f"{variable}: {exc}") from None
    if annotation is Path and text:
        return Path.cwd() / text  # like a flag's: relative to the working directory
    return text


def file_settings(config: Path | None, environment: Mapping[str, Any] | None = None) -> Settings:
    """The settings of a file and the environment (``environment_settings``), each value checked but not the rules
    across them that only ``serve`` needs (TLS material, for one): ``gateway token issue`` reads its ``auth``."""
    return _settings(config, {}, environment or {}, cross_checked=False)


def load_settings(
    config: Path | None, overrides: dict[str, Any] | None = None, environment: Mapping[str, Any] | None = None
) -> Settings:
    """Settings from the file (if any), then the environment (``environment_settings``), then flag overrides
    (dotted keys), each on top of the one before, validated."""
    return _settings(config, overrides or {}, environment or {}, cross_checked=True)


def _settings(
    config: Path | None, flags: Mapping[str, Any], environment: Mapping[str, Any], *, cross_checked: bool
) -> Settings:
    data, base = _read_file(config)
    for dotted, value in environment.items():
        _merge(data, dotted, value)
    for dotted, value in flags.items():
        # Flag paths are relative to the working directory; only the file's own paths use its folder.
        _merge(data, dotted, Path.cwd() / value if isinstance(value, Path) else value)
    try:
        settings = _build(Settings, data, "", base)
        if cross_checked:
            validate(settings)
    except ConfigError as exc:
        raise ConfigError(attributed(str(exc), config, flags, environment)) from None
    return settings


def attributed(message: str, config: Path | None, flags: Mapping[str, Any], environment: Mapping[str, Any]) -> str:
    """Every message starts with its key; say where the value came from: a flag's key stays, a variable's key
    becomes the variable, and the file (when given) is named before a key it set."""
    key = message.partition(":")[0]
    if key in flags:
        return message
    given = next((name for name in environment if key == name or key.startswith(f"{name}.")), None)
    if given is not None:
        variable = environment_variable(given)
        return variable + message[len(key) :] if key == given else f"{variable}: {message}"
    return f"{config}: {message}" if config else message


def for_worker(settings: Settings, index: int) -> Settings:
    """The settings of worker ``index`` of several: its own audit file and chain, no metrics listener (the
    supervisor serves every worker's metrics), the rest shared."""
    audit = dataclasses.replace(
        settings.audit,
        path=worker_path(settings.audit.path, index),
        chain_id=worker_chain_id(settings.audit.chain_id, index),
    )
    return dataclasses.replace(settings, audit=audit, metrics=MetricsSettings())


def check_paths(settings: Settings) -> None:
    """Every configured file and folder exists, so that a typo is a startup error naming its key (exit 2).

    Apart from ``validate`` because it reads the disk: settings can be built and checked anywhere else.
    """
    files = {
        "tls.cert": settings.tls.cert,
        "tls.key": settings.tls.key,
        "tls.client_ca": settings.tls.client_ca,
        "tls.crl": settings.tls.crl,
        "auth.jwks": settings.auth.jwks,
        "auth.hmac_secret_file": settings.auth.hmac_secret_file,
        "auth.jwks_ca": settings.auth.jwks_ca,
        "audit.hmac_key_file": settings.audit.hmac_key_file,
    }
    if settings.models.signature_policy.used:
        trust = settings.models.signature_trust
        files["models.signature_trust.public_key"] = trust.public_key
        files["models.signature_trust.certificate_chain"] = trust.certificate_chain
    for name, backend in settings.backends.items():
        for material in ("ca", "cert", "key", "token_file"):
            files[f"backends.{name}.{material}"] = getattr(backend, material)
    if settings.dev_insecure_transport:
        files = {key: path for key, path in files.items() if not key.startswith("tls.")}
    if settings.dev_no_auth:
        files = {key: path for key, path in files.items() if not key.startswith("auth.")}
    for key, path in files.items():
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}: {path} is not a readable file")
    folders = {"models.repository": settings.models.repository}
    if not settings.dev_no_auth:
        folders["policies.directory"] = settings.policies.directory
    for key, path in folders.items():
        if not path.is_dir():
            raise ConfigError(f"{key}: {path} is not a directory")


def read_secret(path: Path, *, key: str) -> bytes:
    """A private key or secret the server reads, refused unless it is its owner's alone (``_check_private``)."""
    try:
        with path.open("rb") as file:
            _check_private(os.fstat(file.fileno()), path, key)  # the file as opened: no swap between check and read
            return file.read()
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: cannot read: {exc.strerror or exc}") from None


def _check_private(info: os.stat_result, path: Path, key: str) -> None:
    """No access for group or others, and owned by the gateway's user or root: any other owner could rewrite the
    file or open its mode at any time."""
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigError(f"{key}: {path} is accessible to group or others (mode {mode:04o}); run: chmod 600 {path}")
    if info.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"{key}: {path} is owned by uid {info.st_uid}, not by the gateway's user (uid {os.geteuid()}) or root; "
            f"run: chown {os.geteuid()} {path}"
        )


def listen_error(listen: str, reason: str, *, key: str = "listen") -> ConfigError:
    """The error for a listen address that cannot be bound, saying what to change and where."""
    where = "--listen HOST:PORT or listen" if key == "listen" else key
    return ConfigError(
        f"{key}: cannot listen on {listen}: {reason}; choose another address with {where} in the config file"
    )


def check_listen(settings: Settings) -> None:
    """The listen address can be bound now: a port in use is a startup error naming it (exit 2), found before
    the audit trail is opened. grpc's own bind failure only says that binding failed (the server raises the
    same error for it), and logs its reason to stderr in grpc's format first.
    """
    host, port = settings.host_port
    reuse_port = settings.workers > 1
    problem = _bind_problem(host, port, reuse_port=reuse_port)
    if problem is not None:
        raise listen_error(settings.listen, problem)
    for key, other in (("health.listen", settings.health.listen), ("http.listen", settings.http.listen)):
        if other is not None:
            problem = _bind_problem(*_split_listen(other, key), reuse_port=reuse_port)
            if problem is not None:
                raise listen_error(other, problem, key=key)


def _bind_problem(host: str, port: int, *, reuse_port: bool) -> str | None:
    """Why no address of ``host`` can take ``port`` now (None: one can; like grpc, one is enough)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r} ({exc.strerror})"
    problem = "no address to bind"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # The options grpc binds with: SO_REUSEADDR always, SO_REUSEPORT when workers share the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                problem = exc.strerror or str(exc)
                continue
        return None
    return problem


def validate(settings: Settings) -> None:
    """Cross-field rules: secure by default, dev options only where they are safe."""
    host, port = settings.host_port
    if not 1 <= settings.workers <= 64:
        raise ConfigError("workers: must be between 1 and 64")
    if settings.workers > 1 and port == 0:
        raise ConfigError("workers: several workers share one port, so listen needs a fixed port, not 0")
    _validate_probe(settings)
    _validate_http(settings)
    try:
        validate_chain_id(settings.audit.chain_id)
    except ValueError as exc:
        raise ConfigError(f"audit.chain_id: {exc}") from None
    # Each opens the gateway to any caller that can reach the port (or serves them unrecorded, which is as open):
    # only this machine may, whichever source (file, GATEWAY_* variable, --dev flag) set it.
    for option in ("dev_insecure_transport", "dev_no_auth", "dev_audit_fail_open"):
        if getattr(settings, option) and not _is_loopback(host):
            raise ConfigError(f"{option}: only allowed on a loopback address, not {host!r}")
    if not settings.dev_insecure_transport:
        for name in ("cert", "key", "client_ca"):
            if getattr(settings.tls, name) is None:
                key = f"tls.{name}"
                raise ConfigError(f"{key}: required for mutual TLS; {_MATERIAL_HINT.format(key=key)}")
    if settings.metrics.listen is not None:
        try:
            _split_listen(settings.metrics.listen)
        except ConfigError as exc:
            raise ConfigError(f"metrics.{exc}") from None
    if settings.metrics.tls and settings.dev_insecure_transport:
        raise ConfigError("metrics.tls: needs tls.cert, tls.key and tls.client_ca, which dev_insecure_transport skips")
    if not settings.dev_no_auth:
        _validate_key_source(settings.auth)
    for model, batching in settings.models.batching.items():
        if not 2 <= batching.max_batch_size <= 4096:
            raise ConfigError(f"models.batching.{model}.max_batch_size: must be between 2 and 4096")
        if batching.max_queue_delay_us > 1_000_000:
            raise ConfigError(f"models.batching.{model}.max_queue_delay_us: at most 1000000 (one second)")
    limits = settings.limits
    if limits.max_metadata_bytes < 2 * MAX_TOKEN_BYTES:
        raise ConfigError(f"limits.max_metadata_bytes: at least {2 * MAX_TOKEN_BYTES}, twice the bearer-token limit")
    for name in ("max_message_bytes", "max_metadata_bytes", "max_concurrent_rpcs", "max_streams_per_connection"):
        if getattr(limits, name) < 1:
            raise ConfigError(f"limits.{name}: must be at least 1")
    # grpc takes these as 32-bit ints, and the receive limit it is given is twice ours (gateway/server.py).
    if limits.max_message_bytes > MAX_MESSAGE_BYTES:
        raise ConfigError(f"limits.max_message_bytes: at most {MAX_MESSAGE_BYTES} (1 GiB - 1, grpc's own bound)")
    if limits.max_metadata_bytes > 2**31 - 1:
        raise ConfigError(f"limits.max_metadata_bytes: at most {2**31 - 1} (grpc's own bound)")
    for name in ("max_in_flight", "max_streams"):
        if getattr(limits.per_principal, name) < 1:
            raise ConfigError(f"limits.per_principal.{name}: must be at least 1")
    if limits.per_principal.max_refusals < 0:
        raise ConfigError("limits.per_principal.max_refusals: must be at least 0 (0: no limit)")
    for name in ("refusal_window_s", "refusal_block_s"):
        if getattr(limits.per_principal, name) <= 0:
            raise ConfigError(f"limits.per_principal.{name}: must be more than 0")
    for name in ("message_timeout_s", "stream_idle_timeout_s", "handshake_timeout_s", "max_call_s", "max_stream_s"):
        if getattr(limits, name) <= 0:
            raise ConfigError(f"limits.{name}: must be more than 0")
    _validate_connection_limits(settings)
    if settings.models.run_threads < 1:
        raise ConfigError("models.run_threads: must be at least 1")
    _validate_versions(settings.models.versions)
    _validate_providers(settings.models)
    if settings.models.max_version_bytes < 1:
        raise ConfigError("models.max_version_bytes: must be at least 1")
    _validate_signatures(settings.models)
    _validate_backends(settings)
    algorithms = set(settings.auth.algorithms)
    unknown = algorithms - SUPPORTED_ALGORITHMS
    if unknown:  # "none" among them: an unsigned token is never acceptable (RFC 8725 3.1)
        raise ConfigError(f"auth.algorithms: unsupported {sorted(unknown)}")
    if algorithms & HMAC_ALGORITHMS and settings.auth.hmac_secret_file is None:
        raise ConfigError(f"auth.algorithms: {sorted(algorithms & HMAC_ALGORITHMS)} need auth.hmac_secret_file")
    if settings.auth.hmac_secret_file is not None and not algorithms & HMAC_ALGORITHMS:
        raise ConfigError("auth.hmac_secret_file: set, but auth.algorithms lists no HS256, HS384 or HS512")


def _validate_providers(models: ModelSettings) -> None:
    """Known provider names, each once per list; then, unless every model asks for CPU only, the installed ONNX
    Runtime must offer them (or provider_fallback skips those it lacks)."""
    known = execution_providers.NAMES
    lists = {"models.providers": models.providers}
    lists.update({f"models.providers_by_model.{name}": names for name, names in models.providers_by_model.items()})
    for key, names in lists.items():
        if not names:
            raise ConfigError(f"{key}: list at least one provider ({', '.join(known)})")
        for index, name in enumerate(names):
            if name not in known:
                raise ConfigError(f"{key}: unknown provider {name!r}{_provider_hint(name)} (known: {', '.join(known)})")
            if name in names[:index]:
                raise ConfigError(f"{key}: {name} is listed twice")
    for name in models.provider_options:
        if name not in known:
            raise ConfigError(f"models.provider_options.{name}: unknown provider{_provider_hint(name)}")
    if all(names == ("CPU",) for names in lists.values()):
        return
    import onnxruntime  # only here: reading settings otherwise needs no ONNX Runtime

    available = onnxruntime.get_available_providers()
    settings = models.provider_settings
    for model in ("", *models.providers_by_model):
        try:
            execution_providers.plan(settings, model, available)
        except execution_providers.ProviderError as exc:
            raise ConfigError(str(exc)) from None


def _provider_hint(name: str) -> str:
    """ONNX Runtime's own name, or a name in another case, points to the short name; else the closest one."""
    exact = execution_providers.SHORT.get(name) or next(
        (known for known in execution_providers.NAMES if known.lower() == name.lower()), None
    )
    return f" (did you mean {exact!r}?)" if exact else did_you_mean(name, execution_providers.NAMES)


def _validate_backends(settings: Settings) -> None:
    """Addresses, transport and bounds of each backend, and model names routed to one backend only (a name both
    local and remote is refused at start, by gateway.backends, once the repository is loaded)."""
    routed: dict[str, str] = {}
    for name, backend in settings.backends.items():
        key = f"backends.{name}"
        if not NAME.allows(name):
            raise ConfigError(f"{key}: a backend name is made of {NAME.summary}")
        if not backend.addresses:
            raise ConfigError(f"{key}.addresses: at least one HOST:PORT")
        for address in backend.addresses:
            host, _ = _split_listen(address, f"{key}.addresses")
            if backend.plaintext and not _is_loopback(host):
                raise ConfigError(
                    f"{key}.plaintext: only for loopback addresses (a sidecar in the same pod), not {address!r}; "
                    "use mutual TLS (ca, cert, key)"
                )
        if backend.plaintext:
            for material in ("ca", "cert", "key", "server_name"):
                if getattr(backend, material) is not None:
                    raise ConfigError(f"{key}.{material}: set, but {key}.plaintext is true")
        else:
            for material in ("ca", "cert", "key"):
                if getattr(backend, material) is None:
                    raise ConfigError(
                        f"{key}.{material}: required for mutual TLS to the backend (or {key}.plaintext: true, for "
                        "a loopback address)"
                    )
        for field_name in ("deadline_s", "health_interval_s", "keepalive_time_s", "keepalive_timeout_s"):
            if getattr(backend, field_name) <= 0:
                raise ConfigError(f"{key}.{field_name}: must be more than 0")
        if backend.max_in_flight < 1:
            raise ConfigError(f"{key}.max_in_flight: must be at least 1")
        if not 1 <= backend.max_message_bytes <= settings.limits.max_message_bytes:
            # A larger answer could never be sent on: refused here rather than read, copied, then refused.
            raise ConfigError(
                f"{key}.max_message_bytes: between 1 and limits.max_message_bytes ({settings.limits.max_message_bytes})"
            )
        if backend.deadline_s > settings.limits.max_call_s:
            raise ConfigError(
                f"{key}.deadline_s: at most limits.max_call_s ({settings.limits.max_call_s:g}), which ends it"
            )
        if not backend.models and not backend.model_patterns:
            raise ConfigError(f"{key}.models: name the models it serves (or model_patterns)")
        for model, remote in backend.models.items():
            if not NAME.allows(model) or not NAME.allows(remote):
                raise ConfigError(f"{key}.models.{model}: model names are made of {NAME.summary}")
            if model in routed:
                raise ConfigError(f"{key}.models.{model}: already routed to backends.{routed[model]}")
            routed[model] = name
    patterns = [(name, p) for name, backend in settings.backends.items() for p in backend.model_patterns]
    for name, pattern in patterns:
        for model, owner in routed.items():
            if owner != name and fnmatch.fnmatchcase(model, pattern):
                raise ConfigError(
                    f"backends.{name}.model_patterns: {pattern!r} also matches {model!r}, routed to backends.{owner}"
                )


def _validate_versions(versions: Mapping[str, VersionRouting]) -> None:
    """Model names, positive versions, a canary other than the default and a share between 0 and 100."""
    for model, routing in versions.items():
        key = f"models.versions.{model}"
        if not NAME.allows(model):
            raise ConfigError(f"{key}: not a model name (a letter or digit, then letters, digits, '_', '.', '-')")
        if routing.default is None and routing.canary is None:
            raise ConfigError(f"{key}: give default (a version) or canary ({{version, percent}}), or leave it out")
        if routing.default is not None and routing.default < 1:
            raise ConfigError(f"{key}.default: must be a version (a positive integer)")
        canary = routing.canary
        if canary is None:
            continue
        if canary.version < 1:
            raise ConfigError(f"{key}.canary.version: required: the canary's version (a positive integer)")
        if canary.version == routing.default:
            raise ConfigError(f"{key}.canary.version: {canary.version} is the default itself; name another version")
        if not 0 <= canary.percent <= 100:
            raise ConfigError(f"{key}.canary.percent: required: the share of requests naming no version, 0 to 100")


def _validate_signatures(models: ModelSettings) -> None:
    """Known modes; where any model is verified, exactly one trust source, and the library installed."""
    for model, mode in models.signatures_by_model.items():
        if mode not in SIGNATURE_MODES:
            raise ConfigError(
                f"models.signatures_by_model.{model}: {mode!r} is not one of {', '.join(SIGNATURE_MODES)}"
            )
    if not models.signature_policy.used:
        return
    trust = models.signature_trust
    kinds = trust.kinds()
    if not kinds:
        raise ConfigError(
            "models.signature_trust: required when models.signatures is warn or required: set public_key (PEM), "
            "certificate_chain (PEM), or sigstore_identity with sigstore_issuer"
        )
    if len(kinds) > 1:
        raise ConfigError(f"models.signature_trust.{kinds[1]}: set together with {kinds[0]}; give exactly one")
    if trust.certificate_chain is not None and not trust.signer_identities:
        raise ConfigError(
            "models.signature_trust.signer_identities: required with certificate_chain: the signer identities "
            "allowed in model-signing certificates (e.g. spiffe://example.org/model-signer/release, "
            "email:release@example.org); the CA's word alone would let any certificate it issued sign models"
        )
    if trust.signer_identities and trust.certificate_chain is None:
        raise ConfigError("models.signature_trust.signer_identities: only with certificate_chain")
    for identity in trust.signer_identities:
        problem = signer_spelling_problem(identity)
        if problem is not None:
            raise ConfigError(f"models.signature_trust.signer_identities: {identity!r} {problem}")
    if (trust.sigstore_identity is None) != (trust.sigstore_issuer is None):
        raise ConfigError("models.signature_trust.sigstore_issuer: sigstore_identity and sigstore_issuer go together")
    if importlib.util.find_spec("model_signing") is None:
        raise ConfigError("models.signatures: needs the model-signing library: pip install 'gateway[signing]'")


def _validate_key_source(auth: AuthSettings) -> None:
    """Exactly one place to take the token keys from, and a fetchable one: https only."""
    sources = [
        name
        for name, chosen in (
            ("auth.jwks", auth.jwks is not None),
            ("auth.jwks_url", auth.jwks_url is not None),
            ("auth.discovery", auth.discovery),
        )
        if chosen
    ]
    if not sources:
        hint = _MATERIAL_HINT.format(key="auth.jwks")
        raise ConfigError(f"auth.jwks: required to verify tokens; {hint}, or set auth.jwks_url or auth.discovery")
    if len(sources) > 1:
        raise ConfigError(f"{sources[1]}: set together with {sources[0]}; give exactly one of {', '.join(sources)}")
    problem = None if auth.jwks_url is None else https_url_problem(auth.jwks_url)
    if problem is not None:
        raise ConfigError(f"auth.jwks_url: {problem}")
    problem = https_url_problem(auth.issuer) if auth.discovery else None
    if problem is not None:
        raise ConfigError(f"auth.issuer: {problem} (auth.discovery reads ISSUER/.well-known/openid-configuration)")
    if auth.jwks_ca is not None and auth.jwks is not None:
        raise ConfigError("auth.jwks_ca: only used to fetch keys (auth.jwks_url or auth.discovery), not with auth.jwks")
    for name in ("jwks_refresh_interval_s", "jwks_min_refresh_interval_s"):
        if getattr(auth, name) <= 0:
            raise ConfigError(f"auth.{name}: must be more than 0")


# grpc takes milliseconds as a 32-bit int.
_MAX_DURATION_S = (2**31 - 1) / 1000


def _validate_connection_limits(settings: Settings) -> None:
    """Every listener's connection caps and timeouts are positive and fit what grpc takes."""
    positive = {
        "limits.max_connections": settings.limits.max_connections,
        "limits.max_watch_streams": settings.limits.max_watch_streams,
        "health.max_connections": settings.health.max_connections,
        "health.max_streams_per_connection": settings.health.max_streams_per_connection,
        "metrics.max_connections": settings.metrics.max_connections,
        "metrics.max_connections_per_source": settings.metrics.max_connections_per_source,
    }
    for key, count in positive.items():
        if not 1 <= count <= 2**31 - 1:
            raise ConfigError(f"{key}: must be between 1 and {2**31 - 1}")
    durations = {
        "limits.handshake_timeout_s": settings.limits.handshake_timeout_s,
        "keepalive.max_connection_idle_s": settings.keepalive.max_connection_idle_s,
        "health.max_connection_idle_s": settings.health.max_connection_idle_s,
        "health.max_connection_age_s": settings.health.max_connection_age_s,
        "metrics.timeout_s": settings.metrics.timeout_s,
    }
    for key, seconds in durations.items():
        if not 0 < seconds <= _MAX_DURATION_S:
            raise ConfigError(f"{key}: must be more than 0 and at most {_MAX_DURATION_S:.0f}")
    identities = settings.metrics.allowed_identities
    if identities and not settings.metrics.tls:
        raise ConfigError("metrics.allowed_identities: needs metrics.tls (a plain HTTP scraper has no identity)")
    for identity in identities:
        problem = identity_spelling_problem(identity)
        if problem is not None:
            raise ConfigError(f"metrics.allowed_identities: {identity!r} {problem}")


def _validate_http(settings: Settings) -> None:
    """The REST listener: HTTPS only, on a port of its own, with limits that fit."""
    http = settings.http
    if http.listen is None:
        return
    port = _split_listen(http.listen, "http.listen")[1]
    if settings.dev_insecure_transport:
        raise ConfigError(
            "http.listen: HTTPS only, with tls.cert, tls.key and tls.client_ca (not dev_insecure_transport)"
        )
    if settings.workers > 1 and port == 0:
        raise ConfigError("http.listen: several workers share one port, so it needs a fixed port, not 0")
    others = {"listen": settings.host_port[1], "health.listen": None, "metrics.listen": None}
    for key in ("health", "metrics"):
        listen = getattr(settings, key).listen
        others[f"{key}.listen"] = None if listen is None else _split_listen(listen, f"{key}.listen")[1]
    for key, other in others.items():
        if port != 0 and port == other:
            raise ConfigError(f"http.listen: port {port} is already {key}'s; the REST binding needs its own")
    if not 1 <= http.max_connections <= 2**31 - 1:
        raise ConfigError(f"http.max_connections: must be between 1 and {2**31 - 1}")
    if not 0 < http.idle_timeout_s <= _MAX_DURATION_S:
        raise ConfigError(f"http.idle_timeout_s: must be more than 0 and at most {_MAX_DURATION_S:.0f}")
    # Room for "Bearer " and the largest token the gateway verifies: a longer one is refused and audited by the
    # gateway (401), not by the HTTP parser.
    if not MAX_TOKEN_BYTES + 64 <= http.max_header_bytes <= 1024 * 1024:
        raise ConfigError(f"http.max_header_bytes: between {MAX_TOKEN_BYTES + 64} and {1024 * 1024}")


def _validate_probe(settings: Settings) -> None:
    """The probe listener may use any address (it tells only SERVING or NOT_SERVING), but not the main port."""
    probe = settings.health.listen
    if probe is None:
        return
    port = _split_listen(probe, "health.listen")[1]
    if settings.workers > 1 and port == 0:
        raise ConfigError("health.listen: several workers share one port, so it needs a fixed port, not 0")
    main_port = settings.host_port[1]
    if port != 0 and port == main_port:
        raise ConfigError(f"health.listen: port {port} is the main port (listen); the probe needs its own")
