"""Client-certificate checks the gateway runs on every call, beyond what the TLS handshake verified.

The handshake (grpcio) proves the peer holds a key certified by our CA. It does not check revocation, nor
refuse certificates that chain correctly but are not fit for a client (RFC 5280 key usage, EKU), nor pick
one unambiguous identity, and a connection outlives the certificate's expiry. Parsing is cached per PEM, so
the per-call cost is a dict lookup plus a time comparison.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import AuthenticationError
from gateway.watcher import Watcher, file_fingerprint

log = structlog.get_logger(__name__)

_PEER_CACHE_SIZE = 4096


class CertificateConfigError(Exception):
    """A certificate, key or CRL file the gateway cannot use; the message names the file."""


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """What the gateway needs from a client's leaf certificate."""

    identity: str
    sha256_hex: str
    x5t_s256: str  # RFC 8705 section 3.1: base64url(SHA-256(DER)), no padding
    not_before: datetime
    not_after: datetime
    serial: int


def _identity(cert: x509.Certificate) -> str:
    """SPIFFE URI SAN first, then the single DNS SAN, then the single CN; anything ambiguous is refused."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        uris, dns = [], []
    if len(uris) > 1:
        raise AuthenticationError(reason="ambiguous identity: several SPIFFE URI SANs")
    if uris:
        return str(uris[0])
    if len(dns) > 1:
        raise AuthenticationError(reason="ambiguous identity: several DNS SANs")
    if dns:
        return str(dns[0])
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) > 1:
        raise AuthenticationError(reason="ambiguous identity: several CNs")
    if cns and str(cns[0].value):
        return str(cns[0].value)
    raise AuthenticationError(reason="client certificate has no identity")


def _check_client_usage(cert: x509.Certificate) -> None:
    """RFC 5280 4.2.1.3/4.2.1.9/4.2.1.12: a client leaf signs, is not a CA, and allows clientAuth if EKU is set."""
    extensions = cert.extensions
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise AuthenticationError(reason="client certificate is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        if not extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature:
            raise AuthenticationError(reason="client certificate key usage lacks digitalSignature")
    except x509.ExtensionNotFound:
        pass
    try:
        if ExtendedKeyUsageOID.CLIENT_AUTH not in extensions.get_extension_for_class(x509.ExtendedKeyUsage).value:
            raise AuthenticationError(reason="client certificate is not for client authentication (EKU)")
    except x509.ExtensionNotFound:
        pass


class _PeerCache:
    """Bounded LRU of parsed peers (or their refusal) keyed by the PEM bytes a connection presents."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, PeerCertificate | AuthenticationError] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, pem: bytes) -> PeerCertificate | AuthenticationError | None:
        with self._lock:
            entry = self._entries.get(pem)
            if entry is not None:
                self._entries.move_to_end(pem)
            return entry

    def put(self, pem: bytes, entry: PeerCertificate | AuthenticationError) -> None:
        with self._lock:
            self._entries[pem] = entry
            if len(self._entries) > self._size:
                self._entries.popitem(last=False)


_cache = _PeerCache(_PEER_CACHE_SIZE)


def inspect_peer(pem: bytes) -> PeerCertificate:
    """The identity and thumbprints of a client's leaf certificate; AuthenticationError if it is unfit."""
    cached = _cache.get(pem)
    if cached is None:
        cached = _inspect(pem)
        _cache.put(pem, cached)
    if isinstance(cached, AuthenticationError):
        raise AuthenticationError(reason=cached.reason)
    return cached


def _inspect(pem: bytes) -> PeerCertificate | AuthenticationError:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        _check_client_usage(cert)
        identity = _identity(cert)
    except AuthenticationError as exc:
        return exc
    except ValueError:
        return AuthenticationError(reason="client certificate does not parse")
    der = cert.public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).digest()
    return PeerCertificate(
        identity=identity,
        sha256_hex=digest.hex(),
        x5t_s256=base64.urlsafe_b64encode(digest).rstrip(b"=").decode(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        serial=cert.serial_number,
    )


def check_validity(peer: PeerCertificate, now: datetime) -> None:
    """Refuse a certificate outside its validity period (connections outlive the handshake's check)."""
    if now > peer.not_after:
        raise AuthenticationError(reason="client certificate expired")
    if now < peer.not_before:
        raise AuthenticationError(reason="client certificate not yet valid")


@dataclass(frozen=True, slots=True)
class RevocationList:
    """Serial numbers revoked by the CA's CRL."""

    serials: frozenset[int]
    next_update: datetime | None

    def is_revoked(self, serial: int) -> bool:
        """Whether this serial number is on the list."""
        return serial in self.serials


def _load_ca(ca_path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(ca_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateConfigError(f"{ca_path}: cannot load the CA certificate: {exc}") from None


def load_crl(crl_path: str | Path, ca_path: str | Path) -> RevocationList:
    """Load a PEM or DER CRL and check that the CA signed it."""
    crl_path, ca_path = Path(crl_path), Path(ca_path)
    try:
        data = crl_path.read_bytes()
    except OSError as exc:
        raise CertificateConfigError(f"{crl_path}: cannot read: {exc.strerror}") from None
    try:
        crl = x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
    except ValueError:
        raise CertificateConfigError(f"{crl_path}: not a CRL") from None
    ca = _load_ca(ca_path)
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise CertificateConfigError(f"{crl_path}: not signed by the CA in {ca_path}")
    return RevocationList(frozenset(entry.serial_number for entry in crl), crl.next_update_utc)


class CrlStore:
    """The current revocation list, reloaded when the CRL (or CA) file changes; a bad new file is refused."""

    def __init__(self, crl_path: str | Path, ca_path: str | Path, *, interval_s: float) -> None:
        self._crl_path, self._ca_path = Path(crl_path), Path(ca_path)
        self.current = load_crl(self._crl_path, self._ca_path)
        self._watcher = Watcher(
            name="crl",
            fingerprint=lambda: file_fingerprint((self._crl_path, self._ca_path)),
            on_change=self._reload,
            interval_s=interval_s,
        )

    def _reload(self) -> None:
        try:
            self.current = load_crl(self._crl_path, self._ca_path)
        except CertificateConfigError as exc:
            log.error("crl_reload_failed", error=str(exc))
            return
        log.info("crl_reloaded", path=str(self._crl_path), revoked=len(self.current.serials))

    def check(self, peer: PeerCertificate) -> None:
        """Refuse a revoked client certificate."""
        if self.current.is_revoked(peer.serial):
            raise AuthenticationError(reason="client certificate revoked")

    def start(self) -> None:
        """Watch the CRL file."""
        self._watcher.start()

    def stop(self) -> None:
        """Stop watching."""
        self._watcher.stop()

    def reload_now(self) -> None:
        """Check the file once, synchronously."""
        self._watcher.check_now()


def _covers(cert: x509.Certificate, name: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(name) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        return name.lower() in (d.lower() for d in san.get_values_for_type(x509.DNSName))


def validate_server_pair(cert_pem: bytes, key_pem: bytes, ca_pem: bytes, names: Sequence[str]) -> None:
    """Refuse a server certificate/key pair that would break clients if it were swapped in."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CertificateConfigError("server certificate does not parse") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CertificateConfigError("server key does not parse (or is encrypted)") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise CertificateConfigError("server key does not match the server certificate")
    missing = [name for name in names if not _covers(cert, name)]
    if missing:
        raise CertificateConfigError(f"server certificate SANs do not cover {missing}")
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise CertificateConfigError("CA certificate does not parse") from None
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateConfigError("server certificate is not issued by the CA") from None
