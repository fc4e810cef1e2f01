"""The ``gateway`` command: serve, token issue, policy check, audit verify, and the client commands.

Exit codes: 0 ok, 1 the operation failed (refused, invalid, tampered, unreachable, output cut off), 2 usage or
configuration error (a bad flag, file or setting, a port in use, no standard output), 130 interrupted (Ctrl-C).
Every error is one line on stderr: a user's mistake never shows a traceback.
Each command imports what it needs when it runs, so the client commands and ``audit verify`` work in an SDK-only
install (``pip install gateway``); the others say to install the server extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import package_version
from gateway.config import (
    CHOICES,
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    AuthSettings,
    ConfigError,
    Settings,
    attributed,
    certs_dir_overrides,
    check_listen,
    check_paths,
    default_config_file,
    environment_settings,
    file_settings,
    for_worker,
    load_settings,
    read_secret,
)
from gateway.document import DocumentError, did_you_mean, loads_json

if TYPE_CHECKING:  # imported where used: a command loads only what it needs
    from gateway.auth.verifier import TokenVerifier

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# The top-level modules of the server extra (pyproject.toml), which `pip install gateway` leaves out.
SERVER_MODULES = frozenset(
    {
        "grpc_health",
        "grpc_reflection",
        "jwt",
        "onnxruntime",
        "structlog",
        "yaml",
        "prometheus_client",
        "aiohttp",
        "orjson",
    }
)
DEFAULT_TTL_S = 3600


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one and does not say it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


EXIT_CODES_HELP = (
    "exit codes: 0 ok; 1 the operation failed (refused, invalid, tampered, unreachable, not serving); 2 usage or "
    "configuration error; 130 interrupted"
)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("epilog", EXIT_CODES_HELP)
        # A flag is spelt out, never a prefix: `--client-secret S` must not read S as --client-secret-file's path
        # and then quote it in the error.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # argparse exits 2 on usage errors, as our contract says
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _config_file(args: argparse.Namespace) -> Path | None:
    """``--config``, else ``./gateway.yaml`` when it exists, else None: the same file for serve and token issue."""
    return Path(args.config) if args.config else default_config_file()


def _default_of(key: str) -> Any:
    """The built-in default of a settings key (``models.repository``), for help texts."""
    value: Any = Settings()
    for part in key.split("."):
        value = getattr(value, part)
    return value


# `gateway serve` flags that set one setting each: flag -> (settings key, type, metavar, help).
_SERVE_FLAGS: dict[str, tuple[str, type, str | None, str]] = {
    "--listen": ("listen", str, "HOST:PORT", "address to serve on"),
    "--http-listen": ("http.listen", str, "HOST:PORT", "also serve the REST binding (HTTPS) there"),
    "--models": ("models.repository", Path, "DIR", "model repository folder"),
    "--policies": ("policies.directory", Path, "DIR", "policy folder"),
    "--audit-log": ("audit.path", Path, "FILE", "audit trail file"),
    "--workers": ("workers", int, "N", "processes sharing the port, each with its own audit chain"),
    "--log-format": ("log_format", str, None, "operational log format on stderr"),
    "--log-level": ("log_level", str, None, "operational log level"),
}


def _cmd_serve(args: argparse.Namespace) -> int:
    # grpc core writes its own lines to stderr in its own text format, not through Python's logging: at its default
    # verbosity a line for every failed TLS handshake, between the JSON lines. Errors only, before grpc loads
    # (docs/operations.md#logs); GRPC_VERBOSITY, when set, still wins, and the workers inherit it.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import structlog

    from gateway import logging as oplog
    from gateway.audit import AuditError
    from gateway.config import ConfigError
    from gateway.errors import StartupError
    from gateway.models.runtime import ModelLoadError
    from gateway.server import Gateway, metrics_limits, metrics_tls

    config = _config_file(args)
    overrides: dict[str, Any] = {}
    environment: dict[str, Any] = {}
    try:
        if args.certs:
            overrides.update(certs_dir_overrides(Path(args.certs)))
        for key, *_ in _SERVE_FLAGS.values():
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        for option in args.dev or ():
            overrides[f"dev_{option}"] = True
        environment = environment_settings(os.environ, ignored=CLIENT_VARIABLES)
        settings = load_settings(config, overrides, environment)
        check_paths(settings)
        check_listen(settings)
    except ConfigError as exc:  # the checks after load_settings name the variable that gave a key, too
        return _fail(attributed(str(exc), None, overrides, environment), EXIT_USAGE)
    oplog.configure(fmt=settings.log_format, level=settings.log_level, worker=args.worker_index)
    source = {"path": str(config.resolve())} if config else {"path": None, "detail": "no config file: defaults"}
    structlog.get_logger("gateway.cli").info(
        "config_loaded", **source, environment=sorted(environment), flags=sorted(overrides)
    )
    if settings.workers > 1 and args.worker_index is None:
        from gateway.workers import run_workers

        try:
            return run_workers(
                args.serve_args,
                settings.workers,
                grace_s=settings.shutdown_grace_s,
                metrics_listen=settings.metrics.listen,
                metrics_tls=metrics_tls(settings),
                metrics_limits=metrics_limits(settings),
            )
        except ConfigError as exc:  # metrics.listen cannot be bound
            return _fail(str(exc), EXIT_USAGE)
    if args.worker_index is not None:
        settings = for_worker(settings, args.worker_index)
    try:
        gateway = Gateway(settings)
        gateway.serve_forever()
    except (ModelLoadError, AuditError, OSError) as exc:
        # Files that are there but cannot be served (a model) or continued (the audit trail): the start failed.
        return _fail(f"cannot start: {exc}")
    except StartupError as exc:  # the rest are configuration errors
        return _fail(attributed(str(exc), None, overrides, environment), EXIT_USAGE)
    return EXIT_OK


def _cmd_token_issue(args: argparse.Namespace) -> int:
    from gateway.auth.issuer import issue_token
    from gateway.auth.keys import TokenConfigError

    config = _config_file(args)
    try:
        auth = file_settings(config, environment_settings(os.environ, ignored=CLIENT_VARIABLES)).auth
        private_pem, key, bind = _signing_material(args)
        jwks = _key_set(args, auth, Path(args.key))
        kid = args.kid if jwks is None else _published_kid(args, key, jwks)
        verifier = None if jwks is None else _verifier(auth, jwks)
        ttl = args.ttl if args.ttl is not None else min(DEFAULT_TTL_S, int(auth.max_token_lifetime_s))
        iss, aud = args.iss or auth.issuer, args.aud or auth.audience
        token = issue_token(
            private_key_pem=private_pem,
            sub=args.sub,
            kid=kid,
            iss=iss,
            aud=aud,
            scopes=args.scope or (),
            groups=args.group or (),
            ttl_s=ttl,
            bind_cert_pem=bind,
        )
        refusal = None if verifier is None else _refusal(verifier, token, bind)
    except (ConfigError, _UsageError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except TokenConfigError as exc:
        return _fail(f"--key {args.key}: {exc}", EXIT_USAGE)
    except ValueError as exc:
        return _fail(f"cannot issue a token: {exc}", EXIT_USAGE)
    if jwks is None:
        _note("no key set to check the token against (--jwks, auth.jwks, or a jwks.json beside --key): not checked")
    if refusal is not None:
        where = str(config) if config else "the default settings (no config file)"
        explained = _explain(refusal, auth, iss=iss, aud=aud, ttl=ttl)
        return _fail(f"with {where}, the gateway would refuse this token: {explained}", EXIT_USAGE)
    print(token)
    return EXIT_OK


def _signing_material(args: argparse.Namespace) -> tuple[bytes, Any, bytes | None]:
    """The signing key (PEM and loaded) and the certificate to bind to, each problem naming its own flag."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    from gateway.auth.keys import cert_thumbprint

    try:
        private_pem = Path(args.key).read_bytes()
        bind = Path(args.bind_cert).read_bytes() if args.bind_cert else None
    except OSError as exc:
        raise _UsageError(f"{exc.filename}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _UsageError(f"--key {args.key}: not an unencrypted PEM private key (a public key cannot sign)") from None
    try:  # a signing key must be its owner's alone, as the gateway's own keys must (config.read_secret)
        read_secret(Path(args.key), key="--key")
    except ConfigError as exc:
        raise _UsageError(str(exc)) from None
    if bind is not None:
        try:
            cert_thumbprint(bind)
        except ValueError:
            raise _UsageError(f"--bind-cert {args.bind_cert}: not a PEM or DER certificate") from None
    return private_pem, key, bind


def _published_kid(args: argparse.Namespace, key: Any, jwks: Path) -> str:
    """The kid under which the key set publishes the signing key: a key it lacks signs tokens nobody accepts."""
    from gateway.auth.keys import TokenConfigError, kid_from_jwks

    try:
        published = kid_from_jwks(jwks, key)
    except TokenConfigError as exc:
        raise _UsageError(f"{exc} (the key set the token is checked against; --jwks names another)") from None
    if published is None:
        raise _UsageError(f"--key {args.key}: its public key is not in {jwks}: the gateway would refuse the token")
    if args.kid not in (None, published):
        raise _UsageError(f"--kid {args.kid}: {jwks} publishes this key as {published!r}")
    return published


def _key_set(args: argparse.Namespace, auth: AuthSettings, key_path: Path) -> Path | None:
    """The JWKS a token is checked against: --jwks, else the config's auth.jwks, else jwks.json beside the key
    (where gen_certs.sh puts it, and where ``serve --certs DIR`` reads it)."""
    if args.jwks:
        return Path(args.jwks)
    if auth.jwks is not None:
        return auth.jwks
    beside = key_path.with_name("jwks.json")
    return beside if beside.exists() else None


def _verifier(auth: AuthSettings, jwks: Path) -> TokenVerifier:
    """The verifier a gateway with these settings and key set runs, to ask it about a token before it is printed."""
    from gateway.auth.keys import HMAC_ALGORITHMS, KeyStore, TokenConfigError
    from gateway.auth.verifier import TokenVerifier

    try:
        return TokenVerifier(
            keys=KeyStore(jwks, interval_s=auth.reload_interval_s, allowed_algorithms=auth.algorithms),
            issuer=auth.issuer,
            audience=auth.audience,
            # The token is signed with a key pair: the shared-secret (HMAC) path and its secret play no part.
            algorithms=[algorithm for algorithm in auth.algorithms if algorithm not in HMAC_ALGORITHMS],
            leeway_s=auth.leeway_s,
            max_lifetime_s=auth.max_token_lifetime_s,
            required_claims=auth.required_claims,
            groups_claim=auth.groups_claim,
            scopes_claim=auth.scopes_claim,
        )
    except TokenConfigError as exc:
        raise _UsageError(f"{exc}: a gateway with these settings would not start") from None


def _refusal(verifier: TokenVerifier, token: str, bind_pem: bytes | None) -> str | None:
    """Why the verifier refuses ``token`` (None: it accepts it), on a connection with the certificate it is bound
    to."""
    from gateway.auth.keys import cert_thumbprint
    from gateway.errors import AuthenticationError

    try:
        verifier.verify(token, cert_x5t=cert_thumbprint(bind_pem) if bind_pem else None)
    except AuthenticationError as exc:
        return exc.reason
    return None


def _explain(reason: str, auth: AuthSettings, *, iss: str, aud: str, ttl: int) -> str:
    """The verifier's reason, and the flag or setting behind it."""
    hints = {
        "token lifetime over the maximum": f"--ttl {ttl} is over auth.max_token_lifetime_s "
        f"({auth.max_token_lifetime_s:g})",
        "wrong issuer": f"--iss {iss} is not auth.issuer ({auth.issuer})",
        "wrong audience": f"--aud {aud} is not auth.audience ({auth.audience})",
    }
    if reason.startswith("missing claim"):
        return f"{reason}: auth.required_claims asks for a claim token issue does not set"
    return f"{reason}: {hints[reason]}" if reason in hints else reason


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from gateway.auth.principal import Principal, identity_spelling_problem
    from gateway.auth.verifier import groups_and_scopes
    from gateway.errors import AuthenticationError
    from gateway.policy import Action, PolicyError, load_policies

    try:
        policies = load_policies(Path(args.policies))
        claims = loads_json(args.claims) if args.claims else {}
        version = _judged_version(args)
    except (PolicyError, _UsageError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except DocumentError as exc:
        return _fail(f"--claims: {exc}", EXIT_USAGE)
    if not isinstance(claims, dict):
        return _fail("--claims must be a JSON object", EXIT_USAGE)
    subject = claims.get("sub", "")
    try:
        groups, scopes = groups_and_scopes(claims, groups_claim=args.groups_claim, scopes_claim=args.scopes_claim)
    except AuthenticationError as exc:
        return _fail(f"--claims: {exc.reason}: the gateway refuses such a token", EXIT_USAGE)
    if not isinstance(subject, str):
        return _fail("--claims: malformed claim: sub: the gateway refuses such a token", EXIT_USAGE)
    identity_problem = identity_spelling_problem(args.cert_identity) if args.cert_identity else None
    if identity_problem is not None:
        return _fail(f"--cert-identity: {identity_problem}", EXIT_USAGE)
    principal = Principal(
        cert_identity=args.cert_identity or "",
        cert_sha256="",
        subject=subject,
        issuer=str(claims.get("iss", "")),
        groups=groups,
        scopes=scopes,
        token_bound=bool(args.bound),
    )
    decision = policies.evaluate(principal, model=args.model, version=version, action=Action(args.action))
    print(decision.explain())
    return EXIT_OK if decision.allowed else EXIT_FAILED


def _judged_version(args: argparse.Namespace) -> str | None:
    """The version the server would judge: --version, else the default (highest) one under --models; notes on
    stderr say which, so that stdout stays the one decision line."""
    # The repository's own scan of <name>/<version>/model.onnx: names only, nothing loaded.
    from gateway.models.repository import parse_version, scan

    versions: list[int] = []
    if args.models is not None:
        if not Path(args.models).is_dir():
            raise _UsageError(f"--models: {args.models} is not a directory")
        try:
            versions = sorted(v for name, v in scan(Path(args.models)).versions if name == args.model)
        except OSError as exc:
            raise _UsageError(f"--models: {exc.filename}: {exc.strerror}") from None
    if args.version is not None:
        if args.models and parse_version(args.version) not in (None, *versions):
            _note(f"{args.model} has no version {args.version} in {args.models}: if allowed, the call gets NOT_FOUND")
        return str(args.version)
    if args.models is None:
        _note('no --version or --models: judged for "no version", which every deny rule with a versions list matches')
        return None
    if not versions:
        _note(f'no model {args.model} in {args.models}: judged for "no version" (if allowed, the call gets NOT_FOUND)')
        return None
    _note(f"judged version {versions[-1]}, the default of {args.model} in {args.models}")
    return str(versions[-1])


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit import verify_files

    paths = [Path(p) for p in args.paths]
    waived = [Path(p) for p in args.no_checkpoint or ()]
    missing = next((path for path in [*paths, *waived] if not path.exists()), None)
    if missing is not None:
        return _fail(f"{missing}: no such file or directory", EXIT_USAGE)
    try:
        # The key is the file's bytes with surrounding whitespace stripped, as `serve` reads it (docs/audit.md).
        hmac_key = Path(args.hmac_key).read_bytes().strip() if args.hmac_key else None
    except OSError as exc:
        return _fail(f"{exc.filename}: {exc.strerror}", EXIT_USAGE)
    report = verify_files(paths, hmac_key=hmac_key, no_checkpoint=waived)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for line in report.lines():
            print(line)
    return EXIT_OK if report.ok else EXIT_FAILED


def _version_folders(paths: Sequence[str]) -> list[Path]:
    """Each folder holding a model.onnx at or below the given paths (a version, a model, or a repository)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise _UsageError(f"{path}: not a directory")
        below = sorted(model.parent for model in path.rglob("model.onnx") if not _hidden(model.relative_to(path)))
        if not below:
            raise _UsageError(f"{path}: no model.onnx in it or below it")
        found.extend(below)
    return found


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _cmd_model_sign(args: argparse.Namespace) -> int:
    from gateway.models import signature

    try:
        folders = _version_folders(args.paths)
    except _UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    for folder in folders:
        try:
            signature.sign(
                folder,
                private_key=Path(args.key),
                certificate=Path(args.certificate) if args.certificate else None,
                chain=Path(args.chain) if args.chain else None,
            )
            digest = signature.digest(folder)
        except signature.SignatureError as exc:
            return _fail(f"{folder}: {exc.reason}", EXIT_USAGE)
        except Exception as exc:  # the library's errors: an unreadable key, a symlink, a wrong password
            return _fail(f"{folder}: cannot sign: {' '.join(str(exc).split())[:300]}")
        print(f"signed {folder / signature.SIGNATURE_FILE}: {digest}")
    return EXIT_OK


def _cmd_model_verify(args: argparse.Namespace) -> int:
    from gateway.models import signature

    trust = signature.SignatureTrust(
        public_key=Path(args.public_key) if args.public_key else None,
        certificate_chain=Path(args.certificate_chain) if args.certificate_chain else None,
        signer_identities=tuple(args.signer_identity or ()),
    )
    if len(trust.kinds()) != 1:
        return _fail("give exactly one of --public-key and --certificate-chain", EXIT_USAGE)
    if (trust.certificate_chain is None) == bool(trust.signer_identities):
        return _fail("--signer-identity goes with --certificate-chain (at least one), and only with it", EXIT_USAGE)
    for identity in trust.signer_identities:
        problem = signature.signer_spelling_problem(identity)
        if problem is not None:
            return _fail(f"--signer-identity: {identity!r} {problem}", EXIT_USAGE)
    try:
        folders = _version_folders(args.paths)
    except _UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    failed = 0
    for folder in folders:
        try:
            signature.verify(folder, trust)
            print(f"OK {folder}: {signature.digest(folder)}")
        except signature.SignatureError as exc:
            failed += 1
            print(f"FAILED {folder}: {exc.reason}")
    return EXIT_FAILED if failed else EXIT_OK


_CONNECTION = (
    ("target", "GATEWAY_TARGET", "HOST:PORT of the gateway"),
    ("ca", "GATEWAY_CA", "CA certificate that signed the server's certificate"),
    ("cert", "GATEWAY_CERT", "client certificate"),
    ("key", "GATEWAY_KEY", "client private key"),
    ("token", "GATEWAY_TOKEN", "bearer token (prefer --token-file: argv is visible to other users)"),
    ("token_file", "GATEWAY_TOKEN_FILE", "file holding the bearer token, re-read when it changes"),
    ("token_url", "GATEWAY_TOKEN_URL", "identity provider's token endpoint: tokens by the client-credentials grant"),
    ("client_id", "GATEWAY_CLIENT_ID", "client id at the token endpoint (with --token-url)"),
    (
        "client_secret_file",
        "GATEWAY_CLIENT_SECRET_FILE",
        "file holding the client secret (with --token-url; without it, --cert authenticates: RFC 8705)",
    ),
    ("token_ca", "GATEWAY_TOKEN_CA", "CA of the token endpoint's certificate (default: the system's trust store)"),
    ("token_resource", "GATEWAY_TOKEN_RESOURCE", "resource (RFC 8707) to ask tokens for: the gateway's audience"),
    ("token_scope", "GATEWAY_TOKEN_SCOPE", "scopes to ask tokens for, space separated"),
    ("server_name", "GATEWAY_SERVER_NAME", "name to check the server certificate against (when --target is an IP)"),
)
# The ways to get a token: one per command. A flag among them overrides the GATEWAY_* variables of all of them.
_TOKEN_SOURCES = ("token", "token_file", "token_url")
_CLIENT_CREDENTIALS = ("client_id", "client_secret_file", "token_ca", "token_resource", "token_scope")
# The client commands' variables: `serve` and `token issue` leave them alone, as the client commands leave the
# settings' variables alone.
CLIENT_VARIABLES = frozenset(env for _, env, _ in _CONNECTION)


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    for name, env, help_text in _CONNECTION:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{help_text} [env {env}]")
    parser.add_argument("--timeout", type=_positive_seconds, default=30.0, help="seconds the call may take")


def _connect(args: argparse.Namespace) -> Any:
    """A Client from flags, falling back to GATEWAY_* environment variables."""
    # Before grpc loads: the one error line printed says what failed, and grpc core's own log would repeat it
    # unformatted on stderr. GRPC_VERBOSITY, when set, still wins.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from gateway.client import Client

    _check_client_environment(os.environ)
    values = _connection_values(args)
    target, ca, cert, key = (values[name] for name in ("target", "ca", "cert", "key"))
    if not (target and ca and cert and key):
        missing = [_spelt(n) for n in ("target", "ca", "cert", "key") if not values[n]]
        raise _UsageError(f"missing {', '.join(missing)}")
    if "," in target and not values["server_name"]:  # the SDK says so too, but in its own argument's name
        raise _UsageError(
            f"--target {target} has several addresses: give --server-name (GATEWAY_SERVER_NAME), "
            "the name their certificate carries"
        )
    token = _token(args, values)
    if token is None:  # the gateway would refuse the call: say so here, naming every way to give one
        raise _UsageError(
            "no token: give --token-file FILE (GATEWAY_TOKEN_FILE), --token TOKEN (GATEWAY_TOKEN) or "
            "--token-url URL (GATEWAY_TOKEN_URL); `gateway token issue` makes one"
        )
    try:
        return Client(
            target,
            ca=ca,
            cert=cert,
            key=key,
            token=token,
            server_name=values["server_name"],
            timeout=args.timeout,
        )
    except OSError as exc:
        raise _UsageError(f"{exc.filename}: {exc.strerror}") from None
    except ValueError as exc:  # TLS material the SDK refused: not PEM, or a key that is not the certificate's
        raise _UsageError(str(exc)) from None


def _connection_values(args: argparse.Namespace) -> dict[str, Any]:
    """Each connection setting from its flag, else its GATEWAY_* variable."""
    return {name: getattr(args, name, None) or os.environ.get(env) for name, env, _ in _CONNECTION}


def _check_client_environment(environ: Mapping[str, str]) -> None:
    """A GATEWAY_* variable that no command reads is a usage error with the closest name, as ``serve`` says it: a
    misspelt GATEWAY_TOKEN_FILE would otherwise leave the command without its token."""
    from gateway.config import ENV_PREFIX, environment_variable, setting_types

    known = CLIENT_VARIABLES | {environment_variable(key) for key in setting_types()}
    unknown = [name for name in sorted(environ) if name.startswith(ENV_PREFIX) and name not in known]
    if unknown:
        named = ", ".join(name + did_you_mean(name, CLIENT_VARIABLES | known, ENV_PREFIX) for name in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise _UsageError(f"{named}: unknown environment variable{plural} (gateway predict --help lists them)")


def _token(args: argparse.Namespace, values: dict[str, Any]) -> Any:
    """The token argument of the Client: a token, a TokenFile or a ClientCredentialsTokenProvider, from exactly
    one source; the settings of another source are a usage error."""
    from gateway.client import TokenFile

    source = _token_source(args, values)
    if source != "token_url":
        stray = [name for name in _CLIENT_CREDENTIALS if values[name]]
        if stray:
            raise _UsageError(f"{_spelt(stray[0])} needs --token-url (GATEWAY_TOKEN_URL)")
    if source == "token_url":
        return _client_credentials(values)
    if source == "token_file":
        token = TokenFile(values["token_file"])
        try:
            if not token.token():  # read once now: a missing or empty file is a usage error, not a refused call
                raise _UsageError(f"--token-file {values['token_file']}: empty")
        except OSError as exc:
            raise _UsageError(f"--token-file {exc.filename}: {exc.strerror}") from None
        return token
    return values["token"]


def _token_source(args: argparse.Namespace, values: dict[str, Any]) -> str | None:
    """Which of --token, --token-file, --token-url gives the token. A flag among them wins over every
    GATEWAY_* variable of the others (they are one setting); two flags, or two variables, are a usage error."""
    flagged = [name for name in _TOKEN_SOURCES if getattr(args, name)]
    if len(flagged) > 1:
        both = " and ".join(map(_flag, flagged))
        raise _UsageError(f"give one of --token, --token-file, --token-url: not both {both}")
    if flagged:
        for name in _TOKEN_SOURCES:
            values[name] = getattr(args, name)
        if flagged[0] != "token_url":  # the variables of the client-credentials source go with it
            values.update({name: getattr(args, name) for name in _CLIENT_CREDENTIALS})
        return flagged[0]
    present = [name for name in _TOKEN_SOURCES if values[name]]
    if len(present) > 1:
        both = " and ".join(map(_env, present))
        raise _UsageError(f"set one of GATEWAY_TOKEN, GATEWAY_TOKEN_FILE, GATEWAY_TOKEN_URL: not both {both}")
    return present[0] if present else None


def _client_credentials(values: dict[str, Any]) -> Any:
    """A ClientCredentialsTokenProvider: the client secret from its file, else the client certificate (--cert,
    --key) authenticates the client, and the token is bound to it (RFC 8705)."""
    from gateway.oauth import ClientCredentialsTokenProvider

    if not values["client_id"]:
        raise _UsageError("--token-url needs --client-id (GATEWAY_CLIENT_ID)")
    secret = None
    if values["client_secret_file"]:
        try:
            secret = Path(values["client_secret_file"]).read_text().strip()
        except OSError as exc:
            raise _UsageError(f"--client-secret-file {exc.filename}: {exc.strerror}") from None
        if not secret:
            raise _UsageError(f"--client-secret-file {values['client_secret_file']}: empty")
    try:
        return ClientCredentialsTokenProvider(
            values["token_url"],
            values["client_id"],
            client_secret=secret,
            cert=values["cert"],
            key=values["key"],
            ca=values["token_ca"],
            scope=values["token_scope"],
            resource=values["token_resource"],
        )
    except OSError as exc:
        raise _UsageError(f"{exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise _UsageError(str(exc)) from None


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _env(name: str) -> str:
    return next(env for key, env, _ in _CONNECTION if key == name)


def _spelt(name: str) -> str:
    """A setting as the user may have given it: its flag or its variable."""
    return f"{_flag(name)} ({_env(name)})"


class _UsageError(Exception):
    """A client command's arguments are wrong: exit 2."""


def _read_inputs(args: argparse.Namespace) -> Any:
    import numpy as np

    from gateway.errors import InvalidArgumentError
    from gateway.tensors import datatype_of

    if args.input is not None:
        try:
            data = loads_json(args.input)
        except DocumentError as exc:
            raise _UsageError(f"--input: {exc}") from None
    else:
        path = Path(args.input_file)
        try:
            if path.suffix == ".npy":
                array = np.load(path, allow_pickle=False)
                datatype_of(array)  # a dtype the protocol cannot carry is the caller's mistake, not a refusal
                return array
            data = loads_json(path.read_text())
        except (OSError, ValueError, EOFError) as exc:  # EOFError: numpy's word for an empty or cut .npy
            raise _UsageError(f"--input-file {path}: {exc or type(exc).__name__}") from None
        except InvalidArgumentError as exc:
            raise _UsageError(f"--input-file {path}: {exc.message}") from None
    return _inputs_from_json(data)


def _inputs_from_json(data: Any) -> Any:
    """JSON input: a list of floats (simple form), or {name: nested list | {"data", "datatype", "shape"}}."""
    import numpy as np

    if isinstance(data, list):
        try:
            return [float(v) for v in data]
        except (TypeError, ValueError):
            raise _UsageError(
                'a list input must be flat numbers (the simple form); give shaped tensors by name: {"input": [[...]]}'
            ) from None
    if not isinstance(data, dict) or not data:
        raise _UsageError("input must be a list of numbers or an object of named tensors")
    inputs = {}
    for name, value in data.items():
        try:
            array = _typed_tensor(name, value) if isinstance(value, dict) else np.asarray(value, dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise _UsageError(f"input '{name}': {exc}") from None
        inputs[name] = array
    return inputs


_TENSOR_KEYS = ("data", "datatype", "shape")


def _typed_tensor(name: str, value: dict[str, Any]) -> Any:
    """One ``{"data", "datatype", "shape"}`` object as an array; a misspelt key is an error, never ignored."""
    import numpy as np

    from gateway.tensors import BY_NAME

    for key in value:
        if key not in _TENSOR_KEYS:
            raise _UsageError(f"input '{name}': unknown key {key!r}{did_you_mean(key, _TENSOR_KEYS)}")
    if "data" not in value:
        raise _UsageError(f"input '{name}': missing key 'data'")
    datatype = str(value.get("datatype", "FP32")).upper()
    if datatype not in BY_NAME:
        raise _UsageError(f"input '{name}': unknown datatype {datatype!r}{did_you_mean(datatype, BY_NAME)}")
    array = np.asarray(value["data"], dtype=BY_NAME[datatype].dtype)
    return array.reshape(value["shape"]) if "shape" in value else array


def _array_json(array: Any) -> dict[str, Any]:
    import numpy as np

    from gateway.audit.chain import strict_value
    from gateway.tensors import datatype_of

    data = array.tolist()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # JSON (RFC 8259 6) has no NaN or infinities: the audit trail's strings for them ("NaN", "Infinity").
        data = strict_value(data)
    return {"datatype": datatype_of(array).name, "shape": list(array.shape), "data": data}


def _run_client(args: argparse.Namespace, operation: Any) -> int:
    from gateway.errors import AuthenticationError, GatewayError

    try:
        _warn_if_expired(args)
        with _connect(args) as client:
            print(json.dumps(operation(client), indent=2, allow_nan=False))
    except _UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except GatewayError as exc:
        code = _fail(str(exc))
        hint = _token_hint(args, exc.reason) if isinstance(exc, AuthenticationError) else None
        if hint is not None:
            print(f"hint: {hint}", file=sys.stderr)
        return code
    return EXIT_OK


def _warn_if_expired(args: argparse.Namespace) -> None:
    """Before sending: a warning when the command's own token has visibly expired (read, not verified). It is
    sent all the same: the gateway decides, with its clock and its leeway."""
    from gateway.client import unverified_claims

    exp = (unverified_claims(_token_text(_connection_values(args))) or {}).get("exp")
    if isinstance(exp, int | float) and exp < time.time():
        print(f"warning: the token expired at {_utc(exp)}: the gateway will refuse it", file=sys.stderr)


def _utc(timestamp: float) -> str:
    from datetime import UTC, datetime

    return f"{datetime.fromtimestamp(timestamp, UTC):%Y-%m-%dT%H:%M:%SZ}"


_ISSUE = "gateway token issue --key certs/signing/jwt-signing.key --sub NAME --bind-cert {cert} > NAME.jwt"


def _token_hint(args: argparse.Namespace, reason: str) -> str | None:
    """What to do about a refused token, from what the client knows of its own token (read, not verified)."""
    from gateway.auth import reasons
    from gateway.client import unverified_claims

    values = _connection_values(args)
    cert = values["cert"] or "CERT"
    claims = unverified_claims(_token_text(values)) or {}
    issue = _ISSUE.format(cert=cert)
    if reason == reasons.EXPIRED:
        exp = claims.get("exp")
        when = f" at {_utc(exp)}" if isinstance(exp, int | float) else ""
        return f"the token expired{when}: issue a new one with `{issue}`, or ask your identity provider"
    if reason == reasons.BOUND_TO_ANOTHER_CERTIFICATE:
        return f"the token is bound to another certificate than --cert {cert}: issue one with `{issue}`"
    if reason == reasons.WRONG_AUDIENCE and "aud" in claims:
        return f"the token's aud is {claims['aud']!r}: issue one for the gateway's auth.audience (--aud)"
    if reason == reasons.WRONG_ISSUER and "iss" in claims:
        return f"the token's iss is {claims['iss']!r}: the gateway trusts another issuer (auth.issuer)"
    if reason in (reasons.UNKNOWN_KEY_ID, reasons.BAD_SIGNATURE):
        return "sign tokens with a key in the gateway's key set: `gateway token issue --key` with its signing key"
    return None


def _token_text(values: dict[str, Any]) -> str:
    """The token a client command sends, when it is a string or a file (a token endpoint's is not known here)."""
    if values["token"]:
        return str(values["token"])
    if values["token_file"]:
        try:
            return Path(values["token_file"]).read_text().strip()
        except OSError:
            return ""
    return ""


def _cmd_predict(args: argparse.Namespace) -> int:
    try:
        inputs = _read_inputs(args)
    except _UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)

    def predict(client: Any) -> Any:
        result = client.predict(args.model, inputs, version=args.version)
        outputs = {name: _array_json(array) for name, array in result.outputs.items()}
        return {"model": result.model, "version": result.version, "request_id": result.request_id, "outputs": outputs}

    return _run_client(args, predict)


def _cmd_models(args: argparse.Namespace) -> int:
    return _run_client(
        args,
        lambda client: [
            {"name": m.name, "versions": list(m.versions), "default_version": m.default_version}
            for m in client.list_models()
        ],
    )


def _cmd_metadata(args: argparse.Namespace) -> int:
    def metadata(client: Any) -> Any:
        meta = client.metadata(args.model, args.version)

        def specs(items: Any) -> list[dict[str, Any]]:
            return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in items]

        return {
            "name": meta.name,
            "version": meta.version,
            "versions": list(meta.versions),
            "inputs": specs(meta.inputs),
            "outputs": specs(meta.outputs),
            "model_digest": meta.model_digest,
            "execution_provider": meta.execution_provider,
        }

    return _run_client(args, metadata)


def _cmd_health(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # see _connect
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        _check_client_environment(os.environ)
        channel = _health_channel(args)
    except _UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            return _fail(f"{args.target_used}: {_health_failure(exc, plaintext=args.plaintext)}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


def _health_channel(args: argparse.Namespace) -> Any:
    """A channel to the main port (mutual TLS, no token: health needs none) or, with --plaintext, the probe port."""
    import grpc

    from gateway.client import ca_material, check_target, identity_material

    values = _connection_values(args)
    target = values["target"]
    if not target:
        raise _UsageError(f"missing {_spelt('target')}")
    try:
        check_target(target)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    args.target_used = target
    if args.plaintext:
        return grpc.insecure_channel(target)
    missing = [_spelt(n) for n in ("ca", "cert", "key") if not values[n]]
    if missing:
        raise _UsageError(f"missing {', '.join(missing)} (or --plaintext, for the probe port health.listen)")
    try:
        ca = ca_material(values["ca"])
        cert, key = identity_material(cert=values["cert"], key=values["key"])
    except OSError as exc:
        raise _UsageError(f"{exc.filename}: {exc.strerror}") from None
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    name = values["server_name"]
    options = [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)] if name else []
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert), options=options)


