"""Client certificates from the gateway's own CA that the handshake accepts but the gateway must not take at face
value, over real mutual TLS: a CN that reads like a URI SAN, and leaves that carry a CA's powers. Each is made here
with `cryptography` and signed by the session PKI's CA."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.auth.issuer import issue_token
from gateway.auth.keys import kid_from_jwks
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub

ALICE_ID = "spiffe://gateway.local/client/alice"
X = np.zeros((1, 784), np.float32)

ALICE_CERT_POLICY = f"""
rules:
  - id: alice-cert
    effect: allow
    principals: {{cert: ["{ALICE_ID}"]}}
    models: ["*"]
    actions: "*"
"""


@dataclass(frozen=True)
class Client:
    """A client certificate and its key, as PEM."""

    cert: bytes
    key: bytes


def issue_client(
    pki,
    *,
    common_name: str = "mallory",
    uri: str | None = None,
    ca: bool = False,
    cert_sign: bool = False,
    crl_sign: bool = False,
) -> Client:
    """A client certificate signed by the session CA, with the subject and extensions the test chooses."""
    ca_cert = x509.load_pem_x509_certificate(pki.read("ca.crt"))
    ca_key = serialization.load_pem_private_key(pki.read("ca.key"), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=cert_sign,
                crl_sign=crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if uri is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Client(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def token_for(gw, client: Client, sub: str = "mallory") -> str:
    """A token from the project's issuer, bound to ``client``'s certificate."""
    key = gw.pki.read("jwt-signing.key")
    return issue_token(
        private_key_pem=key,
        sub=sub,
        kid=kid_from_jwks(gw.pki.path("jwks.json"), key),
        iss="https://gateway.local",
        aud="gateway",
        bind_cert_pem=client.cert,
    )


def predict_as(gw, client: Client, token: str, request_id: str) -> str:
    """The model version served to ``client``."""
    credentials = grpc.ssl_channel_credentials(gw.pki.read("ca.crt"), client.key, client.cert)
    with grpc.secure_channel(gw.target, credentials) as channel:
        reply = stub(channel).Predict(
            predict_request("mlp", {"input": X}), metadata=(*auth(token), ("x-request-id", request_id)), timeout=TIMEOUT
        )
    return reply.model_version


def refused_record(gw, client: Client, code: grpc.StatusCode) -> dict:
    """The audit record of ``client``'s refused call, after checking the status the caller got."""
    request_id = uuid.uuid4().hex
    exc = rpc_error(lambda: predict_as(gw, client, token_for(gw, client), request_id))
    assert exc.code() == code, exc.details()
    (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id]
    assert record["code"] == code.name
    return record


def test_a_cn_that_reads_like_a_uri_san_does_not_match_a_cert_rule(start_gateway):
    gw = start_gateway(policy=ALICE_CERT_POLICY)
    real = issue_client(gw.pki, uri=ALICE_ID)
    assert predict_as(gw, real, token_for(gw, real), uuid.uuid4().hex) == "2"  # the rule matches the URI SAN

    impostor = issue_client(gw.pki, common_name=ALICE_ID)  # no SAN: its identity is its CN
    record = refused_record(gw, impostor, grpc.StatusCode.PERMISSION_DENIED)
    assert (record["decision"], record["rule"], record["reason"]) == ("deny", None, "default deny")
    assert record["cert_identity"] == f"cn:{ALICE_ID}"  # the record cannot be read as the URI SAN either


@pytest.mark.parametrize(
    ("extensions", "reason"),
    [
        ({"cert_sign": True}, "client certificate unfit: key usage allows signing certificates or CRLs"),
        ({"crl_sign": True}, "client certificate unfit: key usage allows signing certificates or CRLs"),
        ({"ca": True}, "client certificate unfit: is a CA certificate"),
    ],
    ids=["keyCertSign", "cRLSign", "basicConstraints-CA"],
)
def test_a_leaf_with_the_powers_of_a_ca_is_unauthenticated(start_gateway, extensions, reason):
    gw = start_gateway(policy=ALICE_CERT_POLICY)
    record = refused_record(gw, issue_client(gw.pki, uri=ALICE_ID, **extensions), grpc.StatusCode.UNAUTHENTICATED)
    assert record["reason"] == reason
    assert record["cert_identity"] is None and record["sub"] is None
