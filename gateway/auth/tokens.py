"""JWT bearer tokens (RFC 7519 over RFC 7515 JWS): strict JWKS loading and rotation, explicit ordered verification
with a cache of verified tokens, certificate binding (RFC 8705), and the issuer behind ``gateway token issue``.

No grpc here: the interceptor hands over the bearer string and the client certificate's ``x5t#S256``, and turns the
AuthenticationError raised here into UNAUTHENTICATED. docs/tokens.md lists the checks in order, with the defaults.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import jwt
import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.utils import is_pem_format, is_ssh_key

from gateway.errors import AuthenticationError, StartupError
from gateway.watcher import ReloadingStore, file_fingerprint

__all__ = [
    "DEFAULT_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "MAX_TOKEN_BYTES",
    "SUPPORTED_ALGORITHMS",
    "KeySet",
    "KeyStore",
    "TokenConfigError",
    "TokenVerifier",
    "VerificationKey",
    "VerifiedToken",
    "cert_thumbprint",
    "groups_and_scopes",
    "issue_token",
    "jwk_kid",
    "kid_from_jwks",
    "load_jwks",
]

log = structlog.get_logger(__name__)

MAX_TOKEN_BYTES = 8192
MAX_JWKS_BYTES = 1 << 20
DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
# RFC 7518 3.2: an HMAC key at least as long as the hash output.
_HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
HMAC_ALGORITHMS = frozenset(_HMAC_KEY_BYTES)
# Algorithm families by key type: the only algorithms a key of that type may ever verify (RFC 7518 3.1).
_FAMILIES: Mapping[tuple[str, str | None], frozenset[str]] = {
    ("RSA", None): frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
}
_ASYMMETRIC_ALGORITHMS = frozenset(alg for family in _FAMILIES.values() for alg in family)
SUPPORTED_ALGORITHMS = _ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS
_PUBLIC_KEY_TYPES: Mapping[str, type] = {
    "RSA": rsa.RSAPublicKey,
    "EC": ec.EllipticCurvePublicKey,
    "OKP": ed25519.Ed25519PublicKey,
}
# RFC 7518 6.2.2, 6.3.2 and 6.4 (oct), RFC 8037 2: members that only a private or symmetric key has.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# RFC 7638 3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_X5T_S256 = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256 digest, no padding
# RFC 8725 3.11 / RFC 9068 2.1: explicit typing; anything else (a DPoP proof, a logout token) is not ours.
_TOKEN_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
_ISSUED_CLAIMS = frozenset({"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "scope", "groups", "cnf"})


class TokenConfigError(StartupError):
    """A JWKS file, signing key or verifier setting the gateway cannot use; the message names the file and key."""


# --------------------------------------------------------------------------------------------- keys and thumbprints


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint of a public JWK; KeyError/TypeError when a required member is absent or not a string."""
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    if not all(isinstance(value, str) for value in members.values()):
        raise TypeError("JWK members must be strings")
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return _b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


def _public_key_of(key: Any) -> Any:
    """The public half of a private key object; public keys pass through."""
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        return key.public_key()
    return key


def _public_jwk(public_key: Any) -> dict[str, Any]:
    key = _public_key_of(public_key)
    if isinstance(key, rsa.RSAPublicKey):
        return jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return jwt.algorithms.OKPAlgorithm.to_jwk(key, as_dict=True)
    raise TokenConfigError(f"unsupported key type {type(key).__name__}")


def jwk_kid(public_key: Any) -> str:
    """The kid the project gives a key (public or private object): its RFC 7638 JWK thumbprint."""
    return _thumbprint(_public_jwk(public_key))


def cert_thumbprint(cert: bytes | str) -> str:
    """RFC 8705 3.1 ``x5t#S256``: base64url (no padding) SHA-256 of the certificate's DER, given PEM or DER."""
    data = cert.encode("ascii") if isinstance(cert, str) else cert
    loaded = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    return _b64url(hashlib.sha256(loaded.public_bytes(serialization.Encoding.DER)).digest())


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for name, value in pairs:
        if name in obj:  # RFC 7517 4 / RFC 8259 4: the last-one-wins reading would hide a second key
            raise ValueError(f"duplicate member {name!r}")
        obj[name] = value
    return obj


