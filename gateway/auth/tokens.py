"""JWT bearer tokens (RFC 7519, RFC 7515): keys from a JWKS file, explicit ordered verification, a cache of
verified tokens, certificate binding (RFC 8705), and the issuer behind ``gateway token issue``.

Verification order, each step refusing with a short reason that never contains the token: size and shape;
header (``alg`` from the allowlist, never ``none``; ``kid`` known; ``alg`` pinned to that key's type, so an
RSA public key can never be used as an HMAC secret: CVE-2022-29217 and the classic alg-confusion attack);
signature and registered claims by pyjwt (exp required, nbf, iat, iss, aud, leeway); maximum lifetime;
claim shapes; then, on every call including cache hits, the certificate binding.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.errors import AuthenticationError
from gateway.watcher import Watcher, file_fingerprint

log = structlog.get_logger(__name__)

MAX_TOKEN_BYTES = 8192
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_FAMILIES = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
}
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}


class TokenConfigError(Exception):
    """A JWKS file or verifier setting the gateway cannot use; the message names the file and key."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint: SHA-256 over the required members, sorted, no whitespace."""
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    return _b64(hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest())


def _public_jwk(public_key: Any) -> dict[str, Any]:
    if isinstance(public_key, rsa.RSAPublicKey):
        return json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public_key))  # type: ignore[no-any-return]
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public_key))  # type: ignore[no-any-return]
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public_key))  # type: ignore[no-any-return]
    raise TokenConfigError(f"unsupported key type {type(public_key).__name__}")


def jwk_kid(public_key: Any) -> str:
    """The key id the project gives a public key: its RFC 7638 thumbprint."""
    return _thumbprint(_public_jwk(public_key))


def kid_from_jwks(jwks_path: str | Path, private_key_pem: bytes) -> str | None:
    """The kid under which a JWKS file publishes the public half of ``private_key_pem`` (None if absent)."""
    wanted = jwk_kid(serialization.load_pem_private_key(private_key_pem, password=None).public_key())
    for jwk in json.loads(Path(jwks_path).read_text()).get("keys", []):
        if isinstance(jwk, dict) and jwk.get("kty") in _THUMBPRINT_MEMBERS:
            try:
                if _thumbprint(jwk) == wanted:
                    return str(jwk.get("kid", wanted))
            except KeyError:
                continue
    return None


def cert_thumbprint(cert: bytes) -> str:
    """RFC 8705 ``x5t#S256`` of a certificate given as PEM or DER."""
    loaded = x509.load_pem_x509_certificate(cert) if b"-----BEGIN" in cert else x509.load_der_x509_certificate(cert)
    return _b64(hashlib.sha256(loaded.public_bytes(serialization.Encoding.DER)).digest())


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key from the JWKS with the algorithms pinned to it."""

    kid: str
    key: Any
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys in force, by kid; ``version`` changes on every reload (the verifier's cache follows it)."""

    keys: Mapping[str, VerificationKey]
    version: int = 0


def _family(jwk: Mapping[str, Any]) -> frozenset[str]:
    kty = jwk.get("kty")
    return _FAMILIES.get(kty if kty == "RSA" else (kty, jwk.get("crv")), frozenset())  # type: ignore[arg-type]


