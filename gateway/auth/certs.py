"""Client-certificate checks run on every call, beyond what the TLS handshake verified, and server-pair validation.

The handshake proves the peer holds a key our CA certified; it does not consult the CRL, refuse leaves unfit for a
client, pick one identity, or re-check expiry on connections that outlive the certificate. That is done here.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from base64 import urlsafe_b64encode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import metrics
from gateway.auth import reasons
from gateway.auth.principal import CN_IDENTITY_PREFIX, DNS_IDENTITY_PREFIX, URI_IDENTITY_PREFIX
from gateway.errors import AuthenticationError, StartupError
from gateway.watcher import ReloadingStore, file_fingerprint

log = structlog.get_logger(__name__)

# Bounded by the number of distinct certificates our CA issued that connect; a few MB at most.
_PEER_CACHE_SIZE = 4096
# SPIFFE-ID spec section 2: lowercase trust domain, path segments of [A-Za-z0-9._-], no query, fragment or port.
_SPIFFE_ID = re.compile(r"spiffe://[a-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
_SPIFFE_MAX_LENGTH = 2048
_ISSUER_KEY_TYPES = (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
_MIN_RSA_BITS = 2048
_TLS_PURPOSES = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
# Deeper than any real PKI (root, policy CA, issuing CA); a bound, so that a looping bundle cannot recurse forever.
_MAX_CA_DEPTH = 8

_E = TypeVar("_E", bound=x509.ExtensionType)


class CertificateConfigError(StartupError):
    """A certificate, key or CRL the gateway cannot use; the message names the file or the part at fault."""


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """What the gateway keeps from a client's leaf certificate."""

    identity: str  # spelled with its type: "spiffe://...", "dns:NAME" or "cn:NAME" (auth/principal.py)
    sha256_hex: str  # hex SHA-256 of the DER, for the audit record
    x5t_s256: str  # RFC 8705 section 3.1: base64url(SHA-256(DER)) without padding, compared with cnf["x5t#S256"]
    not_before: datetime
    not_after: datetime
    serial: int
    issuer: x509.Name


def inspect_peer(pem: bytes) -> PeerCertificate:
    """The identity and thumbprints of a client's leaf certificate; AuthenticationError if it is unfit for a client."""
    result = _inspect(pem)
    if isinstance(result, str):
        raise AuthenticationError(reason=result)
    return result


# A connection presents the same PEM on every call, and the verdict depends on the bytes alone (validity and
# revocation are checked per call), so refusals are cached too. lru_cache is thread-safe.
@functools.lru_cache(maxsize=_PEER_CACHE_SIZE)
def _inspect(pem: bytes) -> PeerCertificate | str:
    """The parsed peer, or the reason it is refused."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        _check_client_usage(cert)
        identity = _identity(cert)
    except AuthenticationError as exc:
        return exc.reason
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return reasons.detailed(reasons.CERTIFICATE_UNFIT, "does not parse")
    digest = cert.fingerprint(hashes.SHA256())
    return PeerCertificate(
        identity=identity,
        sha256_hex=digest.hex(),
        x5t_s256=urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        serial=cert.serial_number,
        issuer=cert.issuer,
    )


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_client_usage(cert: x509.Certificate) -> None:
    """Refuse a leaf unfit for a TLS client (see ``_leaf_problem``)."""
    problem = _leaf_problem(cert, "client")
    if problem is not None:
        raise AuthenticationError(reason=reasons.detailed(reasons.CERTIFICATE_UNFIT, problem))


def _leaf_problem(cert: x509.Certificate, role: Literal["client", "server"]) -> str | None:
    """What makes ``cert`` unfit as a TLS leaf for ``role``, or None: a CA (RFC 5280 4.2.1.9), a key that may sign
    certificates or CRLs or cannot sign the handshake (4.2.1.3), an EKU without the role's purpose (4.2.1.12)."""
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        return "is a CA certificate"
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and (usage.key_cert_sign or usage.crl_sign):
        # A key that can sign certificates is an issuer's key, whatever basicConstraints says: one leak would let
        # it mint identities. RFC 5280 4.2.1.3: keyCertSign requires cA true.
        return "key usage allows signing certificates or CRLs"
    if usage is not None and not usage.digital_signature:
        # TLS authentication is a signature over the handshake (RFC 8446 4.4.3).
        return "key usage lacks digitalSignature"
    purposes = _extension(cert, x509.ExtendedKeyUsage)
    # anyExtendedKeyUsage is not accepted in place of the role's purpose: a leaf says what it is for.
    if purposes is not None and _TLS_PURPOSES[role] not in purposes:
        return f"is not for {role} authentication (EKU)"
    return None