def _read_jwks(path: Path) -> list[Any]:
    """The ``keys`` list of a JWKS file, parsed strictly (no duplicate members, no NaN, bounded size)."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_JWKS_BYTES + 1)
        if len(raw) > MAX_JWKS_BYTES:
            raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
        data = json.loads(raw, object_pairs_hook=_strict_object, parse_constant=_reject_constant)
    except (OSError, ValueError) as exc:
        raise TokenConfigError(f"{path}: cannot read a JWKS: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise TokenConfigError(f"{path}: a JWKS needs a non-empty 'keys' list")
    return data["keys"]


def _load_key_bytes(data: bytes) -> Any:
    """A key object from PEM bytes: a private key, else a public key."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        pass
    try:
        return serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise TokenConfigError("not a PEM private or public key (or one protected by a password)") from None


def kid_from_jwks(jwks_path: str | Path, key: Any) -> str | None:
    """The kid under which a JWKS file publishes ``key`` (a key object, or private/public PEM bytes); None if absent.

    Matching is by RFC 7638 thumbprint, so it finds the key whatever kid the file's author chose.
    """
    if isinstance(key, str):
        key = key.encode("ascii")
    wanted = jwk_kid(_load_key_bytes(key) if isinstance(key, bytes) else key)
    for jwk in _read_jwks(Path(jwks_path)):
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or not isinstance(jwk.get("kid"), str):
            continue
        try:
            if jwk.get("kty") in _THUMBPRINT_MEMBERS and _thumbprint(jwk) == wanted:
                return str(jwk["kid"])
        except (KeyError, TypeError):
            continue
    return None


# ------------------------------------------------------------------------------------------------------------- JWKS


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key from the JWKS with the algorithms pinned to it."""

    kid: str
    key: Any
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys in force, by kid; ``version`` grows on every reload, and the verifier's cache follows it."""

    keys: Mapping[str, VerificationKey]
    version: int = 0

    @property
    def kids(self) -> list[str]:
        """The key ids, sorted."""
        return sorted(self.keys)


def _family(jwk: Mapping[str, Any]) -> frozenset[str]:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if not isinstance(kty, str) or not isinstance(crv, str | None):  # untrusted JSON: a list here is unhashable
        return frozenset()
    return _FAMILIES.get((kty, None if kty == "RSA" else crv), frozenset())