def load_jwks(path: str | Path, *, allowed_algorithms: Iterable[str], version: int = 0) -> KeySet:
    """Strictly load a public JWKS file (RFC 7517); TokenConfigError names the file and the key."""
    path = Path(path)
    allowed = frozenset(allowed_algorithms) - HMAC_ALGORITHMS
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TokenConfigError(f"{path}: cannot read a JWKS: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise TokenConfigError(f"{path}: a JWKS needs a non-empty 'keys' list")
    keys: dict[str, VerificationKey] = {}
    for index, jwk in enumerate(data["keys"]):
        where = f"{path}: key #{index}"
        if not isinstance(jwk, dict):
            raise TokenConfigError(f"{where}: not an object")
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenConfigError(f"{where}: needs a 'kid'")
        where = f"{path}: key {kid!r}"
        if kid in keys:
            raise TokenConfigError(f"{where}: duplicate kid")
        if jwk.get("use", "sig") != "sig":
            raise TokenConfigError(f"{where}: 'use' must be 'sig'")
        if _PRIVATE_MEMBERS & jwk.keys():
            raise TokenConfigError(f"{where}: private key material in a public JWKS")
        family = _family(jwk)
        if not family:
            raise TokenConfigError(f"{where}: unsupported key type {jwk.get('kty')}/{jwk.get('crv')}")
        if "alg" in jwk:
            if jwk["alg"] not in family or jwk["alg"] not in allowed:
                raise TokenConfigError(f"{where}: alg {jwk['alg']!r} is not allowed for this key")
            algorithms = frozenset({jwk["alg"]})
        else:
            algorithms = family & allowed
        if not algorithms:
            raise TokenConfigError(f"{where}: no allowed algorithm fits this key type")
        try:
            key = jwt.PyJWK(jwk, algorithm=next(iter(sorted(algorithms)))).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise TokenConfigError(f"{where}: invalid key: {exc}") from None
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
            raise TokenConfigError(f"{where}: RSA keys need at least 2048 bits")
        keys[kid] = VerificationKey(kid, key, algorithms)
    return KeySet(keys, version)


class KeyStore:
    """The JWKS in force, reloaded when the file changes; a broken new file is refused, old keys stay."""

    def __init__(self, path: str | Path, *, interval_s: float, allowed_algorithms: Iterable[str]) -> None:
        self.path = Path(path)
        self._allowed = tuple(allowed_algorithms)
        self.current = load_jwks(self.path, allowed_algorithms=self._allowed)
        self._watcher = Watcher(
            name="jwks",
            fingerprint=lambda: file_fingerprint((self.path,)),
            on_change=self._reload,
            interval_s=interval_s,
        )

    def _reload(self) -> None:
        try:
            keys = load_jwks(self.path, allowed_algorithms=self._allowed, version=self.current.version + 1)
        except TokenConfigError as exc:
            log.error("jwks_reload_failed", error=str(exc))
            return
        self.current = keys
        log.info("jwks_reloaded", kids=sorted(keys.keys))

    def start(self) -> None:
        """Watch the JWKS file."""
        self._watcher.start()

    def stop(self) -> None:
        """Stop watching."""
        self._watcher.stop()

    def reload_now(self) -> None:
        """Check the file once, synchronously."""
        self._watcher.check_now()


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The claims the gateway uses from a verified token, and whether it is bound to this connection."""

    subject: str
    issuer: str
    token_id: str | None
    groups: frozenset[str]
    scopes: frozenset[str]
    expires_at: float
    bound: bool = False


@dataclass(frozen=True, slots=True)
class _Cached:
    token: VerifiedToken
    x5t: str | None
    keys_version: int


# pyjwt's exceptions, most specific first, to the short reasons that go to the audit record.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidIssuedAtError, "invalid iat"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidKeyError, "unusable key"),
    (jwt.DecodeError, "malformed token"),
)


def _reason(exc: jwt.InvalidTokenError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim}"
    return next((reason for cls, reason in _REASONS if isinstance(exc, cls)), "invalid token")


def _strings(value: Any, claim: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise AuthenticationError(reason=f"malformed claim {claim}")


class TokenVerifier:
    """Verifies bearer tokens against the KeyStore; verified tokens are cached until their exp."""

    def __init__(
        self,
        *,
        keys: KeyStore,
        issuer: str,
        audience: str,
        algorithms: Sequence[str] = ("RS256", "ES256", "EdDSA"),
        leeway_s: float = 30.0,
        max_lifetime_s: float = 86400.0,
        required_claims: Sequence[str] = ("exp", "iss", "aud", "sub"),
        groups_claim: str = "groups",
        scopes_claim: str = "scope",
        hmac_secret: bytes | None = None,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if hmac_secret is not None:
            _check_hmac_secret(hmac_secret)
        self._keys = keys
        self._issuer, self._audience = issuer, audience
        self._algorithms = frozenset(algorithms) | (HMAC_ALGORITHMS if hmac_secret is not None else frozenset())
        self._leeway = leeway_s
        self._max_lifetime = max_lifetime_s
        # exp is always required: a token without an expiry would be valid forever (RFC 7519 4.1.4).
        self._require = sorted({*required_claims, "exp"})
        self._groups_claim, self._scopes_claim = groups_claim, scopes_claim
        self._hmac_secret = hmac_secret
        self._clock = clock
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.signature_checks = 0  # how many tokens went through pyjwt (the cache's effect, for tests/metrics)

    def verify(self, token: str, *, cert_x5t: str | None) -> VerifiedToken:
        """A verified token bound (if it says so) to this connection's certificate, or AuthenticationError."""
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError(reason="token too large")
        digest = hashlib.sha256(token.encode()).digest()
        keys_version = self._keys.current.version
        with self._lock:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
        if cached is None or cached.keys_version != keys_version or self._clock() >= cached.token.expires_at:
            cached = _Cached(*self._verify(token), keys_version)
            with self._lock:
                # Failures are not cached: they cost a signature check each, and callers hold a client cert.
                self._cache[digest] = cached
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return self._bind(cached, cert_x5t)

    @staticmethod
    def _bind(cached: _Cached, cert_x5t: str | None) -> VerifiedToken:
        """RFC 8705 3.1: a token with cnf.x5t#S256 is valid only on a connection with that certificate."""
        if cached.x5t is None:
            return cached.token
        if cert_x5t is None or not hmac.compare_digest(cached.x5t, cert_x5t):
            raise AuthenticationError(reason="token bound to another certificate")
        return VerifiedToken(**{**_fields(cached.token), "bound": True})

    def _verify(self, token: str) -> tuple[VerifiedToken, str | None]:
        if token.count(".") != 2:
            raise AuthenticationError(reason="malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthenticationError(reason="malformed token") from None
        key, algorithm = self._key_for(header)
        self.signature_checks += 1
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": self._require},
            )
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError(reason=_reason(exc)) from None
        return self._claims(claims)

    def _key_for(self, header: Mapping[str, Any]) -> tuple[Any, str]:
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            raise AuthenticationError(reason="malformed token")
        if algorithm.lower() == "none":
            raise AuthenticationError(reason="algorithm none")
        if "crit" in header:  # RFC 7515 4.1.11: we understand no extension, so any critical one is refused
            raise AuthenticationError(reason="unsupported critical header")
        if algorithm not in self._algorithms:
            raise AuthenticationError(reason=f"algorithm {algorithm} not allowed")
        if algorithm in HMAC_ALGORITHMS:
            return self._hmac_secret, algorithm  # only reachable when a shared secret is configured
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError(reason="missing kid")
        key = self._keys.current.keys.get(kid)
        if key is None:
            raise AuthenticationError(reason="unknown kid")
        if algorithm not in key.algorithms:
            raise AuthenticationError(reason=f"algorithm {algorithm} not allowed for this key")
        return key.key, algorithm

    def _claims(self, claims: Mapping[str, Any]) -> tuple[VerifiedToken, str | None]:
        exp = claims["exp"]
        iat = claims.get("iat")
        lifetime = exp - (iat if isinstance(iat, int | float) else self._clock())
        if lifetime > self._max_lifetime:
            raise AuthenticationError(reason="token lifetime over the maximum")
        subject, issuer, jti = claims.get("sub"), claims.get("iss"), claims.get("jti")
        if not isinstance(subject, str) or not subject or not isinstance(issuer, str):
            raise AuthenticationError(reason="malformed claim sub")
        if jti is not None and not isinstance(jti, str):
            raise AuthenticationError(reason="malformed claim jti")
        groups = _strings(claims.get(self._groups_claim), self._groups_claim)
        scope_claims = (self._scopes_claim, "scp" if self._scopes_claim != "scp" else "scope")
        scope_claim = next((name for name in scope_claims if name in claims), self._scopes_claim)
        scopes = _strings(claims.get(scope_claim), scope_claim)
        x5t = None
        if "cnf" in claims:
            cnf = claims["cnf"]
            if not isinstance(cnf, dict):
                raise AuthenticationError(reason="malformed claim cnf")
            x5t = cnf.get("x5t#S256")
            if x5t is None:
                # A binding we cannot check must not be ignored: fail closed.
                raise AuthenticationError(reason="unsupported confirmation method")
            if not isinstance(x5t, str):
                raise AuthenticationError(reason="malformed claim cnf")
        return VerifiedToken(subject, issuer, jti, groups, scopes, float(exp)), x5t


def _fields(token: VerifiedToken) -> dict[str, Any]:
    return {name: getattr(token, name) for name in VerifiedToken.__slots__}  # type: ignore[attr-defined]


def _check_hmac_secret(secret: bytes) -> None:
    """HMAC only with a real shared secret, never with something that looks like a public key."""
    stripped = secret.strip()
    if len(stripped) < 32:
        raise TokenConfigError("auth.hmac_secret_file: the shared secret needs at least 32 bytes")
    if stripped.startswith((b"-----BEGIN", b"ssh-", b"ecdsa-", b"{")):
        raise TokenConfigError("auth.hmac_secret_file: looks like a key or a JWK, not a shared secret")


def _algorithm_for(private_key: Any) -> str:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ES256", "secp384r1": "ES384"}[private_key.curve.name]
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise TokenConfigError(f"unsupported signing key type {type(private_key).__name__}")


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
    """A signed JWT; with ``bind_cert_pem`` it is bound to that client certificate (RFC 8705)."""
    private_key = serialization.load_pem_private_key(private_key_pem, password=None)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": iss,
        "sub": sub,
        "aud": aud,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_s),
        "jti": secrets.token_urlsafe(16),
    }
    if scopes := list(scopes):
        claims["scope"] = " ".join(scopes)
    if groups := list(groups):
        claims["groups"] = groups
    if bind_cert_pem is not None:
        claims["cnf"] = {"x5t#S256": cert_thumbprint(bind_cert_pem)}
    claims.update(extra_claims or {})
    headers = {"kid": kid or jwk_kid(private_key.public_key()), "typ": "JWT"}
    return jwt.encode(claims, private_key, algorithm=_algorithm_for(private_key), headers=headers)  # type: ignore[arg-type]
