"""JWT signing keys: strict JWKS loading (RFC 7517) and rotation, the algorithms each key type may verify, and the
kids and thumbprints (RFC 7638, RFC 8705) that name keys and certificates. No grpc here.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.auth import (
    ALGORITHM_FAMILIES,
    DEFAULT_ALGORITHMS,
    HMAC_ALGORITHMS,
    HMAC_KEY_BYTES,
    SUPPORTED_ALGORITHMS,
)
from gateway.document import loads_json
from gateway.errors import StartupError
from gateway.watcher import ReloadingStore, file_fingerprint

__all__ = [
    "DEFAULT_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "HMAC_KEY_BYTES",
    "SUPPORTED_ALGORITHMS",
    "KeySet",
    "KeySource",
    "KeyStore",
    "TokenConfigError",
    "VerificationKey",
    "cert_thumbprint",
    "jwk_kid",
    "kid_from_jwks",
    "load_jwks",
    "parse_jwks",
]

MAX_JWKS_BYTES = 1 << 20
_PUBLIC_KEY_TYPES: Mapping[str, type] = {
    "RSA": rsa.RSAPublicKey,
    "EC": ec.EllipticCurvePublicKey,
    "OKP": ed25519.Ed25519PublicKey,
}
# RFC 7518 6.2.2, 6.3.2 and 6.4 (oct), RFC 8037 2: members that only a private or symmetric key has.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# RFC 7517 4.3: the operations that make a key one for signatures (a public JWKS key verifies; "sign" alone is an
# error below, as a public key cannot sign).
_SIGNATURE_OPS = frozenset({"sign", "verify"})
# RFC 7638 3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}


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


def _read_bytes(path: Path) -> bytes:
    """A JWKS file's bytes, at most one more than MAX_JWKS_BYTES (the excess is refused by ``_jwks_keys``)."""
    try:
        with path.open("rb") as handle:
            return handle.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise TokenConfigError(f"{path}: cannot read a JWKS: {exc}") from None