def _identity(cert: x509.Certificate) -> str:
    """The SPIFFE URI SAN, else the single DNS SAN, else the single CN, spelled with its type (auth/principal.py);
    anything ambiguous is refused."""
    # No SAN extension is the common case of an enterprise PKI (CN only); cryptography >= 51 refuses to build an
    # empty SubjectAlternativeName, so its absence is read as no names rather than as an empty extension.
    san = _extension(cert, x509.SubjectAlternativeName)
    uri_sans = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
    uris = [u for u in uri_sans if u.startswith(URI_IDENTITY_PREFIX)]
    dns = san.get_values_for_type(x509.DNSName) if san is not None else []
    if len(uris) > 1:
        raise AuthenticationError(reason=reasons.detailed(reasons.NO_IDENTITY, "several SPIFFE URI SANs"))
    if uris:
        identity = uris[0]
        if len(identity) > _SPIFFE_MAX_LENGTH or not _is_spiffe_id(identity):
            raise AuthenticationError(reason=reasons.detailed(reasons.NO_IDENTITY, "malformed SPIFFE ID"))
        return identity
    if len(dns) > 1:
        raise AuthenticationError(reason=reasons.detailed(reasons.NO_IDENTITY, "several DNS SANs"))
    if dns:
        # A wildcard names many hosts, never one client.
        if "*" in dns[0]:
            raise AuthenticationError(reason=reasons.detailed(reasons.NO_IDENTITY, "wildcard DNS SAN"))
        # DNS names compare case-insensitively (RFC 4343).
        return DNS_IDENTITY_PREFIX + _checked(dns[0].lower().rstrip("."))
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) > 1:
        raise AuthenticationError(reason=reasons.detailed(reasons.NO_IDENTITY, "several CNs"))
    if cns:
        return CN_IDENTITY_PREFIX + _checked(str(cns[0].value))
    raise AuthenticationError(reason=reasons.NO_IDENTITY)


def _is_spiffe_id(uri: str) -> bool:
    # "." and ".." segments are forbidden by the spec: an identity is compared as a string and never normalised.
    return _SPIFFE_ID.fullmatch(uri) is not None and not any(
        segment in (".", "..") for segment in uri[len(URI_IDENTITY_PREFIX) :].split("/")[1:]
    )


def _checked(identity: str) -> str:
    if not identity:
        raise AuthenticationError(reason=reasons.NO_IDENTITY)
    if not identity.isprintable():
        raise AuthenticationError(reason=reasons.detailed(reasons.NO_IDENTITY, "unprintable characters"))
    return identity


def check_validity(peer: PeerCertificate, now: datetime) -> None:
    """Refuse a certificate outside its validity period at ``now`` (aware); both bounds inclusive (RFC 5280 4.1.2.5)."""
    if now > peer.not_after:
        raise AuthenticationError(reason=reasons.CERTIFICATE_EXPIRED)
    if now < peer.not_before:
        raise AuthenticationError(reason=reasons.CERTIFICATE_NOT_YET_VALID)


@dataclass(frozen=True, slots=True)
class RevocationList:
    """The serial numbers one issuer's CRL revokes."""

    issuer: x509.Name
    serials: frozenset[int]
    number: int | None  # the CRL number (RFC 5280 5.2.3), increasing with every CRL the issuer signs
    next_update: datetime | None

    def is_revoked(self, serial: int) -> bool:
        """Whether this serial number is on the list."""
        return serial in self.serials


