"""Client-certificate checks beyond the handshake (no server): identity, fitness for client auth, validity,
revocation lists and their reload, and the server certificate/key pair check used before a rotation."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from structlog.testing import capture_logs

from gateway.auth import reasons
from gateway.auth.certs import (
    CertificateConfigError,
    CrlStore,
    PeerCertificate,
    check_validity,
    inspect_peer,
    load_crl,
    load_crls,
    validate_server_pair,
)
from gateway.auth.keys import cert_thumbprint
from gateway.errors import AuthenticationError

START = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
END = START + dt.timedelta(days=90)
SPIFFE = "spiffe://gateway.local/client/alice"
SERVER_NAMES = ["localhost", "127.0.0.1", "::1"]


def pem_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cn(*names: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in names])


def key_usage(
    *, digital_signature: bool = False, cert_sign: bool = False, crl_sign: bool = False, encipherment: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


SIGNING = key_usage(digital_signature=True)


@dataclass(frozen=True)
class Leaf:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return pem_of(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA made with `cryptography` that issues leaves with the extensions a test chooses."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str = "test CA", *, crl_sign: bool = True) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(cn(name))
            .issuer_name(cn(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(START)
            .not_valid_after(START + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(key_usage(cert_sign=True, crl_sign=crl_sign), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @property
    def pem(self) -> bytes:
        return pem_of(self.cert)

    def issue(
        self,
        *,
        subject: x509.Name | None = None,
        uris: Sequence[str] = (),
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CLIENT_AUTH,),
        usage: x509.KeyUsage | None = SIGNING,
        ca: bool | None = False,
        not_before: dt.datetime = START,
        not_after: dt.datetime = END,
    ) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(cn("alice") if subject is None else subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if usage is not None:
            builder = builder.add_extension(usage, critical=True)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if ca is not None:
            builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        return Leaf(builder.sign(self.key, hashes.SHA256()), key)

    def crl(
        self,
        revoked: Sequence[int] = (),
        *,
        number: int | None = None,
        extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
        next_update: dt.datetime = START + dt.timedelta(days=30),
        encoding: serialization.Encoding = serialization.Encoding.PEM,
    ) -> bytes:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(START)
            .next_update(next_update)
        )
        if number is not None:
            builder = builder.add_extension(x509.CRLNumber(number), critical=False)
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        for serial in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(START).build()
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(encoding)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority.create("another CA")


@pytest.fixture(scope="module")
def impostor_ca() -> CertificateAuthority:
    """Same name as the test CA, different key: only a signature check tells them apart."""
    return CertificateAuthority.create()


def issue_server(issuer: CertificateAuthority, **overrides: Any) -> Leaf:
    settings: dict[str, Any] = {
        "subject": cn("localhost"),
        "dns": ["localhost"],
        "ips": ["127.0.0.1", "::1"],
        "eku": [ExtendedKeyUsageOID.SERVER_AUTH],
    }
    return issuer.issue(**{**settings, **overrides})


@pytest.fixture(scope="module")
def server(ca: CertificateAuthority) -> Leaf:
    return issue_server(ca)


def write(path: Path, data: bytes) -> Path:
    """Replace a file by rename (a new inode), as deployments and gen_certs.sh do."""
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(data)
    os.replace(staging, path)
    return path


def refusal(pem: bytes) -> str:
    with pytest.raises(AuthenticationError) as caught:
        inspect_peer(pem)
    term = reasons.TERMS[reasons.term_of(caught.value.reason)]
    assert term.term != reasons.INVALID, "a reason outside the vocabulary"
    assert caught.value.message == f"{term.term}: {term.hint}"  # the term, never the detail
    return caught.value.reason


# Identity: one per certificate, spelled with its type (a URI SAN as itself, "dns:NAME", "cn:NAME")


def test_spiffe_uri_san_wins_over_dns_san_and_cn(ca: CertificateAuthority) -> None:
    leaf = ca.issue(subject=cn("alice-cn"), uris=["https://example.test/alice", SPIFFE], dns=["alice.example.test"])
    assert inspect_peer(leaf.pem).identity == SPIFFE


def test_dns_san_wins_over_cn(ca: CertificateAuthority) -> None:
    leaf = ca.issue(subject=cn("alice-cn"), dns=["alice.example.test"])
    assert inspect_peer(leaf.pem).identity == "dns:alice.example.test"


def test_non_spiffe_uri_san_is_not_an_identity(ca: CertificateAuthority) -> None:
    leaf = ca.issue(subject=cn("alice-cn"), uris=["https://example.test/alice"])
    assert inspect_peer(leaf.pem).identity == "cn:alice-cn"


def test_cn_is_the_identity_without_sans(ca: CertificateAuthority) -> None:
    assert inspect_peer(ca.issue(subject=cn("alice-cn")).pem).identity == "cn:alice-cn"


@pytest.mark.parametrize("spelled", [SPIFFE, "dns:alice.example.test"], ids=["uri", "dns"])
def test_cn_spelled_as_another_identity_stays_a_cn(ca: CertificateAuthority, spelled: str) -> None:
    # Issue 12: a CN reading "spiffe://gateway.local/client/alice" was taken for alice's URI SAN.
    assert inspect_peer(ca.issue(subject=cn(spelled)).pem).identity == f"cn:{spelled}"


def test_ip_address_san_is_not_an_identity(ca: CertificateAuthority) -> None:
    leaf = ca.issue(subject=cn("batch-job"), ips=["10.0.0.1"])
    assert inspect_peer(leaf.pem).identity == "cn:batch-job"


def test_two_spiffe_uri_sans_are_refused_as_ambiguous(ca: CertificateAuthority) -> None:
    leaf = ca.issue(uris=[SPIFFE, "spiffe://gateway.local/client/bob"])
    assert refusal(leaf.pem) == "client certificate has no usable identity: several SPIFFE URI SANs"


def test_two_dns_sans_without_a_uri_are_refused_as_ambiguous(ca: CertificateAuthority) -> None:
    leaf = ca.issue(dns=["alice.example.test", "bob.example.test"])
    assert refusal(leaf.pem) == "client certificate has no usable identity: several DNS SANs"


def test_one_spiffe_uri_settles_several_dns_sans(ca: CertificateAuthority) -> None:
    leaf = ca.issue(uris=[SPIFFE], dns=["alice.example.test", "bob.example.test"])
    assert inspect_peer(leaf.pem).identity == SPIFFE


def test_dns_identity_is_lowercased_without_the_trailing_dot(ca: CertificateAuthority) -> None:
    assert inspect_peer(ca.issue(dns=["Alice.Example.TEST."]).pem).identity == "dns:alice.example.test"


def test_wildcard_dns_san_is_refused_as_an_identity(ca: CertificateAuthority) -> None:
    assert (
        refusal(ca.issue(dns=["*.example.test"]).pem) == "client certificate has no usable identity: wildcard DNS SAN"
    )


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://Gateway.local/client/alice",
        "spiffe://gateway.local/client/../admin",
        "spiffe://gateway.local/client/alice?admin=1",
        "spiffe://gateway.local:8443/client/alice",
        "spiffe://gateway.local/client//alice",
        "spiffe://gateway.local/client/./alice",
        "spiffe://gateway.local/client/alice/",
        "spiffe:///client/alice",
        "spiffe://gateway.local/" + "a" * 2048,
    ],
    ids=[
        "uppercase-domain",
        "dot-dot",
        "query",
        "port",
        "empty-segment",
        "dot",
        "trailing-slash",
        "empty-trust-domain",
        "too-long",
    ],
)
def test_malformed_spiffe_id_is_refused(ca: CertificateAuthority, uri: str) -> None:
    assert refusal(ca.issue(uris=[uri]).pem) == "client certificate has no usable identity: malformed SPIFFE ID"


def test_two_cns_are_refused_as_ambiguous(ca: CertificateAuthority) -> None:
    assert refusal(ca.issue(subject=cn("alice", "bob")).pem) == "client certificate has no usable identity: several CNs"


def test_certificate_without_identity_is_refused(ca: CertificateAuthority) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gateway")])
    assert refusal(ca.issue(subject=subject).pem) == "client certificate has no usable identity"


# Fitness for client authentication (RFC 5280)


def test_server_auth_only_eku_is_refused(ca: CertificateAuthority) -> None:
    leaf = ca.issue(uris=[SPIFFE], eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    assert refusal(leaf.pem) == "client certificate unfit: is not for client authentication (EKU)"


def test_any_extended_key_usage_does_not_stand_in_for_client_auth(ca: CertificateAuthority) -> None:
    leaf = ca.issue(uris=[SPIFFE], eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    assert refusal(leaf.pem) == "client certificate unfit: is not for client authentication (EKU)"


def test_eku_with_client_auth_among_others_is_accepted(ca: CertificateAuthority) -> None:
    leaf = ca.issue(uris=[SPIFFE], eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    assert inspect_peer(leaf.pem).identity == SPIFFE


def test_key_usage_without_digital_signature_is_refused(ca: CertificateAuthority) -> None:
    leaf = ca.issue(uris=[SPIFFE], usage=key_usage(encipherment=True))
    assert refusal(leaf.pem) == "client certificate unfit: key usage lacks digitalSignature"


@pytest.mark.parametrize(
    "usage",
    [
        key_usage(digital_signature=True, cert_sign=True),
        key_usage(digital_signature=True, crl_sign=True),
        key_usage(digital_signature=True, cert_sign=True, crl_sign=True),
    ],
    ids=["keyCertSign", "cRLSign", "both"],
)
def test_leaf_that_may_sign_certificates_or_crls_is_refused(ca: CertificateAuthority, usage: x509.KeyUsage) -> None:
    leaf = ca.issue(uris=[SPIFFE], usage=usage, ca=False)
    assert refusal(leaf.pem) == "client certificate unfit: key usage allows signing certificates or CRLs"


def test_ca_certificate_is_refused_as_a_client_even_with_client_auth(ca: CertificateAuthority) -> None:
    leaf = ca.issue(uris=[SPIFFE], eku=[ExtendedKeyUsageOID.CLIENT_AUTH], ca=True)
    assert refusal(leaf.pem) == "client certificate unfit: is a CA certificate"
    assert refusal(ca.pem) == "client certificate unfit: is a CA certificate"


def test_leaf_without_optional_extensions_is_accepted(ca: CertificateAuthority) -> None:
    leaf = ca.issue(uris=[SPIFFE], eku=None, usage=None, ca=None)
    assert [extension.oid for extension in leaf.cert.extensions] == [ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    assert inspect_peer(leaf.pem).identity == SPIFFE


@pytest.mark.parametrize(
    "pem",
    [b"", b"not a certificate", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
    ids=["empty", "text", "bad-base64-body"],
)
def test_unparseable_certificate_is_refused(pem: bytes) -> None:
    assert refusal(pem) == "client certificate unfit: does not parse"


# What a peer certificate yields


def test_inspected_peer_is_cached_per_pem_content(ca: CertificateAuthority) -> None:
    pem = ca.issue(uris=[SPIFFE]).pem
    copy = bytes(bytearray(pem))  # equal bytes in another object, as each call of a connection presents them
    assert copy is not pem
    assert inspect_peer(pem) is inspect_peer(copy)


def test_refusal_is_repeated_for_the_same_pem(ca: CertificateAuthority) -> None:
    pem = ca.issue(uris=[SPIFFE], ca=True).pem
    assert refusal(pem) == refusal(pem) == "client certificate unfit: is a CA certificate"


def test_thumbprints_and_dates_come_from_the_der(ca: CertificateAuthority) -> None:
    leaf = ca.issue(uris=[SPIFFE])
    der = leaf.cert.public_bytes(serialization.Encoding.DER)
    peer = inspect_peer(leaf.pem)
    assert peer == PeerCertificate(
        identity=SPIFFE,
        sha256_hex=hashlib.sha256(der).hexdigest(),
        x5t_s256=base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode(),
        not_before=START,
        not_after=END,
        serial=leaf.cert.serial_number,
        issuer=ca.cert.subject,
    )
    assert "=" not in peer.x5t_s256
    assert peer.x5t_s256 == cert_thumbprint(leaf.pem)  # what a token's cnf.x5t#S256 is compared with


# Validity period


@pytest.fixture
def peer(ca: CertificateAuthority) -> PeerCertificate:
    return inspect_peer(ca.issue(uris=[SPIFFE]).pem)


def test_certificate_past_not_after_is_refused_as_expired(peer: PeerCertificate) -> None:
    with pytest.raises(AuthenticationError) as caught:
        check_validity(peer, END + dt.timedelta(seconds=1))
    assert caught.value.reason == "client certificate expired"


def test_certificate_before_not_before_is_refused_as_not_yet_valid(peer: PeerCertificate) -> None:
    with pytest.raises(AuthenticationError) as caught:
        check_validity(peer, START - dt.timedelta(seconds=1))
    assert caught.value.reason == "client certificate not yet valid"


@pytest.mark.parametrize("moment", [START, START + dt.timedelta(days=45), END], ids=["first", "middle", "last"])
def test_certificate_within_its_validity_period_passes(peer: PeerCertificate, moment: dt.datetime) -> None:
    check_validity(peer, moment)


# Certificate revocation lists


@pytest.fixture
def ca_file(ca: CertificateAuthority, tmp_path: Path) -> Path:
    return write(tmp_path / "ca.crt", ca.pem)


def test_crl_lists_the_revoked_serials(ca: CertificateAuthority, ca_file: Path, tmp_path: Path) -> None:
    revoked, kept = ca.issue(uris=[SPIFFE]), ca.issue(uris=[SPIFFE])
    crl = load_crl(write(tmp_path / "crl.pem", ca.crl([revoked.cert.serial_number])), ca_file)
    assert crl.is_revoked(revoked.cert.serial_number)
    assert not crl.is_revoked(kept.cert.serial_number)
    assert crl.next_update == START + dt.timedelta(days=30)


def test_der_crl_is_accepted(ca: CertificateAuthority, ca_file: Path, tmp_path: Path) -> None:
    der = ca.crl([1234], encoding=serialization.Encoding.DER)
    assert load_crl(write(tmp_path / "crl.der", der), ca_file).serials == {1234}


def test_crl_signed_by_another_ca_is_refused(other_ca: CertificateAuthority, ca_file: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "crl.pem", other_ca.crl())
    with pytest.raises(CertificateConfigError) as caught:
        load_crl(path, ca_file)
    assert str(caught.value) == f"{path}: not signed by a CA in {ca_file}"


def test_crl_with_the_ca_name_but_another_key_is_refused(
    impostor_ca: CertificateAuthority, ca_file: Path, tmp_path: Path
) -> None:
    path = write(tmp_path / "crl.pem", impostor_ca.crl())
    with pytest.raises(CertificateConfigError, match="not signed by a CA"):
        load_crl(path, ca_file)


def test_crl_from_a_ca_without_crl_sign_is_refused(tmp_path: Path) -> None:
    # RFC 5280 4.2.1.3: a CA whose key usage lacks cRLSign may sign certificates, never CRLs.
    certificates_only = CertificateAuthority.create(crl_sign=False)
    ca_path = write(tmp_path / "ca.crt", certificates_only.pem)
    path = write(tmp_path / "crl.pem", certificates_only.crl())
    with pytest.raises(CertificateConfigError) as caught:
        load_crl(path, ca_path)
    assert str(caught.value) == f"{path}: not signed by a CA in {ca_path}"


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", b"\x30\x03\x02\x01\x00"],
    ids=["empty", "text", "bad-pem", "bad-der"],
)
def test_garbage_crl_is_refused_naming_the_file(ca_file: Path, tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path / "crl.pem", data)
    with pytest.raises(CertificateConfigError) as caught:
        load_crl(path, ca_file)
    assert str(caught.value) == f"{path}: not a PEM or DER CRL"


def test_missing_crl_or_ca_file_is_refused(ca: CertificateAuthority, ca_file: Path, tmp_path: Path) -> None:
    with pytest.raises(CertificateConfigError, match=r"absent\.pem: cannot read"):
        load_crl(tmp_path / "absent.pem", ca_file)
    with pytest.raises(CertificateConfigError, match=r"absent-ca\.crt: cannot read"):
        load_crl(write(tmp_path / "crl.pem", ca.crl()), tmp_path / "absent-ca.crt")
    with pytest.raises(CertificateConfigError, match="not a PEM CA certificate"):
        load_crl(tmp_path / "crl.pem", write(tmp_path / "garbage-ca.crt", b"garbage"))


def test_crl_is_accepted_from_any_ca_in_a_bundle(
    ca: CertificateAuthority, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    bundle = write(tmp_path / "bundle.crt", other_ca.pem + ca.pem)
    assert load_crl(write(tmp_path / "crl.pem", ca.crl([42])), bundle).serials == {42}


USER_CERTIFICATES_ONLY = x509.IssuingDistributionPoint(
    full_name=None,
    relative_name=None,
    only_contains_user_certs=True,
    only_contains_ca_certs=False,
    only_some_reasons=None,
    indirect_crl=False,
    only_contains_attribute_certs=False,
)


@pytest.mark.parametrize(
    "extension", [x509.DeltaCRLIndicator(1), USER_CERTIFICATES_ONLY], ids=["delta-crl", "issuing-distribution-point"]
)
def test_crl_with_a_critical_extension_it_does_not_process_is_refused(
    ca: CertificateAuthority, ca_file: Path, tmp_path: Path, extension: x509.ExtensionType
) -> None:
    # RFC 5280 5.2.4: a delta CRL lists only changes; read as a full CRL it would un-revoke everything else.
    # RFC 5280 5.2.5: a CRL scoped by its issuing distribution point does not speak for certificates outside it.
    path = write(tmp_path / "crl.pem", ca.crl([7], extensions=[(extension, True)]))
    with pytest.raises(CertificateConfigError) as caught:
        load_crl(path, ca_file)
    assert str(caught.value) == f"{path}: has a critical extension the gateway does not process"


def test_crl_store_reload_picks_up_a_new_crl(ca: CertificateAuthority, ca_file: Path, tmp_path: Path) -> None:
    peer = inspect_peer(ca.issue(uris=[SPIFFE]).pem)
    crl_path = write(tmp_path / "crl.pem", ca.crl())
    store = CrlStore(crl_path, ca_file, interval_s=0)
    store.check(peer)
    assert store.reload_now() is False  # nothing changed
    write(crl_path, ca.crl([peer.serial]))
    with capture_logs() as logs:
        assert store.reload_now() is True
    assert [e["revoked"] for e in logs if e["event"] == "crl_reloaded"] == [1]
    with pytest.raises(AuthenticationError) as caught:
        store.check(peer)
    assert caught.value.reason == "client certificate revoked"


@pytest.mark.parametrize("broken", ["garbage", "other-ca"])
def test_crl_store_refuses_a_broken_crl_and_keeps_the_old_list(
    ca: CertificateAuthority, other_ca: CertificateAuthority, ca_file: Path, tmp_path: Path, broken: str
) -> None:
    peer = inspect_peer(ca.issue(uris=[SPIFFE]).pem)
    crl_path = write(tmp_path / "crl.pem", ca.crl([peer.serial]))
    store = CrlStore(crl_path, ca_file, interval_s=0)
    before = store.current
    write(crl_path, b"garbage" if broken == "garbage" else other_ca.crl())
    with capture_logs() as logs:
        assert store.reload_now() is True  # a change was seen, and refused
    assert store.current is before
    [event] = [e for e in logs if e["event"] == "crl_reload_failed"]
    assert event["log_level"] == "error"
    assert event["error"].startswith(f"{crl_path}: ")
    with pytest.raises(AuthenticationError, match="client certificate revoked"):
        store.check(peer)


def test_crl_store_refuses_a_broken_crl_at_startup(ca_file: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "crl.pem", b"garbage")
    with pytest.raises(CertificateConfigError) as caught:
        CrlStore(path, ca_file, interval_s=0)
    assert str(caught.value) == f"{path}: not a PEM or DER CRL"


def test_crl_store_refuses_a_certificate_from_an_issuer_the_crl_does_not_cover(
    ca: CertificateAuthority, other_ca: CertificateAuthority, ca_file: Path, tmp_path: Path
) -> None:
    # Serial numbers are unique per issuer only: another CA's certificate cannot be judged by this CRL.
    store = CrlStore(write(tmp_path / "crl.pem", ca.crl()), ca_file, interval_s=0)
    with pytest.raises(AuthenticationError) as caught:
        store.check(inspect_peer(other_ca.issue(uris=[SPIFFE]).pem))
    assert caught.value.reason == "no CRL for the certificate chain: the client certificate's issuer"


def test_crl_store_refuses_an_older_crl_number_and_keeps_the_newer_list(
    ca: CertificateAuthority, ca_file: Path, tmp_path: Path
) -> None:
    peer = inspect_peer(ca.issue(uris=[SPIFFE]).pem)
    crl_path = write(tmp_path / "crl.pem", ca.crl([peer.serial], number=5))
    store = CrlStore(crl_path, ca_file, interval_s=0)
    write(crl_path, ca.crl([], number=4))  # a replayed older CRL would silently un-revoke
    with capture_logs() as logs:
        assert store.reload_now() is True
    assert store.current.lists[ca.cert.subject].number == 5
    [event] = [e for e in logs if e["event"] == "crl_reload_failed"]
    assert "older" in event["error"]
    with pytest.raises(AuthenticationError, match="client certificate revoked"):
        store.check(peer)
    write(crl_path, ca.crl([], number=6))
    assert store.reload_now() is True
    store.check(peer)


def test_stale_crl_is_used_with_a_warning(ca: CertificateAuthority, ca_file: Path, tmp_path: Path) -> None:
    with capture_logs() as logs:
        store = CrlStore(write(tmp_path / "crl.pem", ca.crl([9])), ca_file, interval_s=0)
    assert store.current.lists[ca.cert.subject].serials == {9}
    assert [e["log_level"] for e in logs if e["event"] == "crl_stale"] == ["warning"]


def test_a_crl_file_holds_one_crl_per_ca_and_two_of_one_ca_are_refused(
    ca: CertificateAuthority, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    bundle = write(tmp_path / "ca.crt", ca.pem + other_ca.pem)
    crls = load_crls(write(tmp_path / "crl.pem", ca.crl([1]) + other_ca.crl([2, 3])), bundle)
    assert {name: crl.serials for name, crl in crls.lists.items()} == {
        ca.cert.subject: {1},
        other_ca.cert.subject: {2, 3},
    }
    assert crls.revoked == 3 and crls.intermediates == {ca.cert.subject: None, other_ca.cert.subject: None}
    path = write(tmp_path / "crl.pem", ca.crl([1], number=1) + ca.crl([1, 2], number=2))
    with pytest.raises(CertificateConfigError) as caught:
        load_crls(path, bundle)
    assert str(caught.value) == f"{path}: two CRLs of CN=test CA: keep one per CA (the newest)"


# Server certificate/key pair (checked before a rotation is swapped in)


SERVER_NOW = START + dt.timedelta(days=1)


def test_good_server_pair_is_accepted(ca: CertificateAuthority, other_ca: CertificateAuthority, server: Leaf) -> None:
    validate_server_pair(server.pem, server.key_pem, ca.pem, SERVER_NAMES, now=SERVER_NOW)
    validate_server_pair(server.pem, server.key_pem, ca.pem, ["LOCALHOST", "0:0:0:0:0:0:0:1"], now=SERVER_NOW)
    validate_server_pair(server.pem, server.key_pem, ca.pem, ["[::1]"], now=SERVER_NOW)  # as in a URL authority
    validate_server_pair(server.pem, server.key_pem, other_ca.pem + ca.pem, SERVER_NAMES, now=SERVER_NOW)


def pair_error(
    cert: bytes, key: bytes, ca: bytes, names: Sequence[str] = SERVER_NAMES, now: dt.datetime = SERVER_NOW
) -> str:
    with pytest.raises(CertificateConfigError) as caught:
        validate_server_pair(cert, key, ca, names, now=now)
    return str(caught.value)


def test_server_certificate_outside_its_validity_period_is_refused(ca: CertificateAuthority, server: Leaf) -> None:
    after = END + dt.timedelta(seconds=1)
    assert pair_error(server.pem, server.key_pem, ca.pem, now=after) == "server certificate expired"
    before = START - dt.timedelta(seconds=1)
    assert pair_error(server.pem, server.key_pem, ca.pem, now=before) == "server certificate not yet valid"


def test_server_certificate_unfit_for_a_server_is_refused(ca: CertificateAuthority) -> None:
    client_only = issue_server(ca, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
    assert pair_error(client_only.pem, client_only.key_pem, ca.pem) == (
        "server certificate is not for server authentication (EKU)"
    )
    a_ca = issue_server(ca, ca=True)
    assert pair_error(a_ca.pem, a_ca.key_pem, ca.pem) == "server certificate is a CA certificate"
    signer = issue_server(ca, usage=key_usage(digital_signature=True, cert_sign=True, crl_sign=True))
    assert pair_error(signer.pem, signer.key_pem, ca.pem) == (
        "server certificate key usage allows signing certificates or CRLs"
    )


def test_server_key_of_another_certificate_is_refused(ca: CertificateAuthority, server: Leaf) -> None:
    other = issue_server(ca)
    assert pair_error(server.pem, other.key_pem, ca.pem) == "server key does not match the server certificate"


@pytest.mark.parametrize(
    ("names", "missing"),
    [(["localhost", "10.0.0.1"], "10.0.0.1"), (["gateway.example.test", "::2"], "gateway.example.test, ::2")],
    ids=["ip", "dns"],
)
def test_server_certificate_missing_a_san_is_refused(
    ca: CertificateAuthority, server: Leaf, names: list[str], missing: str
) -> None:
    assert pair_error(server.pem, server.key_pem, ca.pem, names) == f"server certificate SANs do not cover {missing}"


def test_server_certificate_without_sans_is_refused(ca: CertificateAuthority) -> None:
    bare = issue_server(ca, dns=(), ips=())
    assert "do not cover" in pair_error(bare.pem, bare.key_pem, ca.pem, ["localhost"])


@pytest.mark.parametrize(
    ("name", "covered"),
    [("api.example.test", True), ("API.example.test.", True), ("a.b.example.test", False), ("example.test", False)],
    ids=["one-label", "case-and-trailing-dot", "two-labels", "no-label"],
)
def test_wildcard_san_covers_exactly_one_left_most_label(ca: CertificateAuthority, name: str, covered: bool) -> None:
    wildcard = issue_server(ca, dns=["*.example.test"], ips=())
    if covered:
        validate_server_pair(wildcard.pem, wildcard.key_pem, ca.pem, [name], now=SERVER_NOW)
    else:
        error = pair_error(wildcard.pem, wildcard.key_pem, ca.pem, [name])
        assert error == f"server certificate SANs do not cover {name}"


def test_dns_san_spelling_an_ip_address_does_not_cover_that_address(ca: CertificateAuthority) -> None:
    # RFC 6125 6.4: an IP address is matched against IP SANs only.
    spelled = issue_server(ca, dns=["127.0.0.1"], ips=())
    assert pair_error(spelled.pem, spelled.key_pem, ca.pem, ["127.0.0.1"]) == (
        "server certificate SANs do not cover 127.0.0.1"
    )


@pytest.mark.parametrize("issuer", ["other_ca", "impostor_ca"])
def test_server_certificate_from_another_ca_is_refused(
    ca: CertificateAuthority, issuer: str, request: pytest.FixtureRequest
) -> None:
    foreign: CertificateAuthority = request.getfixturevalue(issuer)
    cert = issue_server(foreign)
    assert pair_error(cert.pem, cert.key_pem, ca.pem) == "server certificate is not issued by the CA"


def test_garbage_server_certificate_is_refused(ca: CertificateAuthority, server: Leaf) -> None:
    assert pair_error(b"garbage", server.key_pem, ca.pem) == "server certificate does not parse"


def test_garbage_or_encrypted_server_key_is_refused(ca: CertificateAuthority, server: Leaf) -> None:
    encrypted = server.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    for key in (b"garbage", server.pem, encrypted):
        assert pair_error(server.pem, key, ca.pem) == "server key does not parse (or is encrypted)"


def test_garbage_ca_is_refused(server: Leaf) -> None:
    assert pair_error(server.pem, server.key_pem, b"garbage") == "CA certificate does not parse"
