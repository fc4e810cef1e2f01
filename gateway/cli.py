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

from gateway.config import DEFAULT_AUDIENCE, DEFAULT_ISSUER, ConfigError, certs_dir_overrides, load_settings

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
    from gateway.auth.certs import CertificateConfigError
    from gateway.auth.tokens import TokenConfigError
    from gateway.models.runtime import ModelLoadError
    from gateway.policy import PolicyError
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
    try:
        settings = load_settings(Path(args.config) if args.config else None, overrides)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    oplog.configure(fmt=settings.log_format, level=settings.log_level)
    try:
        gateway = Gateway(settings)
        gateway.serve_forever()
    except (CertificateConfigError, TokenConfigError, PolicyError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ModelLoadError as exc:
        return _fail(f"cannot start: {exc}")
    except OSError as exc:
        return _fail(f"cannot start: {exc}")
    return EXIT_OK


def _cmd_token_issue(args: argparse.Namespace) -> int:
    from gateway.auth.tokens import issue_token, kid_from_jwks

    key_path = Path(args.key)
    try:
        private_pem = key_path.read_bytes()
        bind = Path(args.bind_cert).read_bytes() if args.bind_cert else None
    except OSError as exc:
        return _fail(f"{exc.filename}: {exc.strerror}", EXIT_USAGE)
    kid = args.kid
    jwks = key_path.with_name("jwks.json")
    if kid is None and jwks.exists():
        kid = kid_from_jwks(jwks, private_pem)
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
    print(token)
    return EXIT_OK


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from gateway.auth.principal import Principal
    from gateway.policy import Action, PolicyError, load_policies

    try:
        policies = load_policies(Path(args.policies))
        claims = json.loads(args.claims) if args.claims else {}
        if not isinstance(claims, dict):
            raise ValueError("--claims must be a JSON object")
        action = Action(args.action)
    except PolicyError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    scopes = claims.get("scope", claims.get("scp", ""))
    principal = Principal(
        cert_identity=args.cert_identity or "",
        cert_sha256="",
        subject=str(claims.get("sub", "")),
        issuer=str(claims.get("iss", "")),
        token_id=claims.get("jti"),
        groups=frozenset(claims.get("groups", [])),
        scopes=frozenset(scopes.split() if isinstance(scopes, str) else scopes),
        token_bound=bool(args.bound),
    )
    decision = policies.evaluate(principal, model=args.model, version=args.version, action=action)
    print(decision.explain())
    return EXIT_OK if decision.allowed else EXIT_FAILED


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.audit import verify_files

    try:
        hmac_key = Path(args.hmac_key).read_bytes().strip() if args.hmac_key else None
    except OSError as exc:
        return _fail(f"{exc.filename}: {exc.strerror}", EXIT_USAGE)
    report = verify_files([Path(p) for p in args.paths], hmac_key=hmac_key)
    for line in report.lines():
        print(line)
    return EXIT_OK if report.ok else EXIT_FAILED


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
    check.set_defaults(run=_cmd_policy_check)

    audit = commands.add_parser("audit", help="audit trail tools").add_subparsers(dest="audit_command", required=True)
    verify = audit.add_parser("verify", help="verify hash chains and checkpoints")
    verify.add_argument("paths", nargs="+")
    verify.add_argument("--hmac-key", help="key file, when the trail is HMAC-chained")
    verify.set_defaults(run=_cmd_audit_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` command."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))