@dataclass(frozen=True, slots=True)
class CrlSet:
    """Every CRL of ``tls.crl`` by issuer, and the verdict on each intermediate CA of the client CA bundle."""

    lists: Mapping[x509.Name, RevocationList]
    # Per CA subject: None when neither it nor a CA above it is revoked (roots: None), else why not.
    intermediates: Mapping[x509.Name, str | None]

    def for_issuer(self, issuer: x509.Name) -> RevocationList | None:
        """The CRL that ``issuer`` signed, None when there is none."""
        return self.lists.get(issuer)

    @property
    def revoked(self) -> int:
        """How many serial numbers the CRLs revoke, all issuers together."""
        return sum(len(crl.serials) for crl in self.lists.values())


def load_crl(crl_path: str | Path, ca_path: str | Path) -> RevocationList:
    """Load a PEM or DER CRL signed by a CA in ``ca_path`` (the first one of a PEM file that holds several);
    CertificateConfigError names the file otherwise."""
    crl_path, ca_path = Path(crl_path), Path(ca_path)
    return _revocation_list(_parse_crls(read_material(crl_path), crl_path)[0], crl_path, _load_cas(ca_path), ca_path)


def load_crls(crl_path: str | Path, ca_path: str | Path) -> CrlSet:
    """Load every CRL of a PEM file (or the one of a DER file), one per CA, each signed by a CA in ``ca_path``, and
    judge each intermediate CA of ``ca_path`` by its issuer's CRL, up to a root (RFC 5280 6.3: every certificate
    of the path but the trust anchor is checked)."""
    crl_path, ca_path = Path(crl_path), Path(ca_path)
    cas = _load_cas(ca_path)
    lists: dict[x509.Name, RevocationList] = {}
    for crl in _parse_crls(read_material(crl_path), crl_path):
        loaded = _revocation_list(crl, crl_path, cas, ca_path)
        if loaded.issuer in lists:
            raise CertificateConfigError(
                f"{crl_path}: two CRLs of {loaded.issuer.rfc4514_string()}: keep one per CA (the newest)"
            )
        lists[loaded.issuer] = loaded
    return CrlSet(lists, _judge_intermediates(cas, lists))


def _parse_crls(data: bytes, crl_path: Path) -> list[x509.CertificateRevocationList]:
    try:
        if not data.lstrip().startswith(b"-----BEGIN"):
            return [x509.load_der_x509_crl(data)]
        blocks = _PEM_CRL.findall(data)
        if not blocks:
            raise ValueError("no PEM CRL")
        return [x509.load_pem_x509_crl(block) for block in blocks]
    except ValueError:
        raise CertificateConfigError(f"{crl_path}: not a PEM or DER CRL") from None


def _judge_intermediates(
    cas: Sequence[x509.Certificate], lists: Mapping[x509.Name, RevocationList]
) -> dict[x509.Name, str | None]:
    """Why a leaf issued by each CA of the bundle must be refused for that CA's sake, or None. A CA is judged by
    its name, as the leaf names its issuer: when several CA certificates share a name, any one revoked refuses it
    (fail closed)."""
    by_subject: dict[x509.Name, list[x509.Certificate]] = {}
    for ca in cas:
        by_subject.setdefault(ca.subject, []).append(ca)
    verdicts: dict[x509.Name, str | None] = {}

    def judge(subject: x509.Name, depth: int) -> str | None:
        if subject in verdicts:
            return verdicts[subject]
        if depth > _MAX_CA_DEPTH:
            return reasons.detailed(reasons.NO_CRL, "client CA chain too long, or looping")
        reason = None
        for ca in by_subject.get(subject, ()):
            if ca.issuer == ca.subject:
                continue  # a root: the trust anchor itself, which no CRL speaks for
            crl = lists.get(ca.issuer)
            if crl is None:
                reason = reasons.detailed(reasons.NO_CRL, f"issuer of intermediate CA {ca.subject.rfc4514_string()}")
            elif crl.is_revoked(ca.serial_number):
                reason = reasons.CA_REVOKED
            else:
                reason = judge(ca.issuer, depth + 1)
            if reason is not None:
                break
        verdicts[subject] = reason
        return reason

    for subject in by_subject:
        judge(subject, 0)
    return verdicts


