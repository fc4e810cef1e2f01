"""Token issuing: the signed JWT behind ``gateway token issue``, the demo and the tests, made so that the gateway's
own verifier accepts it (algorithm pinned by key type, kid by RFC 7638 thumbprint, optional RFC 8705 binding).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.auth.keys import TokenConfigError, cert_thumbprint, jwk_kid

__all__ = ["issue_token"]

_ISSUED_CLAIMS = frozenset({"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope", "groups", "cnf"})

_SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _signing_key(private_key_pem: bytes) -> tuple[_SigningKey, str]:
    """The private key and the one algorithm the verifier pins to its type."""
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise TokenConfigError(f"signing key: cannot load an unencrypted PEM private key: {exc}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise TokenConfigError("signing key: RSA keys need at least 2048 bits")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = {"secp256r1": "ES256", "secp384r1": "ES384"}.get(key.curve.name)
        if algorithm is None:
            raise TokenConfigError(f"signing key: unsupported curve {key.curve.name}")
        return key, algorithm
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key, "EdDSA"
    raise TokenConfigError(f"signing key: unsupported key type {type(key).__name__}")


def issue_token(
    *,
    private_key_pem: bytes,
    sub: str,
    iss: str,
    aud: str,
    kid: str | None = None,
    scopes: Iterable[str] = (),
    groups: Iterable[str] = (),
    ttl_s: float = 3600,
    bind_cert_pem: bytes | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """A signed JWT (RS256, ES256/ES384 or EdDSA by key type); with ``bind_cert_pem`` it is bound per RFC 8705.

    ``kid`` defaults to the key's RFC 7638 thumbprint, the kid gen_certs.sh publishes; when a JWKS names the key
    otherwise, pass ``kid_from_jwks(jwks_path, private_key_pem)``.
    """
    private_key, algorithm = _signing_key(private_key_pem)
    scope_list, group_list = list(scopes), list(groups)
    if not sub:
        raise ValueError("sub must be a non-empty string")
    if ttl_s < 1:
        raise ValueError("ttl_s must be at least one second")
    if any(not isinstance(s, str) or not s or len(s.split()) != 1 for s in scope_list):
        raise ValueError("each scope must be a non-empty string without whitespace")  # it is sent space-joined
    if any(not isinstance(g, str) or not g for g in group_list):
        raise ValueError("each group must be a non-empty string")
    if overridden := _ISSUED_CLAIMS & set(extra_claims or {}):
        raise ValueError(f"extra_claims may not replace {sorted(overridden)}")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": iss,
        "sub": sub,
        "aud": aud,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_s),
        "jti": secrets.token_urlsafe(16),
        **(extra_claims or {}),
    }
    if scope_list:
        claims["scope"] = " ".join(scope_list)
    if group_list:
        claims["groups"] = group_list
    if bind_cert_pem is not None:
        claims["cnf"] = {"x5t#S256": cert_thumbprint(bind_cert_pem)}
    headers = {"kid": kid or jwk_kid(private_key.public_key()), "typ": "JWT"}
    return jwt.encode(claims, private_key, algorithm=algorithm, headers=headers)
