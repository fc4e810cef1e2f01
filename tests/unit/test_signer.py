"""The signer checks certificate trust adds to the model-signing library's: an allowed identity, and validity at
the load (the library checks the chain as of the certificate's own start)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.models.signature import SignatureError, check_signer, signer_names

NOW = datetime(2026, 12, 7, tzinfo=UTC)


def certificate(*names: x509.GeneralName, cn: str = "release", days: tuple[int, int] = (-1, 1)) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW + timedelta(days=days[0]))
        .not_valid_after(NOW + timedelta(days=days[1]))
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_every_name_of_the_certificate_is_spelled_with_its_type():
    cert = certificate(
        x509.UniformResourceIdentifier("spiffe://example.org/model-signer/release"),
        x509.RFC822Name("release@example.org"),
        x509.DNSName("Signer.Example.org"),
    )
    assert signer_names(cert) == [
        "spiffe://example.org/model-signer/release",
        "email:release@example.org",
        "dns:signer.example.org",
        "cn:release",
    ]


def test_any_allowed_name_passes_and_none_is_refused_naming_the_setting():
    cert = certificate(x509.RFC822Name("release@example.org"))
    check_signer(cert, ("email:release@example.org",), now=NOW)
    check_signer(cert, ("cn:release",), now=NOW)
    with pytest.raises(SignatureError, match=r"signer email:release@example.org, cn:release is not one of models\."):
        check_signer(cert, ("email:intern@example.org",), now=NOW)


@pytest.mark.parametrize(
    ("days", "message"), [((-10, -2), "the signing certificate expired at"), ((2, 10), "is not valid before")]
)
def test_a_certificate_outside_its_validity_now_is_refused(days, message):
    with pytest.raises(SignatureError, match=message):
        check_signer(certificate(cn="release", days=days), ("cn:release",), now=NOW)
