"""The ``gateway`` command: serve, token issue, policy check, audit verify, and the client commands.

Exit codes: 0 ok, 1 the operation failed (refused, invalid, tampered), 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.config import (
    DEFAULT_AUDIENCE,
    DEFAULT_ISSUER,
    ConfigError,
    certs_dir_overrides,
    check_paths,
    for_worker,
    load_settings,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on usage errors, as our contract says
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _cmd_serve(args: argparse.Namespace) -> int:
    from gateway import logging as oplog
    from gateway.audit import AuditError
    from gateway.errors import StartupError
    from gateway.models.runtime import ModelLoadError
    from gateway.server import Gateway

    overrides: dict[str, Any] = {}
    if args.certs:
        overrides.update(certs_dir_overrides(Path(args.certs)))
    flags = {"listen": args.listen, "models.repository": args.models, "policies.directory": args.policies}
    flags["audit.path"] = args.audit_log
    for key, value in flags.items():
        if value is not None:
            overrides[key] = Path(value) if key != "listen" else value
    for option in args.dev or ():
        overrides[f"dev_{option}"] = True
    if args.workers is not None:
        overrides["workers"] = args.workers
    try:
        settings = load_settings(Path(args.config) if args.config else None, overrides)
        check_paths(settings)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    oplog.configure(fmt=settings.log_format, level=settings.log_level)
    if settings.workers > 1 and args.worker_index is None:
        from gateway.workers import run_workers

        return run_workers(args.serve_args, settings.workers, grace_s=settings.shutdown_grace_s)
    if args.worker_index is not None:
        settings = for_worker(settings, args.worker_index)
    try:
        gateway = Gateway(settings)
        gateway.serve_forever()
    except (ModelLoadError, AuditError, OSError) as exc:
        # Files that are there but cannot be served (a model) or continued (the audit trail): the start failed.
        return _fail(f"cannot start: {exc}")
    except StartupError as exc:  # the rest are configuration errors
        return _fail(str(exc), EXIT_USAGE)
    return EXIT_OK


def _cmd_token_issue(args: argparse.Namespace) -> int:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    from gateway.auth.issuer import issue_token
    from gateway.auth.keys import TokenConfigError, cert_thumbprint, kid_from_jwks

    key_path = Path(args.key)
    try:
        private_pem = key_path.read_bytes()
        bind = Path(args.bind_cert).read_bytes() if args.bind_cert else None
    except OSError as exc:
        return _fail(f"{exc.filename}: {exc.strerror}", EXIT_USAGE)
    # Loaded here first so that each problem names its own file: the key, the certificate, the JWKS.
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return _fail(f"--key {key_path}: not an unencrypted PEM private key (a public key cannot sign)", EXIT_USAGE)
    if bind is not None:
        try:
            cert_thumbprint(bind)
        except ValueError:
            return _fail(f"--bind-cert {args.bind_cert}: not a PEM or DER certificate", EXIT_USAGE)
    kid = args.kid
    jwks = key_path.with_name("jwks.json")
    try:
        if kid is None and jwks.exists():
            kid = kid_from_jwks(jwks, key)
    except TokenConfigError as exc:
        return _fail(f"{exc} (it is read for the key's kid; --kid skips it)", EXIT_USAGE)
    try:
        token = issue_token(
            private_key_pem=private_pem,
            sub=args.sub,
            kid=kid,
            iss=args.iss,
            aud=args.aud,
            scopes=args.scope or (),
            groups=args.group or (),
            ttl_s=args.ttl,
            bind_cert_pem=bind,
        )
    except TokenConfigError as exc:
        return _fail(f"--key {key_path}: {exc}", EXIT_USAGE)
    except ValueError as exc:
        return _fail(f"cannot issue a token: {exc}", EXIT_USAGE)
    print(token)
    return EXIT_OK


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from gateway.auth.principal import Principal
    from gateway.auth.verifier import groups_and_scopes
    from gateway.errors import AuthenticationError
    from gateway.policy import Action, PolicyError, load_policies

    try:
        policies = load_policies(Path(args.policies))
        claims = json.loads(args.claims) if args.claims else {}
        version = _judged_version(args)
    except (PolicyError, _UsageError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ValueError as exc:
        return _fail(f"--claims is not JSON: {exc}", EXIT_USAGE)
    if not isinstance(claims, dict):
        return _fail("--claims must be a JSON object", EXIT_USAGE)
    subject = claims.get("sub", "")
    try:
        groups, scopes = groups_and_scopes(claims, groups_claim=args.groups_claim, scopes_claim=args.scopes_claim)
    except AuthenticationError as exc:
        return _fail(f"--claims: {exc.reason}: the gateway refuses such a token", EXIT_USAGE)
    if not isinstance(subject, str):
        return _fail("--claims: malformed claim sub: the gateway refuses such a token", EXIT_USAGE)
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
            versions = sorted(v for name, v in scan(Path(args.models)) if name == args.model)
        except OSError as exc:
            raise _UsageError(f"--models: {exc.filename}: {exc.strerror}") from None
    if args.version is not None:
        if args.models and parse_version(args.version) not in (None, *versions):
            _note(f"{args.model} has no version {args.version} in {args.models}: if allowed, the call gets NOT_FOUND")
        return str(args.version)
    if args.models is None:
        _note('no --version or --models: judged for "no version", which rules with a versions list never match')
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
    missing = next((path for path in paths if not path.exists()), None)
    if missing is not None:
        return _fail(f"{missing}: no such file or directory", EXIT_USAGE)
    try:
        # The key is the file's bytes with surrounding whitespace stripped, as `serve` reads it (docs/audit.md).
        hmac_key = Path(args.hmac_key).read_bytes().strip() if args.hmac_key else None
    except OSError as exc:
        return _fail(f"{exc.filename}: {exc.strerror}", EXIT_USAGE)
    report = verify_files(paths, hmac_key=hmac_key)
    for line in report.lines():
        print(line)
    return EXIT_OK if report.ok else EXIT_FAILED


_CONNECTION = (
    ("target", "GATEWAY_TARGET", "HOST:PORT of the gateway"),
    ("ca", "GATEWAY_CA", "CA certificate that signed the server's certificate"),
    ("cert", "GATEWAY_CERT", "client certificate"),
    ("key", "GATEWAY_KEY", "client private key"),
    ("token", "GATEWAY_TOKEN", "bearer token (prefer --token-file: argv is visible to other users)"),
    ("token_file", "GATEWAY_TOKEN_FILE", "file holding the bearer token, re-read when it changes"),
    ("server_name", "GATEWAY_SERVER_NAME", "name to check the server certificate against (when --target is an IP)"),
)


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    for name, env, help_text in _CONNECTION:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, help=f"{help_text} [env {env}]")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds")


def _connect(args: argparse.Namespace) -> Any:
    """A Client from flags, falling back to GATEWAY_* environment variables."""
    import os

    from gateway.client import Client, TokenFile

    values = {name: getattr(args, name) or os.environ.get(env) for name, env, _ in _CONNECTION}
    target, ca, cert, key = (values[name] for name in ("target", "ca", "cert", "key"))
    if not (target and ca and cert and key):
        missing = [f"--{n}" for n in ("target", "ca", "cert", "key") if not values[n]]
        raise _UsageError(f"missing {', '.join(missing)} (or the GATEWAY_* environment variables)")
    if args.token and args.token_file:
        raise _UsageError("give --token or --token-file, not both")
    if args.token or args.token_file:
        # The two are one setting: a token flag overrides both GATEWAY_TOKEN and GATEWAY_TOKEN_FILE.
        values["token"], values["token_file"] = args.token, args.token_file
    elif values["token"] and values["token_file"]:
        raise _UsageError("set GATEWAY_TOKEN or GATEWAY_TOKEN_FILE, not both")
    token: Any = TokenFile(values["token_file"]) if values["token_file"] else values["token"]
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


class _UsageError(Exception):
    """A client command's arguments are wrong: exit 2."""


