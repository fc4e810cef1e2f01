"""JWT bearer-token verification (RFC 7519 over RFC 7515 JWS): explicit ordered checks against the KeyStore, a
cache of verified tokens, and certificate binding (RFC 8705). docs/tokens.md lists the checks in order.

No grpc here: the authenticator (auth/authenticator.py) hands over the bearer string and the client certificate's
``x5t#S256``; the call boundary turns the AuthenticationError raised here into UNAUTHENTICATED.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NoReturn

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from jwt.utils import base64url_decode, is_pem_format, is_ssh_key

from gateway.auth import (
    DEFAULT_ALGORITHMS,
    HMAC_ALGORITHMS,
    HMAC_KEY_BYTES,
    MAX_TOKEN_BYTES,
    SUPPORTED_ALGORITHMS,
    reasons,
)
from gateway.auth.keys import KeySet, KeySource, TokenConfigError
from gateway.document import DocumentError, DuplicateMemberError, loads_json
from gateway.errors import AuthenticationError

__all__ = ["MAX_TOKEN_BYTES", "TokenVerifier", "UnknownKidError", "VerifiedToken", "groups_and_scopes"]

_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_X5T_S256 = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256 digest, no padding
# RFC 8725 3.11 / RFC 9068 2.1: explicit typing; anything else (a DPoP proof, a logout token) is not ours.
_TOKEN_TYPES = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})


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
    (jwt.ExpiredSignatureError, reasons.EXPIRED),
    (jwt.ImmatureSignatureError, reasons.NOT_YET_VALID),
    (jwt.InvalidAudienceError, reasons.WRONG_AUDIENCE),
    (jwt.InvalidIssuerError, reasons.WRONG_ISSUER),
    (jwt.InvalidIssuedAtError, reasons.detailed(reasons.MALFORMED_CLAIM, "iat")),
    (jwt.exceptions.InvalidSubjectError, reasons.detailed(reasons.MALFORMED_CLAIM, "sub")),
    (jwt.exceptions.InvalidJTIError, reasons.detailed(reasons.MALFORMED_CLAIM, "jti")),
    (jwt.InvalidSignatureError, reasons.BAD_SIGNATURE),
    (jwt.InvalidAlgorithmError, reasons.ALGORITHM_NOT_ALLOWED),
    (jwt.InvalidKeyError, reasons.UNUSABLE_KEY),
    (jwt.DecodeError, reasons.MALFORMED_TOKEN),
)


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return reasons.detailed(reasons.MISSING_CLAIM, exc.claim)  # the claim name is one of ours, not token text
    return next((reason for cls, reason in _REASONS if isinstance(exc, cls)), reasons.INVALID)


class UnknownKidError(AuthenticationError):
    """A token signed with a key the set does not hold (yet): the issuer may have rotated, so the caller may wait
    for ``TokenVerifier.refresh_keys`` and verify once more."""


def _refuse(reason: str) -> NoReturn:
    raise AuthenticationError(reason=reason)


def _string_list(value: Any, claim: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, list) and all(isinstance(item, str) and item for item in value):
        return frozenset(value)
    _refuse(reasons.detailed(reasons.MALFORMED_CLAIM, claim))


def _scope_values(value: Any, claim: str) -> frozenset[str]:
    """``scope`` is a space-separated string (RFC 8693 4.2); ``scp`` and custom claims may also be a list."""
    if isinstance(value, str):
        return frozenset(value.split())
    if claim == "scope" and value is not None:
        _refuse(reasons.detailed(reasons.MALFORMED_CLAIM, "scope"))
    return _string_list(value, claim)


def _claim_at(claims: Mapping[str, Any], name: str) -> Any:
    """The claim ``name``: the member of that exact name if there is one (namespaced claims are URLs, dots
    included), else the dotted path through nested objects (Keycloak's ``realm_access.roles``); None if absent.

    A path that meets something other than an object is a malformed token, not an absent claim: a deny rule on a
    group must not be skipped because a provider sent a shape the gateway did not expect.
    """
    if name in claims or "." not in name:
        return claims.get(name)
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping):
            _refuse(reasons.detailed(reasons.MALFORMED_CLAIM, name))
        if part not in value:
            return None
        value = value[part]
    return value


def groups_and_scopes(
    claims: Mapping[str, Any], *, groups_claim: str = "groups", scopes_claim: str = "scope"
) -> tuple[frozenset[str], frozenset[str]]:
    """A token's groups and scopes; AuthenticationError when malformed. One reader for the verifier and for
    ``gateway policy check``, so that they cannot disagree on a claim's shape.

    The groups come from ``groups_claim`` (``_claim_at``); the scopes from ``scopes_claim``, else ``scope``, else
    ``scp``: the first one present.
    """
    groups = _string_list(_claim_at(claims, groups_claim), groups_claim)
    names = (scopes_claim, *(name for name in ("scope", "scp") if name != scopes_claim))
    scope_claim = next((name for name in names if name in claims), scopes_claim)
    return groups, _scope_values(claims.get(scope_claim), scope_claim)


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """RFC 7519 2 NumericDate: a finite JSON number. bool is an int in Python, and NaN compares false with all."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        _refuse(reasons.detailed(reasons.MALFORMED_CLAIM, name))
    try:
        number = float(value)  # a JSON integer can be too large for a float
    except OverflowError:
        _refuse(reasons.detailed(reasons.MALFORMED_CLAIM, name))
    if not math.isfinite(number):
        _refuse(reasons.detailed(reasons.MALFORMED_CLAIM, name))
    return number


def _check_hmac_secret(secret: bytes) -> None:
    """HMAC only with a real shared secret, never with something that is (or looks like) a public key."""
    if not isinstance(secret, bytes):
        raise TokenConfigError("hmac_secret: must be bytes")
    stripped = secret.strip()
    if len(stripped) < HMAC_KEY_BYTES["HS256"]:
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
    too_short = sorted(alg for alg in requested if len(secret.strip()) < HMAC_KEY_BYTES[alg])
    if too_short:
        raise TokenConfigError(f"hmac_secret: too short for {too_short} (RFC 7518 3.2)")
    return requested


class TokenVerifier:
    """Verifies bearer tokens against the KeyStore in a fixed order; verified tokens are cached until their exp."""

    def __init__(
        self,
        *,
        keys: KeySource,
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

    @property
    def keys_version(self) -> int:
        """The version of the key set in force: it grows on every reload (what a cache of verdicts must follow)."""
        return self._keys.current.version

    def refresh_keys(self) -> Future[None] | None:
        """After an UnknownKidError: the key refresh to wait for before verifying once more, or None (the keys are
        a file, or a refresh ran too recently: the token stays refused)."""
        return self._keys.refresh_unknown_kid()

    def verify(self, token: str, *, cert_x5t: str | None) -> VerifiedToken:
        """The verified token (``bound`` when its cnf names this connection's certificate), or AuthenticationError."""
        # Size and shape first, before any parsing or hashing (RFC 7515 7.1 compact serialization).
        if not isinstance(token, str) or not token.isascii():
            _refuse(reasons.MALFORMED_TOKEN)
        if len(token) > MAX_TOKEN_BYTES:
            _refuse(reasons.TOKEN_TOO_LARGE)
        if not _COMPACT_JWS.fullmatch(token):
            _refuse(reasons.MALFORMED_TOKEN)
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
            _refuse(reasons.BOUND_TO_ANOTHER_CERTIFICATE)
        return entry.token

    def _verify(self, token: str, keyset: KeySet) -> _Verified:
        header, claims = _decode(token)
        key, algorithm = self._key_for(header, keyset)
        with self._lock:
            self.signature_checks += 1
        # pyjwt checks the signature and the registered claims over the same segments. The claims used afterwards
        # are the ones decoded above: with no member repeated, pyjwt's reading of them is the same.
        try:
            jwt.decode(
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
            _refuse(reasons.MALFORMED_TOKEN)
        if algorithm.lower() == "none":  # RFC 8725 3.1
            _refuse(reasons.detailed(reasons.ALGORITHM_NOT_ALLOWED, "none"))
        if algorithm not in self._algorithms:
            # The name goes into the reason only when it is a known one: the header is attacker text.
            known = algorithm in SUPPORTED_ALGORITHMS
            _refuse(reasons.detailed(reasons.ALGORITHM_NOT_ALLOWED, algorithm if known else "unknown"))
        if "crit" in header:  # RFC 7515 4.1.11: the gateway understands no extension, so any critical one fails
            _refuse(reasons.detailed(reasons.UNSUPPORTED_HEADER, "crit"))
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in _TOKEN_TYPES):
            _refuse(reasons.detailed(reasons.UNSUPPORTED_HEADER, "typ"))
        if algorithm in HMAC_ALGORITHMS:
            # Only reachable with a configured secret, and only that secret: never a JWKS key (CVE-2022-29217).
            return self._hmac_secret, algorithm
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            _refuse(reasons.NO_KEY_ID)
        key = keyset.keys.get(kid)
        if key is None:
            raise UnknownKidError(reason=reasons.UNKNOWN_KEY_ID)
        if algorithm not in key.algorithms:  # pinned per key: alg confusion across key types is impossible
            _refuse(reasons.detailed(reasons.ALGORITHM_NOT_ALLOWED, f"{algorithm} for this key"))
        return key.key, algorithm

    def _claims(self, claims: Mapping[str, Any]) -> _Verified:
        now = self._clock()
        exp, nbf, iat = (_numeric_date(claims, name) for name in ("exp", "nbf", "iat"))
        if exp is None:
            _refuse(reasons.detailed(reasons.MISSING_CLAIM, "exp"))
        if exp <= now - self._leeway:  # RFC 7519 4.1.4, with pyjwt's comparison
            _refuse(reasons.EXPIRED)
        if (nbf is not None and nbf > now + self._leeway) or (iat is not None and iat > now + self._leeway):
            _refuse(reasons.NOT_YET_VALID)  # RFC 7519 4.1.5; a future iat is refused as pyjwt does
        if exp - (now if iat is None else iat) > self._max_lifetime:
            _refuse(reasons.LIFETIME_TOO_LONG)
        subject, issuer, jti = claims.get("sub"), claims.get("iss"), claims.get("jti")
        if subject is None:
            _refuse(reasons.detailed(reasons.MISSING_CLAIM, "sub"))
        if not isinstance(subject, str) or not subject:
            _refuse(reasons.detailed(reasons.MALFORMED_CLAIM, "sub"))
        # pyjwt compared iss already; exact equality again guards against a regression like CVE-2024-53861.
        if issuer != self._issuer:
            _refuse(reasons.WRONG_ISSUER)
        if jti is not None and (not isinstance(jti, str) or not jti):
            _refuse(reasons.detailed(reasons.MALFORMED_CLAIM, "jti"))
        groups, scopes = groups_and_scopes(claims, groups_claim=self._groups_claim, scopes_claim=self._scopes_claim)
        x5t = _confirmation(claims)
        return _Verified(VerifiedToken(subject, self._issuer, jti, groups, scopes, exp, bound=x5t is not None), x5t)


def _decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JOSE header and the claims of a compact JWS (shape already checked), each a JSON object in which no
    member is repeated at any depth; the gateway's one reading of both, before any signature work."""
    header, claims, _signature = token.split(".")
    return _json_object(header, "header"), _json_object(claims, "claims")


def _json_object(segment: str, part: str) -> dict[str, Any]:
    try:
        value = loads_json(base64url_decode(segment))
    except DuplicateMemberError:
        # The member's name is attacker text: not in the reason.
        _refuse(reasons.detailed(reasons.MALFORMED_TOKEN, f"duplicate member in its {part}"))
    except (DocumentError, ValueError):  # base64 (binascii.Error) errors are ValueErrors
        _refuse(reasons.MALFORMED_TOKEN)
    if not isinstance(value, dict):
        _refuse(reasons.MALFORMED_TOKEN)
    return value


def _confirmation(claims: Mapping[str, Any]) -> str | None:
    """The RFC 8705 ``cnf.x5t#S256`` thumbprint; any other confirmation method fails closed (RFC 7800 3)."""
    if "cnf" not in claims:
        return None
    cnf = claims["cnf"]
    if not isinstance(cnf, dict):
        _refuse(reasons.detailed(reasons.MALFORMED_CLAIM, "cnf"))
    if set(cnf) != {"x5t#S256"}:  # jkt (DPoP), jwk, jku...: a binding we cannot check must not be ignored
        _refuse(reasons.UNSUPPORTED_CONFIRMATION)
    x5t = cnf["x5t#S256"]
    if not isinstance(x5t, str) or not _X5T_S256.fullmatch(x5t):
        _refuse(reasons.detailed(reasons.MALFORMED_CLAIM, "cnf"))
    return x5t