def _jwks_keys(raw: bytes, source: str) -> list[Any]:
    """The ``keys`` list of a JWKS document, parsed strictly (no duplicate members, no NaN, bounded size)."""
    if len(raw) > MAX_JWKS_BYTES:
        raise TokenConfigError(f"{source}: cannot read a JWKS: larger than {MAX_JWKS_BYTES} bytes")
    try:
        data = loads_json(raw)
    except ValueError as exc:
        raise TokenConfigError(f"{source}: cannot read a JWKS: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise TokenConfigError(f"{source}: a JWKS needs a non-empty 'keys' list")
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
    path = Path(jwks_path)
    for jwk in _jwks_keys(_read_bytes(path), str(path)):
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
    ignored: tuple[str, ...] = ()  # the kids (or "#index") of keys meant for something else than signatures

    @property
    def kids(self) -> list[str]:
        """The key ids, sorted."""
        return sorted(self.keys)


def _family(jwk: Mapping[str, Any]) -> frozenset[str]:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if not isinstance(kty, str) or not isinstance(crv, str | None):  # untrusted JSON: a list here is unhashable
        return frozenset()
    return ALGORITHM_FAMILIES.get((kty, None if kty == "RSA" else crv), frozenset())


def _for_signatures(jwk: Any, source: str, index: int) -> bool:
    """Whether a JWKS entry is meant for signatures (RFC 7517 4.2 ``use``, 4.3 ``key_ops``); what every entry must
    be, whatever it is for, is checked here: an object, a string kid if any, well-typed and consistent ``use``
    and ``key_ops``, no private members. A malformed entry refuses the whole document."""
    if not isinstance(jwk, dict):
        raise TokenConfigError(f"{source}: key #{index}: not an object")
    kid = jwk.get("kid")
    where = f"{source}: key {kid!r}" if isinstance(kid, str) and kid else f"{source}: key #{index}"
    if "kid" in jwk and not (isinstance(kid, str) and kid):
        raise TokenConfigError(f"{where}: 'kid' must be a non-empty string")
    if _PRIVATE_MEMBERS & jwk.keys():
        raise TokenConfigError(f"{where}: private key material in a public JWKS")
    use, key_ops = jwk.get("use"), jwk.get("key_ops")
    if use is not None and not isinstance(use, str):
        raise TokenConfigError(f"{where}: 'use' must be a string")
    if key_ops is not None and (
        not isinstance(key_ops, list)
        or not all(isinstance(op, str) for op in key_ops)
        or len(set(key_ops)) != len(key_ops)
    ):
        raise TokenConfigError(f"{where}: 'key_ops' must be a list of distinct strings")
    signs = None if key_ops is None else bool(_SIGNATURE_OPS & set(key_ops))
    if use is not None and signs is not None and (use == "sig") != signs:
        raise TokenConfigError(f"{where}: 'use' {use!r} and 'key_ops' {key_ops!r} disagree (RFC 7517 4.3)")
    if use is not None and use != "sig":
        return False
    if signs is False:
        return False
    if key_ops is not None and "verify" not in key_ops:
        raise TokenConfigError(f"{where}: 'key_ops' must include 'verify'")
    return True


def _verification_key(jwk: dict[str, Any], allowed: frozenset[str], source: str, index: int) -> VerificationKey:
    """One signature key (``_for_signatures`` passed), checked in order: kid, type, pinned alg, the key."""
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenConfigError(f"{source}: key #{index}: needs a 'kid'")
    where = f"{source}: key {kid!r}"
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


def parse_jwks(raw: bytes, *, source: str, allowed_algorithms: Iterable[str] = DEFAULT_ALGORITHMS) -> KeySet:
    """Strictly read a public JWKS document (RFC 7517) from a file or a URL (``source``, named in every error);
    any problem is a TokenConfigError naming the source and the key, and refuses the whole document.

    Each signature key goes through ``jwt.PyJWK`` on its own: ``jwt.PyJWKSet`` silently skips keys it cannot use,
    and a JWKS the gateway half-understands is a configuration error, not a smaller key set. The one exception is
    a well-formed key that says it is meant for something else (``use: enc``, ``key_ops`` without
    ``verify``/``sign``; Keycloak publishes its encryption key so): it is ignored, named in ``KeySet.ignored``,
    and never verifies a token. A document with no signature key at all is refused.
    """
    allowed = frozenset(allowed_algorithms) - HMAC_ALGORITHMS  # a JWKS never holds an HMAC secret
    keys: dict[str, VerificationKey] = {}
    ignored: list[str] = []
    for index, jwk in enumerate(_jwks_keys(raw, source)):
        if not _for_signatures(jwk, source, index):
            kid = jwk.get("kid")
            ignored.append(kid if isinstance(kid, str) else f"#{index}")
            continue
        key = _verification_key(jwk, allowed, source, index)
        if key.kid in keys:
            raise TokenConfigError(f"{source}: key {key.kid!r}: duplicate kid")
        keys[key.kid] = key
    if not keys:
        raise TokenConfigError(
            f"{source}: no key meant for signatures (every key says another 'use' or 'key_ops'): nothing to verify "
            "a token with"
        )
    return KeySet(MappingProxyType(keys), ignored=tuple(ignored))


def load_jwks(path: str | Path, *, allowed_algorithms: Iterable[str] = DEFAULT_ALGORITHMS) -> KeySet:
    """Strictly load a public JWKS file (``parse_jwks``)."""
    path = Path(path)
    return parse_jwks(_read_bytes(path), source=str(path), allowed_algorithms=allowed_algorithms)


class KeySource(Protocol):
    """Where the verifier's keys come from: a JWKS file (KeyStore) or the issuer's URL (RemoteKeyStore)."""

    @property
    def current(self) -> KeySet: ...

    def refresh_unknown_kid(self) -> Future[None] | None:
        """A refresh to wait for (bounded) before a token with an unknown kid is refused, or None."""


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
                "ignored": list(new.ignored),
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

    @staticmethod
    def refresh_unknown_kid() -> None:
        """Never a refresh: the file is polled on its own schedule, and a token's kid is no reason to read it."""
        return None

    def _load(self, old: KeySet | None) -> KeySet:
        new = load_jwks(self.path, allowed_algorithms=self._allowed)
        return new if old is None else dataclasses.replace(new, version=old.version + 1)