def _read_inputs(args: argparse.Namespace) -> Any:
    import numpy as np

    from gateway.errors import InvalidArgumentError
    from gateway.tensors import datatype_of

    if args.input is not None:
        try:
            data = json.loads(args.input)
        except json.JSONDecodeError as exc:
            raise _UsageError(f"--input is not JSON: {exc}") from None
    else:
        path = Path(args.input_file)
        try:
            if path.suffix == ".npy":
                array = np.load(path, allow_pickle=False)
                datatype_of(array)  # a dtype the protocol cannot carry is the caller's mistake, not a refusal
                return array
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise _UsageError(f"--input-file {path}: {exc}") from None
        except InvalidArgumentError as exc:
            raise _UsageError(f"--input-file {path}: {exc.message}") from None
    return _inputs_from_json(data)


def _inputs_from_json(data: Any) -> Any:
    """JSON input: a list of floats (simple form), or {name: nested list | {"data", "datatype", "shape"}}."""
    import numpy as np

    from gateway.tensors import BY_NAME

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
            if isinstance(value, dict):
                dtype = BY_NAME[str(value.get("datatype", "FP32")).upper()].dtype
                array = np.asarray(value["data"], dtype=dtype)
                if "shape" in value:
                    array = array.reshape(value["shape"])
            else:
                array = np.asarray(value, dtype=np.float32)
        except (KeyError, ValueError, TypeError) as exc:
            raise _UsageError(f"input '{name}': {exc}") from None
        inputs[name] = array
    return inputs


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
    from gateway.errors import GatewayError

    try:
        with _connect(args) as client:
            print(json.dumps(operation(client), indent=2, allow_nan=False))
    except _UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except GatewayError as exc:
        return _fail(str(exc))
    return EXIT_OK


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
        }

    return _run_client(args, metadata)


