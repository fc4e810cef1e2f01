"""Server TLS credentials for mutual TLS, rotated without restart, for the gRPC port and the HTTPS REST port.

grpcio asks ``_fetch`` for a new certificate configuration at each handshake, and the REST listener takes
``ssl_context()`` for each connection it accepts; a watcher validates a changed cert/key/CA set first (key file
private to the gateway's user, parses, key matches, SANs cover the configured names, chains to the CA) and only
then offers it, so a bad pair is refused with a logged error and the old one keeps serving. Open connections keep
the credentials they were made with (bounded by max_connection_age).
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass

import grpc
import structlog
from cryptography import x509

from gateway import metrics
from gateway.auth.certs import read_material, validate_server_pair
from gateway.config import ConfigError, TlsSettings, read_secret
from gateway.errors import StartupError
from gateway.watcher import ReloadingStore, file_fingerprint

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Material:
    """One validated certificate set, in the form each listener takes."""

    grpc: grpc.ServerCertificateConfiguration
    ssl: ssl.SSLContext


def https_context(cert: bytes, key: bytes, ca: bytes) -> ssl.SSLContext:
    """A server context for mutual TLS over HTTP/1.1: TLS 1.2 or newer, a client certificate from ``ca`` required.

    ssl loads a certificate chain from files only: the validated bytes go through an anonymous in-memory file
    (memfd), so the context holds exactly what was validated and the key never touches another file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca.decode("ascii"))
    context.set_alpn_protocols(["http/1.1"])
    fd = os.memfd_create("gateway-server-pair", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert + b"\n" + key)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return context


class ServerCredentials:
    """The server's certificate, key and client CA, validated, with hot rotation."""

    def __init__(self, settings: TlsSettings) -> None:
        if not (settings.cert and settings.key and settings.client_ca):
            raise ConfigError("tls.cert, tls.key and tls.client_ca are required for mutual TLS")
        self._paths = (settings.cert, settings.key, settings.client_ca)
        self._names = settings.server_names
        self._lock = threading.Lock()
        # A bad pair or key file at startup raises a StartupError; on a reload it is refused, the old pair kept.
        self._configs = ReloadingStore(
            name="server-tls",
            fingerprint=lambda: file_fingerprint(self._paths),
            load=lambda _old: self._load(),
            refused=StartupError,
            interval_s=settings.reload_interval_s,
            reloaded="credentials_rotated",
            failed="server_certificate_refused",
        )
        self._initial = self._offered = self._configs.current

    def _load(self) -> _Material:
        cert_path, key_path, ca_path = self._paths
        cert, key, ca = read_material(cert_path), read_secret(key_path, key="tls.key"), read_material(ca_path)
        validate_server_pair(cert, key, ca, self._names)
        leaf = x509.load_pem_x509_certificate(cert)
        metrics.set_timestamp(metrics.NOT_AFTER.labels(role="server"), leaf.not_valid_after_utc)
        cas = x509.load_pem_x509_certificates(ca)
        metrics.set_timestamp(metrics.NOT_AFTER.labels(role="client_ca"), min(c.not_valid_after_utc for c in cas))
        log.info(
            "server_certificate_loaded",
            path=str(cert_path),
            serial=format(leaf.serial_number, "x"),
            not_after=leaf.not_valid_after_utc.isoformat(),
        )
        return _Material(
            grpc=grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca),
            ssl=https_context(cert, key, ca),
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpcio at each handshake: a newly validated configuration once, else None (keep)."""
        with self._lock:
            material = self._configs.current
            if material is self._offered:
                return None
            self._offered = material
        return material.grpc

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that require and verify a client certificate at the handshake."""
        return grpc.dynamic_ssl_server_credentials(self._initial.grpc, self._fetch, require_client_authentication=True)

    def ssl_context(self) -> ssl.SSLContext:
        """The context of the newest validated set, for a new HTTPS connection (a client certificate required)."""
        return self._configs.current.ssl

    def start(self) -> None:
        """Watch the certificate files."""
        self._configs.start()

    def stop(self) -> None:
        """Stop watching."""
        self._configs.stop()

    def reload_now(self) -> bool:
        """Check the files once, synchronously (SIGHUP); returns whether a change was seen (loaded or refused)."""
        return self._configs.check_now()