def _revocation_list(
    crl: x509.CertificateRevocationList, crl_path: Path, cas: Sequence[x509.Certificate], ca_path: Path
) -> RevocationList:
    """One CRL checked: parseable, no critical extension we do not process, signed by a CA of the bundle."""
    try:
        extensions = crl.extensions
        entries = list(crl)
        entry_extensions = [ext for entry in entries for ext in entry.extensions]
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise CertificateConfigError(f"{crl_path}: not a PEM or DER CRL") from None
    # RFC 5280 5.2, 5.3: a CRL with a critical extension we do not process (issuing distribution point, delta CRL,
    # indirect CRL entries) must not be used to decide revocation: its scope may not be what it seems.
    if any(ext.critical for ext in (*extensions, *entry_extensions)):
        raise CertificateConfigError(f"{crl_path}: has a critical extension the gateway does not process")
    if not _signed_by_a_ca(crl, cas):
        raise CertificateConfigError(f"{crl_path}: not signed by a CA in {ca_path}")
    return RevocationList(
        issuer=crl.issuer,
        serials=frozenset(entry.serial_number for entry in entries),
        number=_crl_number(crl),
        next_update=crl.next_update_utc,
    )


def read_material(path: Path) -> bytes:
    """The bytes of a certificate, key or CRL file; CertificateConfigError naming the file if unreadable."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _load_cas(ca_path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(read_material(ca_path))
    except ValueError:
        raise CertificateConfigError(f"{ca_path}: not a PEM CA certificate") from None


def _signed_by_a_ca(crl: x509.CertificateRevocationList, cas: Sequence[x509.Certificate]) -> bool:
    """Whether a CA named as the CRL's issuer, allowed to sign CRLs (RFC 5280 4.2.1.3), verifies its signature."""
    for ca in cas:
        if ca.subject != crl.issuer:
            continue
        usage = _extension(ca, x509.KeyUsage)
        if usage is not None and not usage.crl_sign:
            continue
        key = ca.public_key()
        if isinstance(key, _ISSUER_KEY_TYPES) and crl.is_signature_valid(key):
            return True
    return False


def _crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


