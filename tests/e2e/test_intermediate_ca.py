"""Client certificates issued by an intermediate CA, over real mutual TLS (catalogue case A20): the gateway checks
the intermediate's own revocation in its issuer's CRL, not only the leaf's in the intermediate's CRL. The root, the
intermediate, their CRLs and the leaf are made here with `cryptography`; the server keeps the session PKI's
certificate, whose CA stays in the client CA bundle beside the new root and intermediate."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.auth import reasons
from gateway.auth.issuer import issue_token
from gateway.auth.keys import kid_from_jwks
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub

X = np.zeros((1, 784), np.float32)
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
CAROL_ID = "spiffe://gateway.local/client/carol"
CAROL_POLICY = f"""
rules:
  - id: carol
    effect: allow
    principals: {{cert: ["{CAROL_ID}"], subjects: [carol]}}
    models: ["*"]
    actions: "*"
"""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Authority:
    """A CA certificate and its key; ``revoke`` and ``crl`` make its CRL."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    number: int = 0

    @classmethod
    def root(cls, cn: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(_ca_cert(_name(cn), key.public_key(), _name(cn), key, path_length=1), key)

    def intermediate(self, cn: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        return Authority(_ca_cert(_name(cn), key.public_key(), self.cert.subject, self.key, path_length=0), key)

    def client(self, spiffe_id: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(_name(spiffe_id.rsplit("/", 1)[1]), key.public_key(), self.cert.subject)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert, key

    def crl(self, revoked: Sequence[x509.Certificate] = ()) -> bytes:
        self.number += 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(NOW - dt.timedelta(minutes=5))
            .next_update(NOW + dt.timedelta(days=30))
            .add_extension(x509.CRLNumber(self.number), critical=False)
        )
        for cert in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(NOW).build()
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _builder(subject: x509.Name, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
    )


def _ca_cert(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    *,
    path_length: int,
) -> x509.Certificate:
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        _builder(subject, public_key, issuer)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(usage, critical=True)
        .sign(signer, hashes.SHA256())
    )


@dataclass
class Setup:
    root: Authority
    intermediate: Authority
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    crl: Path
    client_ca: Path


@pytest.fixture
def chain(pki, tmp_path: Path) -> Setup:
    root = Authority.root("A20 test root CA")
    intermediate = root.intermediate("A20 test intermediate CA")
    leaf, leaf_key = intermediate.client(CAROL_ID)
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(pki.read("ca.crt") + root.pem + intermediate.pem)  # the server's CA stays: it signed it
    return Setup(root, intermediate, leaf, leaf_key, tmp_path / "crl.pem", client_ca)


def start(start_gateway, pki, setup: Setup, crls: Sequence[bytes]):
    setup.crl.write_bytes(b"".join(crls))
    return start_gateway(policy=CAROL_POLICY, overrides={"tls.client_ca": setup.client_ca, "tls.crl": setup.crl})


def call(gw, pki, setup: Setup) -> str:
    """One Predict as the intermediate's leaf with a token bound to it: "OK", or the refusal's audit reason."""
    cert_pem = setup.leaf.public_bytes(serialization.Encoding.PEM)
    key_pem = setup.leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signing = pki.read("jwt-signing.key")
    token = issue_token(
        private_key_pem=signing,
        sub="carol",
        kid=kid_from_jwks(pki.path("jwks.json"), signing),
        bind_cert_pem=cert_pem,
        iss="https://gateway.local",
        aud="gateway",
    )
    request_id = uuid.uuid4().hex
    credentials = grpc.ssl_channel_credentials(pki.read("ca.crt"), key_pem, cert_pem)
    with grpc.secure_channel(gw.target, credentials) as channel:
        metadata = (*auth(token), ("x-request-id", request_id))
        predict = stub(channel).Predict
        try:
            predict(predict_request("mlp", {"input": X}), metadata=metadata, timeout=TIMEOUT)
        except grpc.RpcError:
            exc = rpc_error(lambda: predict(predict_request("mlp", {"input": X}), metadata=metadata, timeout=TIMEOUT))
            (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id][:1]
            # The caller reads the reason's term, never its detail (the intermediate CA's name).
            term = reasons.term_of(record["reason"])
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            assert exc.details().startswith(f"{term}: ") and ":" not in exc.details().split(": ", 2)[1]
            assert record["code"] == "UNAUTHENTICATED" and record["cert_identity"] == CAROL_ID
            return str(record["reason"])
    (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id]
    assert (record["code"], record["cert_identity"]) == ("OK", CAROL_ID)
    return "OK"


def test_a_leaf_of_an_intermediate_is_served_when_neither_is_revoked(start_gateway, pki, chain: Setup) -> None:
    gw = start(start_gateway, pki, chain, [chain.intermediate.crl(), chain.root.crl(), pki.read("crl.pem")])
    assert call(gw, pki, chain) == "OK"


def test_a_leaf_of_a_revoked_intermediate_is_refused(start_gateway, pki, chain: Setup) -> None:
    # The root revokes the intermediate; the intermediate's own CRL, listed first, revokes nothing.
    revoked = [chain.intermediate.crl(), chain.root.crl([chain.intermediate.cert]), pki.read("crl.pem")]
    gw = start(start_gateway, pki, chain, revoked)
    assert call(gw, pki, chain) == "intermediate CA certificate revoked"


def test_an_intermediate_revoked_while_serving_is_refused_after_the_crl_reload(start_gateway, pki, chain) -> None:
    gw = start(start_gateway, pki, chain, [chain.intermediate.crl(), chain.root.crl(), pki.read("crl.pem")])
    assert call(gw, pki, chain) == "OK"
    chain.crl.write_bytes(chain.intermediate.crl() + chain.root.crl([chain.intermediate.cert]) + pki.read("crl.pem"))
    assert gw.gateway.crl.reload_now()
    assert call(gw, pki, chain) == "intermediate CA certificate revoked"


def test_without_the_roots_crl_a_leaf_of_an_intermediate_is_refused(start_gateway, pki, chain: Setup) -> None:
    # Only the intermediate's CRL: whether the root revoked the intermediate cannot be known, so no.
    gw = start(start_gateway, pki, chain, [chain.intermediate.crl()])
    assert call(gw, pki, chain).startswith("no CRL for the certificate chain: issuer of intermediate CA")


def test_a_revoked_leaf_of_an_intermediate_is_refused(start_gateway, pki, chain: Setup) -> None:
    gw = start(start_gateway, pki, chain, [chain.root.crl(), chain.intermediate.crl([chain.leaf]), pki.read("crl.pem")])
    assert call(gw, pki, chain) == "client certificate revoked"