def _verification_key(jwk: Any, allowed: frozenset[str], path: Path, index: int) -> VerificationKey:
    """One JWKS entry, checked in order: shape, kid, use, no private members, key_ops, type, pinned alg, the key."""
    if not isinstance(jwk, dict):
        raise TokenConfigError(f"{path}: key #{index}: not an object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenConfigError(f"{path}: key #{index}: needs a 'kid'")
    where = f"{path}: key {kid!r}"
    if jwk.get("use", "sig") != "sig":
        raise TokenConfigError(f"{where}: 'use' must be 'sig'")
    if _PRIVATE_MEMBERS & jwk.keys():
        raise TokenConfigError(f"{where}: private key material in a public JWKS")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise TokenConfigError(f"{where}: 'key_ops' must include 'verify'")
    family = _family(jwk)
    if not family:
        raise TokenConfigError(f"{where}: unsupported key type {jwk.get('kty')!r}/{jwk.get('crv')!r}")
    if "alg" in jwk:
        # The JWK's own alg pins the key to exactly one algorithm (RFC 7517 4.4), if we allow it for this type.
        if not isinstance(jwk["alg"], str) or jwk["alg"] not in family or jwk["alg"] not in allowed:
            raise TokenConfigError(f"{where}: alg {jwk['alg']!r} is not allowed for this key")
        algorithms = frozenset({jwk["alg"]})
    else:
        algorithms = family & allowed
    if not algorithms:
        raise TokenConfigError(f"{where}: no allowed algorithm fits this key type")
    try:
        # The algorithm is ours, never the JWK's: pyjwt then parses the key as that type or refuses.
        key = jwt.PyJWK(jwk, algorithm=min(algorithms)).key
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise TokenConfigError(f"{where}: invalid key: {exc}") from None
    if not isinstance(key, _PUBLIC_KEY_TYPES[jwk["kty"]]):
        raise TokenConfigError(f"{where}: not a public key")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise TokenConfigError(f"{where}: RSA keys need at least 2048 bits")
    return VerificationKey(kid, key, algorithms)


def load_jwks(path: str | Path, *, allowed_algorithms: Iterable[str] = DEFAULT_ALGORITHMS) -> KeySet:
    """Strictly load a public JWKS file (RFC 7517); any problem is a TokenConfigError naming the file and key.

    Each key goes through ``jwt.PyJWK`` on its own: ``jwt.PyJWKSet`` silently skips keys it cannot use, and a
    JWKS the gateway half-understands is a configuration error, not a smaller key set.
    """
    path = Path(path)
    allowed = frozenset(allowed_algorithms) - HMAC_ALGORITHMS  # a JWKS never holds an HMAC secret
    keys: dict[str, VerificationKey] = {}
    for index, jwk in enumerate(_read_jwks(path)):
        key = _verification_key(jwk, allowed, path, index)
        if key.kid in keys:
            raise TokenConfigError(f"{path}: key {key.kid!r}: duplicate kid")
        keys[key.kid] = key
    return KeySet(MappingProxyType(keys))


class KeyStore:
    """The JWKS in force, reloaded when the file changes; a broken new file is refused and the old keys stay."""

    def __init__(
        self, path: str | Path, *, interval_s: float, allowed_algorithms: Iterable[str] = DEFAULT_ALGORITHMS
    ) -> None:
        self.path = Path(path)
        self._allowed = tuple(allowed_algorithms)
        # A broken JWKS at startup is a configuration error.
        self._keys = ReloadingStore(
            name="jwks",
            fingerprint=lambda: file_fingerprint((self.path,)),
            load=self._load,
            refused=TokenConfigError,
            interval_s=interval_s,
            reloaded="jwks_reloaded",
            failed="jwks_reload_failed",
            reloaded_fields=lambda old, new: {
                "path": str(self.path),
                "kids": new.kids,
                "added": sorted(new.keys.keys() - old.keys.keys()),
                "removed": sorted(old.keys.keys() - new.keys.keys()),
                "version": new.version,
            },
            failed_fields=lambda _old: {"path": str(self.path)},
        )

    @property
    def current(self) -> KeySet:
        """The key set in force (read it once per use: a reload swaps the whole set)."""
        return self._keys.current

    @property
    def version(self) -> int:
        """Grows by one on every successful reload."""
        return self._keys.current.version

    def start(self) -> None:
        """Poll the JWKS file in a daemon thread."""
        self._keys.start()

    def stop(self) -> None:
        """Stop polling."""
        self._keys.stop()

    def reload_now(self) -> bool:
        """Poll once, synchronously; returns whether a change was seen (loaded or refused)."""
        return self._keys.check_now()

    def _load(self, old: KeySet | None) -> KeySet:
        new = load_jwks(self.path, allowed_algorithms=self._allowed)
        return new if old is None else dataclasses.replace(new, version=old.version + 1)


# ----------------------------------------------------------------------------------------------------- verification


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
class _Verified:
    """A cache entry: the token as verified, and the certificate thumbprint it is bound to (checked per call).

    ``token`` is what a call gets once the binding holds: ``bound`` is set when there is a binding.
    """

    token: VerifiedToken
    x5t: str | None


# Every pyjwt exception the verifier can see, most specific first, to the short reason for audit and logs.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidIssuedAtError, "malformed claim iat"),
    (jwt.exceptions.InvalidSubjectError, "malformed claim sub"),
    (jwt.exceptions.InvalidJTIError, "malformed claim jti"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidKeyError, "unusable key"),
    (jwt.DecodeError, "malformed token"),
)


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim}"  # the claim name is one of ours, never token text
    return next((reason for cls, reason in _REASONS if isinstance(exc, cls)), "invalid token")


def _refuse(reason: str) -> NoReturn:
    raise AuthenticationError(reason=reason)


def _string_list(value: Any, claim: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, list) and all(isinstance(item, str) and item for item in value):
        return frozenset(value)
    _refuse(f"malformed claim {claim}")