def _health_failure(exc: Any, *, plaintext: bool) -> str:
    """Why a health check got no status, in one line that says what to change."""
    from gateway.client import handshake_problem

    details = exc.details() or exc.code().name
    if plaintext and details.lower().endswith("socket closed"):
        return "this port speaks TLS (the main port?): leave out --plaintext and give --ca, --cert and --key"
    problem = None if plaintext else handshake_problem(details)
    return f"TLS handshake failed: {problem}" if problem else f"{exc.code().name}: {details}"


def build_parser() -> argparse.ArgumentParser:
    """The ``gateway`` argument parser."""
    parser = _Parser(prog="gateway", description="Secure, authenticated gRPC inference gateway for ONNX models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Each setting comes from its flag, else its GATEWAY_* environment variable "
        "(GATEWAY_ + the key upper-cased, . as __: GATEWAY_AUDIT__CHAIN_ID), else the config file, else its built-in "
        "default; gateway.yaml lists every setting, docs/deploy.md every variable.",
    )
    serve.add_argument("--config", metavar="FILE", help="settings file (default: ./gateway.yaml when it exists)")
    serve.add_argument(
        "--certs",
        metavar="DIR",
        help="the server folder scripts/gen_certs.sh writes (certs/server): sets tls.cert, tls.key, tls.client_ca, "
        "auth.jwks, and tls.crl and audit.hmac_key_file when their files are there",
    )
    for flag, (key, kind, metavar, text) in _SERVE_FLAGS.items():
        serve.add_argument(
            flag,
            dest=key,
            type=kind,
            choices=CHOICES.get(key),
            metavar=metavar,
            help=f"{text} (config key {key}; built-in default: {_default_of(key)})",
        )
    serve.add_argument(
        "--dev",
        action="append",
        choices=("insecure_transport", "no_auth", "audit_fail_open"),
        help="development-only option (repeatable); logged loudly",
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor for its workers
    serve.set_defaults(run=_cmd_serve)

    token = commands.add_parser("token", help="token tools").add_subparsers(dest="token_command", required=True)
    issue = token.add_parser(
        "issue",
        help="print a signed JWT",
        description="Print a signed JWT, checked first by the verifier of a gateway with the settings of the "
        "config file and GATEWAY_* variables that serve reads: a token that gateway would refuse is an error, "
        "not printed.",
    )
    issue.add_argument("--key", required=True, help="private signing key (PEM)")
    issue.add_argument("--sub", required=True, help="subject: who the token is for")
    issue.add_argument("--config", metavar="FILE", help="settings file (default: ./gateway.yaml when it exists)")
    issue.add_argument(
        "--jwks",
        metavar="FILE",
        help="key set to check against (default: auth.jwks of the config file, else a jwks.json beside --key)",
    )
    issue.add_argument("--kid", help="key id (default: the key's kid in the key set, else its RFC 7638 thumbprint)")
    issue.add_argument("--iss", help=f"issuer (default: auth.issuer of the config file, else {DEFAULT_ISSUER})")
    issue.add_argument("--aud", help=f"audience (default: auth.audience of the config file, else {DEFAULT_AUDIENCE})")
    issue.add_argument("--scope", action="append", help="a scope (repeatable)")
    issue.add_argument("--group", action="append", help="a group (repeatable)")
    issue.add_argument(
        "--ttl",
        type=_seconds,
        help=f"lifetime in seconds (default: {DEFAULT_TTL_S}, or auth.max_token_lifetime_s when that is less)",
    )
    issue.add_argument("--bind-cert", help="bind the token to this client certificate (RFC 8705)")
    issue.set_defaults(run=_cmd_token_issue)

    policy = commands.add_parser("policy", help="policy tools").add_subparsers(dest="policy_command", required=True)
    check = policy.add_parser("check", help="print the decision and the rule that decided it")
    check.add_argument("--policies", required=True)
    check.add_argument("--model", required=True)
    check.add_argument("--version")
    check.add_argument("--action", required=True, choices=("predict", "stream", "metadata", "list"))
    check.add_argument("--cert-identity", help="spiffe://... (URI SAN), dns:NAME or cn:NAME, as in audit records")
    check.add_argument("--claims", help='JSON, e.g. {"sub": "alice", "groups": ["ml"]}')
    check.add_argument("--bound", action="store_true", help="the token is bound to the client certificate")
    check.add_argument("--models", help="model repository: without --version, judge its default version, as serve does")
    check.add_argument("--groups-claim", default="groups", help="claim holding the groups (auth.groups_claim)")
    check.add_argument("--scopes-claim", default="scope", help="claim holding the scopes (auth.scopes_claim)")
    check.set_defaults(run=_cmd_policy_check)

    predict = commands.add_parser("predict", help="run one inference; prints JSON")
    predict.add_argument("--model", required=True)
    predict.add_argument("--version")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help='inline JSON: [0.1, ...] or {"input": [[...]]}')
    source.add_argument("--input-file", help="a .json file (same forms) or a .npy array (one-input models)")
    _add_connection_flags(predict)
    predict.set_defaults(run=_cmd_predict)

    models = commands.add_parser("models", help="list the models you may list; prints JSON")
    _add_connection_flags(models)
    models.set_defaults(run=_cmd_models)

    metadata = commands.add_parser("metadata", help="a model's inputs and outputs; prints JSON")
    metadata.add_argument("--model", required=True)
    metadata.add_argument("--version")
    _add_connection_flags(metadata)
    metadata.set_defaults(run=_cmd_metadata)

    health = commands.add_parser(
        "health",
        help="ask a gateway whether it is ready; prints SERVING or NOT_SERVING",
        description="Ask grpc.health.v1.Health/Check for the overall status: on the main port over mutual TLS "
        "(a client certificate, no token), or on the probe port (health.listen) in plaintext with --plaintext. "
        "Prints the status.",
    )
    for name in ("target", "ca", "cert", "key", "server_name"):
        flag, env, text = next((f"--{n.replace('_', '-')}", e, t) for n, e, t in _CONNECTION if n == name)
        health.add_argument(flag, dest=name, help=f"{text} [env {env}]")
    health.add_argument("--plaintext", action="store_true", help="the plaintext probe port (health.listen)")
    health.add_argument("--timeout", type=_positive_seconds, default=5.0, help="seconds to wait for the answer")
    health.set_defaults(run=_cmd_health)

    model = commands.add_parser("model", help="model signing (OpenSSF model signing; docs/model-signing.md)")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    sign = model_commands.add_parser(
        "sign",
        help="sign model versions: writes model.sig in each folder holding a model.onnx",
        description="Sign every model version at or below each DIR (a version folder, a model, or a repository): "
        "the OpenSSF model signing library writes DIR/model.sig over every file of the version. Prints each "
        "signature and the digest that names the signed bytes in the gateway's records.",
    )
    sign.add_argument("paths", nargs="+", metavar="DIR")
    sign.add_argument("--key", required=True, help="EC private key (PEM), e.g. certs/signing/model-signing.key")
    sign.add_argument("--certificate", help="the key's signing certificate (PEM), for certificate_chain trust")
    sign.add_argument("--chain", help="the certificate's chain up to its root (PEM), with --certificate")
    sign.set_defaults(run=_cmd_model_sign)
    check_signature = model_commands.add_parser(
        "verify",
        help="verify model versions as the gateway does at load",
        description="Verify every model version at or below each DIR against its model.sig, as `serve` does with "
        "models.signatures on. Exit 0 only when every version verifies.",
    )
    check_signature.add_argument("paths", nargs="+", metavar="DIR")
    check_signature.add_argument(
        "--public-key", help="trusted EC public key (PEM), e.g. certs/server/model-signing.pub"
    )
    check_signature.add_argument("--certificate-chain", help="trusted CA chain (PEM) of model-signing certificates")
    check_signature.add_argument(
        "--signer-identity",
        action="append",
        metavar="NAME",
        help="with --certificate-chain: an identity the signing certificate may name (repeatable), as "
        "models.signature_trust.signer_identities spells it",
    )
    check_signature.set_defaults(run=_cmd_model_verify)

    audit = commands.add_parser("audit", help="audit trail tools").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser(
        "verify",
        help="verify hash chains and checkpoints",
        description="Verify audit trails: files, or folders at any depth (one per replica), grouped by the chain "
        "id their records carry; each chain is verified on its own, and two trails claiming one chain id fail. "
        "Each trail needs its checkpoint (NAME.checkpoint beside its active file, naming its chain) unless "
        "--no-checkpoint names it. Exit 0 only when every chain verifies.",
    )
    verify.add_argument("paths", nargs="+", metavar="PATH", help="audit file or folder")
    verify.add_argument("--hmac-key", help="key file of a keyed trail (its text, stripped; not hex-decoded)")
    verify.add_argument(
        "--no-checkpoint",
        action="append",
        metavar="TRAIL",
        help="this trail (its active file, or a folder of trails) has no checkpoint: verify it without one, and say "
        "so in its summary (repeatable); without it, a trail whose checkpoint is missing fails",
    )
    verify.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON: verdict, per-chain summaries, and the model digests (model_digests: "
        "{model: {version: [digest]}}) of the verified records of calls that ran a model, per chain and in all",
    )
    verify.set_defaults(run=_cmd_audit_verify)
    return parser


def _positive_seconds(text: str) -> float:
    """``--timeout``: a finite number of seconds over zero."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds over 0")
    return value


def _seconds(text: str) -> int:
    """``--ttl``: a whole number of seconds, at least one."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds, at least 1")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.serve_args = argv[1:] if args.command == "serve" else []  # what a supervisor passes on to its workers
    if sys.stdout is None and args.command != "serve":  # started with stdout closed: the result would be lost
        return _fail("standard output is closed: nowhere to print the result", EXIT_USAGE)
    try:
        code = int(args.run(args))
        if sys.stdout is not None:
            sys.stdout.flush()  # a closed pipe shows here, not as an error Python prints at exit
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # Whatever read the output stopped early (`| head`). Nothing more can go there, not even at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _fail("output cut off: the program reading it closed the pipe", EXIT_FAILED)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in SERVER_MODULES:
            raise
        command = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))
        return _fail(
            f"gateway {command} needs the server extra: pip install 'gateway[server]' (no module {exc.name})",
            EXIT_USAGE,
        )
    return code