class CrlStore:
    """The CAs' current revocation lists, reloaded when the CRL or CA file changes; a bad new file is refused."""

    def __init__(self, crl_path: str | Path, ca_path: str | Path, *, interval_s: float) -> None:
        self._crl_path, self._ca_path = Path(crl_path), Path(ca_path)
        path = str(self._crl_path)
        # A broken CRL at startup is a configuration error.
        self._crls = ReloadingStore(
            name="crl",
            fingerprint=lambda: file_fingerprint((self._crl_path, self._ca_path)),
            load=self._load,
            refused=CertificateConfigError,
            interval_s=interval_s,
            reloaded="crl_reloaded",
            failed="crl_reload_failed",
            reloaded_fields=lambda _old, new: {
                "path": path,
                "revoked": new.revoked,
                "crls": len(new.lists),
                "numbers": {name.rfc4514_string(): crl.number for name, crl in new.lists.items()},
            },
            failed_fields=lambda _old: {"path": path},
        )

    @property
    def current(self) -> CrlSet:
        """The revocation lists in force."""
        return self._crls.current

    def check(self, peer: PeerCertificate) -> None:
        """Refuse a revoked client certificate, one issued by a revoked intermediate CA (catalogue case A20), or
        one with a CA on its way to the root that no CRL speaks for."""
        crls = self._crls.current  # one read: a concurrent reload swaps the whole set
        # Serial numbers are unique per issuer only (RFC 5280 4.1.2.2): another issuer's serial proves nothing.
        crl = crls.for_issuer(peer.issuer)
        if crl is None:
            raise AuthenticationError(reason=reasons.detailed(reasons.NO_CRL, "the client certificate's issuer"))
        if crl.is_revoked(peer.serial):
            raise AuthenticationError(reason=reasons.CERTIFICATE_REVOKED)
        reason = crls.intermediates.get(peer.issuer)
        if reason is not None:
            raise AuthenticationError(reason=reason)

    def start(self) -> None:
        """Poll the CRL and CA files in a daemon thread."""
        self._crls.start()

    def stop(self) -> None:
        """Stop polling."""
        self._crls.stop()

    def reload_now(self) -> bool:
        """Poll once, synchronously; returns whether a change was seen (loaded or refused)."""
        return self._crls.check_now()

    def _load(self, old: CrlSet | None) -> CrlSet:
        new = load_crls(self._crl_path, self._ca_path)
        for issuer, crl in new.lists.items():
            # RFC 5280 5.2.3: CRL numbers only grow. An older CRL would silently un-revoke certificates.
            before = None if old is None else old.for_issuer(issuer)
            if (
                before is not None
                and crl.number is not None
                and before.number is not None
                and crl.number < before.number
            ):
                raise CertificateConfigError(
                    f"{self._crl_path}: CRL number {crl.number} is older than the one in force ({before.number})"
                )
            # A stale file-based CRL still lists what it lists; refusing every client over it would be an outage.
            if crl.next_update is not None and crl.next_update < datetime.now(UTC):
                log.warning("crl_stale", path=str(self._crl_path), next_update=crl.next_update.isoformat())
        updates = [crl.next_update for crl in new.lists.values() if crl.next_update is not None]
        if updates:
            metrics.crl_next_update().set(min(updates).timestamp())
        return new


def validate_server_pair(
    cert_pem: bytes, key_pem: bytes, ca_pem: bytes, names: Sequence[str], *, now: datetime | None = None
) -> None:
    """Refuse a server certificate and key that would fail clients if swapped in; CertificateConfigError says why."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CertificateConfigError("server certificate does not parse") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateConfigError("server key does not parse (or is encrypted)") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CertificateConfigError("server key does not match the server certificate")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < _MIN_RSA_BITS:
        raise CertificateConfigError(f"server key is RSA {key.key_size} bits; at least {_MIN_RSA_BITS} required")
    moment = now or datetime.now(UTC)
    if moment > cert.not_valid_after_utc:
        raise CertificateConfigError("server certificate expired")
    if moment < cert.not_valid_before_utc:
        raise CertificateConfigError("server certificate not yet valid")
    _check_server_usage(cert)
    missing = [name for name in names if not _covers(cert, name)]
    if missing:
        raise CertificateConfigError(f"server certificate SANs do not cover {', '.join(missing)}")
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise CertificateConfigError("CA certificate does not parse") from None
    if not any(_issued_by(cert, ca) for ca in cas):
        raise CertificateConfigError("server certificate is not issued by the CA")


def _check_server_usage(cert: x509.Certificate) -> None:
    """Refuse a leaf unfit for a TLS server (see ``_leaf_problem``)."""
    problem = _leaf_problem(cert, "server")
    if problem is not None:
        raise CertificateConfigError(f"server certificate {problem}")


def _covers(cert: x509.Certificate, name: str) -> bool:
    """Whether a SAN matches ``name``: IP to IP SANs, hostnames to DNS SANs (RFC 6125 6.4; CN is not consulted)."""
    san = _extension(cert, x509.SubjectAlternativeName)
    if san is None:
        return False
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return any(_dns_matches(pattern, name) for pattern in san.get_values_for_type(x509.DNSName))
    return address in san.get_values_for_type(x509.IPAddress)


def _dns_matches(pattern: str, name: str) -> bool:
    """RFC 6125 6.4.3: exact, case-insensitive, or a wildcard that is the whole left-most label of a 3+ label name."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if not pattern.startswith("*."):
        return pattern == name
    suffix = pattern[2:]
    label, _, rest = name.partition(".")
    return "*" not in suffix and "." in suffix and bool(label) and rest == suffix


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True