def _scope_values(value: Any, claim: str) -> frozenset[str]:
    """``scope`` is a space-separated string (RFC 8693 4.2); ``scp`` and custom claims may also be a list."""
    if isinstance(value, str):
        return frozenset(value.split())
    if claim == "scope" and value is not None:
        _refuse("malformed claim scope")
    return _string_list(value, claim)


def groups_and_scopes(
    claims: Mapping[str, Any], *, groups_claim: str = "groups", scopes_claim: str = "scope"
) -> tuple[frozenset[str], frozenset[str]]:
    """A token's groups and scopes; AuthenticationError when malformed. One reader for the verifier and for
    ``gateway policy check``, so that they cannot disagree on a claim's shape.

    The scopes come from ``scopes_claim``, else ``scope``, else ``scp``: the first one present.
    """
    groups = _string_list(claims.get(groups_claim), groups_claim)
    names = (scopes_claim, *(name for name in ("scope", "scp") if name != scopes_claim))
    scope_claim = next((name for name in names if name in claims), scopes_claim)
    return groups, _scope_values(claims.get(scope_claim), scope_claim)


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """RFC 7519 2 NumericDate: a finite JSON number. bool is an int in Python, and NaN compares false with all."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        _refuse(f"malformed claim {name}")
    try:
        number = float(value)  # a JSON integer can be too large for a float
    except OverflowError:
        _refuse(f"malformed claim {name}")
    if not math.isfinite(number):
        _refuse(f"malformed claim {name}")
    return number


def _check_hmac_secret(secret: bytes) -> None:
    """HMAC only with a real shared secret, never with something that is (or looks like) a public key."""
    if not isinstance(secret, bytes):
        raise TokenConfigError("hmac_secret: must be bytes")
    stripped = secret.strip()
    if len(stripped) < _HMAC_KEY_BYTES["HS256"]:
        raise TokenConfigError("hmac_secret: the shared secret needs at least 32 bytes (RFC 7518 3.2)")
    # A public key used as the HMAC secret lets anyone who has it sign tokens: CVE-2017-11424, CVE-2022-29217.
    looks_like_key = (
        is_pem_format(stripped) or b"-----BEGIN" in stripped or is_ssh_key(stripped) or stripped.startswith(b"{")
    )
    for load in (serialization.load_der_public_key, x509.load_der_x509_certificate):
        with contextlib.suppress(ValueError, UnsupportedAlgorithm):
            load(stripped)
            looks_like_key = True
    if looks_like_key:
        raise TokenConfigError("hmac_secret: looks like a key, a certificate or a JWK, not a shared secret")


def _hmac_algorithms(algorithms: Sequence[str], secret: bytes | None) -> frozenset[str]:
    """The HMAC algorithms to accept: only those listed, and only with a shared secret long enough for each."""
    requested = HMAC_ALGORITHMS & set(algorithms)
    if secret is None:
        if requested:
            raise TokenConfigError(f"algorithms: {sorted(requested)} need a shared secret (hmac_secret)")
        return frozenset()
    _check_hmac_secret(secret)
    if not requested:
        raise TokenConfigError("hmac_secret: configured, but algorithms lists no HS256, HS384 or HS512")
    too_short = sorted(alg for alg in requested if len(secret.strip()) < _HMAC_KEY_BYTES[alg])
    if too_short:
        raise TokenConfigError(f"hmac_secret: too short for {too_short} (RFC 7518 3.2)")
    return requested


class TokenVerifier:
    """Verifies bearer tokens against the KeyStore in a fixed order; verified tokens are cached until their exp."""

    def __init__(
        self,
        *,
        keys: KeyStore,
        issuer: str,
        audience: str,
        algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
        leeway_s: float = 30.0,
        max_lifetime_s: float = 86400.0,
        required_claims: Sequence[str] = ("exp", "iss", "aud", "sub"),
        groups_claim: str = "groups",
        scopes_claim: str = "scope",
        hmac_secret: bytes | None = None,
        cache_size: int = 10000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        unknown = set(algorithms) - SUPPORTED_ALGORITHMS
        if unknown:  # "none" included: an unsigned token is never acceptable (RFC 8725 3.1)
            raise TokenConfigError(f"algorithms: unsupported {sorted(unknown)}")
        for name, value in (
            ("issuer", issuer),
            ("audience", audience),
            ("groups_claim", groups_claim),
            ("scopes_claim", scopes_claim),
        ):
            if not isinstance(value, str) or not value:
                raise TokenConfigError(f"{name}: must be a non-empty string")
        if leeway_s < 0 or max_lifetime_s <= 0 or cache_size < 0:
            raise TokenConfigError("leeway_s and cache_size must be >= 0, max_lifetime_s > 0")
        self._keys = keys
        self._issuer, self._audience = issuer, audience
        self._hmac_secret = hmac_secret
        self._algorithms = (frozenset(algorithms) - HMAC_ALGORITHMS) | _hmac_algorithms(algorithms, hmac_secret)
        self._leeway = float(leeway_s)
        self._max_lifetime = float(max_lifetime_s)
        # exp is always required: a token without an expiry would be valid forever (RFC 7519 4.1.4).
        self._require = sorted({*required_claims, "exp"})
        self._groups_claim = groups_claim
        self._scopes_claim = scopes_claim
        self._clock = clock
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._cache_size = cache_size
        self._cache_keys_version = keys.current.version
        self._lock = threading.Lock()
        self.signature_checks = 0  # tokens that went through jwt.decode: the cache's effect, for tests and metrics

    @property
    def cached_tokens(self) -> int:
        """How many verified tokens the cache holds now."""
        with self._lock:
            return len(self._cache)

    def verify(self, token: str, *, cert_x5t: str | None) -> VerifiedToken:
        """The verified token (``bound`` when its cnf names this connection's certificate), or AuthenticationError."""
        # Size and shape first, before any parsing or hashing (RFC 7515 7.1 compact serialization).
        if not isinstance(token, str) or not token.isascii():
            _refuse("malformed token")
        if len(token) > MAX_TOKEN_BYTES:
            _refuse("token too large")
        if not _COMPACT_JWS.fullmatch(token):
            _refuse("malformed token")
        # The cache is keyed by a digest: the token itself is never kept, so a memory dump holds no credentials.
        digest = hashlib.sha256(token.encode("ascii")).digest()
        keyset = self._keys.current  # one read: a concurrent reload swaps the whole set
        entry = self._lookup(digest, keyset.version)
        if entry is None:
            entry = self._verify(token, keyset)
            self._remember(digest, entry, keyset.version)
        # Binding runs on every call, cache hit or not: a cached token is useless from another certificate.
        return self._bind(entry, cert_x5t)

    def _lookup(self, digest: bytes, keys_version: int) -> _Verified | None:
        now = self._clock()
        with self._lock:
            if keys_version > self._cache_keys_version:
                # Keys changed: a removed or replaced key must stop validating tokens at once.
                self._cache.clear()
                self._cache_keys_version = keys_version
                return None
            if keys_version < self._cache_keys_version:
                return None  # this call read the key set just before a reload: no entry is from those keys
            entry = self._cache.get(digest)
            if entry is None:
                return None
            if now >= entry.token.expires_at:  # never past exp; the leeway is for fresh decisions only
                del self._cache[digest]
                return None
            self._cache.move_to_end(digest)
            return entry

    def _remember(self, digest: bytes, entry: _Verified, keys_version: int) -> None:
        # Refusals are never cached: an attacker's unique garbage would only evict good entries, and the cheap
        # refusals (shape, header, kid) happen before any signature work anyway.
        if self._cache_size == 0 or self._clock() >= entry.token.expires_at:
            return
        with self._lock:
            if keys_version != self._cache_keys_version:
                return  # verified against keys that have since been replaced
            self._cache[digest] = entry
            self._cache.move_to_end(digest)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    @staticmethod
    def _bind(entry: _Verified, cert_x5t: str | None) -> VerifiedToken:
        """RFC 8705 3.1: a token with cnf.x5t#S256 is valid only on a connection with that certificate."""
        if entry.x5t is None:
            return entry.token
        if cert_x5t is None or not hmac.compare_digest(entry.x5t.encode(), cert_x5t.encode()):
            _refuse("token bound to another certificate")
        return entry.token

    def _verify(self, token: str, keyset: KeySet) -> _Verified:
        try:
            header = jwt.get_unverified_header(token)  # also refuses crit extensions pyjwt does not know
        except jwt.PyJWTError:
            _refuse("malformed token")
        key, algorithm = self._key_for(header, keyset)
        with self._lock:
            self.signature_checks += 1
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],  # the one algorithm the header named and the key allows
                audience=self._audience,
                issuer=self._issuer,
                # exp, nbf and iat are checked in _claims against self._clock, the clock the cache uses too:
                # pyjwt reads the wall clock, which a verifier (or a test) cannot inject.
                options={"require": self._require, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            _refuse(_reason(exc))
        return self._claims(claims)

    def _key_for(self, header: Mapping[str, Any], keyset: KeySet) -> tuple[Any, str]:
        """The key and algorithm for this header; embedded jwk/jku/x5u/x5c headers are never read."""
        algorithm = header.get("alg")
        if not isinstance(algorithm, str):
            _refuse("malformed token")
        if algorithm.lower() == "none":  # RFC 8725 3.1
            _refuse("algorithm none")
        if algorithm not in self._algorithms:
            # The name goes into the reason only when it is a known one: the header is attacker text.
            _refuse(
                f"algorithm {algorithm} not allowed" if algorithm in SUPPORTED_ALGORITHMS else "algorithm not allowed"
            )
        if "crit" in header:  # RFC 7515 4.1.11: the gateway understands no extension, so any critical one fails
            _refuse("unsupported critical header")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _TOKEN_TYPES):
            _refuse("unexpected token type")
        if algorithm in HMAC_ALGORITHMS:
            # Only reachable with a configured secret, and only that secret: never a JWKS key (CVE-2022-29217).
            return self._hmac_secret, algorithm
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            _refuse("missing kid")
        key = keyset.keys.get(kid)
        if key is None:
            _refuse("unknown kid")
        if algorithm not in key.algorithms:  # pinned per key: alg confusion across key types is impossible
            _refuse(f"algorithm {algorithm} not allowed for this key")
        return key.key, algorithm

    def _claims(self, claims: Mapping[str, Any]) -> _Verified:
        now = self._clock()
        exp, nbf, iat = (_numeric_date(claims, name) for name in ("exp", "nbf", "iat"))
        if exp is None:
            _refuse("missing claim exp")
        if exp <= now - self._leeway:  # RFC 7519 4.1.4, with pyjwt's comparison
            _refuse("expired")
        if (nbf is not None and nbf > now + self._leeway) or (iat is not None and iat > now + self._leeway):
            _refuse("not yet valid")  # RFC 7519 4.1.5; a future iat is refused as pyjwt does
        if exp - (now if iat is None else iat) > self._max_lifetime:
            _refuse("token lifetime over the maximum")
        subject, issuer, jti = claims.get("sub"), claims.get("iss"), claims.get("jti")
        if subject is None:
            _refuse("missing claim sub")
        if not isinstance(subject, str) or not subject:
            _refuse("malformed claim sub")
        # pyjwt compared iss already; exact equality again guards against a regression like CVE-2024-53861.
        if issuer != self._issuer:
            _refuse("wrong issuer")
        if jti is not None and (not isinstance(jti, str) or not jti):
            _refuse("malformed claim jti")
        groups, scopes = groups_and_scopes(claims, groups_claim=self._groups_claim, scopes_claim=self._scopes_claim)
        x5t = _confirmation(claims)
        return _Verified(VerifiedToken(subject, self._issuer, jti, groups, scopes, exp, bound=x5t is not None), x5t)


def _confirmation(claims: Mapping[str, Any]) -> str | None:
    """The RFC 8705 ``cnf.x5t#S256`` thumbprint; any other confirmation method fails closed (RFC 7800 3)."""
    if "cnf" not in claims:
        return None
    cnf = claims["cnf"]
    if not isinstance(cnf, dict):
        _refuse("malformed claim cnf")
    if set(cnf) != {"x5t#S256"}:  # jkt (DPoP), jwk, jku...: a binding we cannot check must not be ignored
        _refuse("unsupported confirmation method")
    x5t = cnf["x5t#S256"]
    if not isinstance(x5t, str) or not _X5T_S256.fullmatch(x5t):
        _refuse("malformed claim cnf")
    return x5t


# ---------------------------------------------------------------------------------------------------------- issuing

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