def build_parser() -> argparse.ArgumentParser:
    """The ``gateway`` argument parser."""
    parser = _Parser(prog="gateway", description="Secure, authenticated gRPC inference gateway for ONNX models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="gateway.yaml")
    serve.add_argument("--listen", help="HOST:PORT")
    serve.add_argument("--certs", help="a folder written by scripts/gen_certs.sh")
    serve.add_argument("--models", help="model repository folder")
    serve.add_argument("--policies", help="policy folder")
    serve.add_argument("--audit-log", help="audit trail path")
    serve.add_argument(
        "--dev",
        action="append",
        choices=("insecure_transport", "no_auth", "audit_fail_open"),
        help="development-only option (repeatable); logged loudly",
    )
    serve.add_argument("--workers", type=int, help="processes sharing the port, each with its own audit chain")
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor for its workers
    serve.set_defaults(run=_cmd_serve)

    token = commands.add_parser("token", help="token tools").add_subparsers(dest="token_command", required=True)
    issue = token.add_parser("issue", help="print a signed JWT")
    issue.add_argument("--key", required=True, help="private signing key (PEM)")
    issue.add_argument("--sub", required=True)
    issue.add_argument("--kid", help="key id (default: the key's id in a jwks.json beside the key)")
    issue.add_argument("--iss", default=DEFAULT_ISSUER)
    issue.add_argument("--aud", default=DEFAULT_AUDIENCE)
    issue.add_argument("--scope", action="append")
    issue.add_argument("--group", action="append")
    issue.add_argument("--ttl", type=int, default=3600, help="seconds")
    issue.add_argument("--bind-cert", help="bind the token to this client certificate (RFC 8705)")
    issue.set_defaults(run=_cmd_token_issue)

    policy = commands.add_parser("policy", help="policy tools").add_subparsers(dest="policy_command", required=True)
    check = policy.add_parser("check", help="print the decision and the rule that decided it")
    check.add_argument("--policies", required=True)
    check.add_argument("--model", required=True)
    check.add_argument("--version")
    check.add_argument("--action", required=True, choices=("predict", "stream", "metadata", "list"))
    check.add_argument("--cert-identity")
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

    audit = commands.add_parser("audit", help="audit trail tools").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="verify hash chains and checkpoints")
    verify.add_argument("paths", nargs="+")
    verify.add_argument("--hmac-key", help="key file of a keyed trail (its text, stripped; not hex-decoded)")
    verify.set_defaults(run=_cmd_audit_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.serve_args = argv[1:] if args.command == "serve" else []  # what a supervisor passes on to its workers
    return int(args.run(args))
