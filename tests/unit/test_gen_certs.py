"""scripts/gen_certs.sh: the files it writes, what each certificate says, and its refusals, checked with cryptography
and with the gateway's own loaders (gateway.auth.certs, gateway.auth.keys)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.auth.certs import inspect_peer, load_crl, validate_server_pair
from gateway.auth.issuer import issue_token
from gateway.auth.keys import KeyStore, jwk_kid, kid_from_jwks, load_jwks
from gateway.auth.verifier import TokenVerifier
from tests.conftest import Pki

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gen_certs.sh"
CLIENTS = ("alice", "bob")
E = TypeVar("E", bound=x509.ExtensionType)
# Each party's folder and what it holds: the server and the clients never get a signing key.
SERVER = {"server.crt", "server.key", "ca.crt", "crl.pem", "jwks.json", "audit-hmac.key", "model-signing.pub"}
SIGNING = {"ca.crt", "ca.key", "jwt-signing.key", "jwt-signing.pub", "jwks.json", "model-signing.key"}
SIGNING |= {"model-signing.pub"}
LAYOUT = {
    "server": SERVER,
    "signing": SIGNING,
    **{f"clients/{name}": {f"{name}.crt", f"{name}.key", "ca.crt"} for name in CLIENTS},
}
KEYS = {"signing/ca.key", "signing/jwt-signing.key", "signing/model-signing.key", "server/server.key"}
KEYS |= {"server/audit-hmac.key"}
KEYS |= {f"clients/{name}/{name}.key" for name in CLIENTS}
PUBLIC = {f"{folder}/{name}" for folder, names in LAYOUT.items() for name in names} - KEYS
SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


def gen_certs(*args: str | Path | Pki, check: bool = True) -> subprocess.CompletedProcess[str]:
    # The script needs no Python; PYTHON is set as the Makefile does, to show it is not relied upon either way.
    env = {**os.environ, "PYTHON": sys.executable}
    argv = [str(SCRIPT), *(str(a.dir if isinstance(a, Pki) else a) for a in args)]
    return subprocess.run(argv, check=check, capture_output=True, text=True, env=env, timeout=60)


def cert(pki: Pki, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.read(f"{name}.crt"))


def ext(certificate: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return certificate.extensions.get_extension_for_class(kind)


def spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def snapshot(pki: Pki) -> dict[str, bytes]:
    """Every file of the set (the .ca database included), by relative path."""
    return {str(p.relative_to(pki.dir)): p.read_bytes() for p in sorted(pki.dir.rglob("*")) if p.is_file()}


def validate_server(pki: Pki) -> None:
    validate_server_pair(pki.read("server.crt"), pki.read("server.key"), pki.read("ca.crt"), SERVER_NAMES)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki") / "certs"  # not there yet: the script makes it
    result = gen_certs(directory, *CLIENTS)
    assert result.stdout.count("\n") == 1 and result.stderr == ""  # quiet: one summary line
    assert f"--certs {directory}/server" in result.stdout  # it says what to hand the gateway
    return Pki(directory)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("other")
    gen_certs(directory, "eve")
    return Pki(directory)


@pytest.fixture
def pki_copy(pki: Pki, tmp_path: Path) -> Pki:
    target = tmp_path / "copy"
    shutil.copytree(pki.dir, target)
    return Pki(target)


def test_each_party_gets_a_folder_with_only_what_it_needs(pki):
    folders = {str(p.relative_to(pki.dir)) for p in pki.dir.rglob("*") if p.is_dir() and ".ca" not in p.parts}
    assert folders == {"server", "signing", "clients", *LAYOUT}
    for folder, names in LAYOUT.items():
        assert {p.name for p in (pki.dir / folder).iterdir()} == names | ({".ca"} if folder == "signing" else set())
    assert {p.name for p in pki.dir.iterdir()} == {"server", "signing", "clients"}


def test_the_model_signing_pair_is_p256_and_the_server_holds_its_public_half(pki):
    key = serialization.load_pem_private_key((pki.dir / "signing" / "model-signing.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert (pki.server_dir / "model-signing.pub").read_bytes() == public
    assert (pki.dir / "signing" / "model-signing.pub").read_bytes() == public


def test_copies_of_the_ca_certificate_and_the_jwks_are_the_same(pki):
    ca = (pki.dir / "signing" / "ca.crt").read_bytes()
    assert {(pki.dir / folder / "ca.crt").read_bytes() for folder in LAYOUT} == {ca}
    assert (pki.dir / "signing" / "jwks.json").read_bytes() == (pki.dir / "server" / "jwks.json").read_bytes()


def test_private_keys_are_mode_0600_folders_0700_and_public_files_world_readable_not_writable(pki):
    for name in KEYS:
        assert stat.S_IMODE((pki.dir / name).stat().st_mode) == 0o600, name
    for name in PUBLIC:
        mode = stat.S_IMODE((pki.dir / name).stat().st_mode)
        assert mode & 0o444 == 0o444 and mode & 0o022 == 0, name
    for folder in (pki.dir, pki.dir / "clients", pki.dir / "signing" / ".ca", *(pki.dir / f for f in LAYOUT)):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_ca_is_a_critical_pathlen_zero_ca_that_signs_certificates_and_crls_only(pki):
    ca = cert(pki, "ca")
    constraints = ext(ca, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ext(ca, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature and not usage.value.key_encipherment
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"


def test_server_certificate_names_localhost_and_loopback_for_server_auth_only(pki):
    server = cert(pki, "server")
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    san = ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert len(san) == 3  # nothing else
    assert list(ext(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = ext(server, x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_encipherment and not usage.key_cert_sign  # ECDSA: no key transport
    assert ext(server, x509.BasicConstraints).value.ca is False


@pytest.mark.parametrize("client", CLIENTS)
def test_client_certificate_carries_its_spiffe_id_for_client_auth_only(pki, client):
    leaf = cert(pki, client)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == client
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(f"spiffe://gateway.local/client/{client}")]  # the only SAN
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = ext(leaf, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert ext(leaf, x509.BasicConstraints).value.ca is False


def test_gateway_accepts_the_server_pair_for_localhost_and_loopback(pki):
    validate_server(pki)


@pytest.mark.parametrize("client", CLIENTS)
def test_gateway_takes_the_client_identity_from_its_spiffe_id(pki, client):
    peer = inspect_peer(pki.read(f"{client}.crt"))
    assert peer.identity == f"spiffe://gateway.local/client/{client}"
    assert peer.serial == cert(pki, client).serial_number and peer.issuer == cert(pki, "ca").subject


@pytest.mark.parametrize("name", ["server", *CLIENTS])
def test_leaf_is_signed_by_the_ca_with_its_key_for_about_825_days(pki, name):
    ca, leaf = cert(pki, "ca"), cert(pki, name)
    leaf.verify_directly_issued_by(ca)
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(days=824) <= lifetime <= timedelta(days=826)
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    assert abs(leaf.not_valid_before_utc - datetime.now(UTC)) < timedelta(hours=1)
    assert (
        ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier == ext(ca, x509.SubjectKeyIdentifier).value.digest
    )
    key = serialization.load_pem_private_key(pki.read(f"{name}.key"), password=None)
    assert spki(key.public_key()) == spki(leaf.public_key())


def test_serial_numbers_are_positive_distinct_and_carry_at_least_64_random_bits(pki):
    serials = [cert(pki, name).serial_number for name in ("ca", "server", *CLIENTS)]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2**159 and s.bit_length() > 64 for s in serials)  # RFC 5280 4.1.2.2: at most 20 octets


def test_empty_crl_is_signed_by_the_ca_and_names_it(pki):
    ca = cert(pki, "ca")
    crl = x509.load_pem_x509_crl(pki.path("crl.pem").read_bytes())
    assert crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())
    assert len(crl) == 0
    assert crl.next_update_utc is not None and crl.next_update_utc > datetime.now(UTC)
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value  # RFC 5280 5.2.1
    assert aki.key_identifier == ext(ca, x509.SubjectKeyIdentifier).value.digest
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number >= 1


def test_gateway_loads_the_empty_crl_as_signed_by_the_ca(pki):
    crl = load_crl(pki.path("crl.pem"), pki.path("ca.crt"))
    assert crl.serials == frozenset() and crl.issuer == cert(pki, "ca").subject


def test_jwks_publishes_the_signing_key_with_its_rfc7638_thumbprint_as_kid(pki):
    document = json.loads(pki.path("jwks.json").read_text())
    (jwk,) = document["keys"]
    assert {k: jwk[k] for k in ("kty", "use", "alg")} == {"kty": "RSA", "use": "sig", "alg": "RS256"}
    canonical = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"), sort_keys=True)
    thumbprint = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
    assert jwk["kid"] == thumbprint
    (published,) = jwt.PyJWKSet.from_dict(document).keys
    assert published.key_id == thumbprint and published.algorithm_name == "RS256"

    public = serialization.load_pem_public_key(pki.path("jwt-signing.pub").read_bytes())
    private = serialization.load_pem_private_key(pki.path("jwt-signing.key").read_bytes(), password=None)
    assert isinstance(public, rsa.RSAPublicKey) and isinstance(private, rsa.RSAPrivateKey)
    assert published.key.public_numbers() == public.public_numbers() == private.public_key().public_numbers()
    assert public.key_size >= 3072
    token = jwt.encode({"sub": "alice"}, private, algorithm="RS256", headers={"kid": thumbprint})
    assert jwt.decode(token, published.key, algorithms=["RS256"]) == {"sub": "alice"}


def test_gateway_loads_the_jwks_with_the_signing_key_pinned_to_rs256(pki):
    public = serialization.load_pem_public_key(pki.path("jwt-signing.pub").read_bytes())
    assert isinstance(public, rsa.RSAPublicKey)
    [(kid, key)] = load_jwks(pki.path("jwks.json"), allowed_algorithms=["RS256"]).keys.items()
    assert kid == key.kid == jwk_kid(public)  # the kid issue_token puts in its header by default
    assert key.algorithms == {"RS256"}
    assert key.key.public_numbers() == public.public_numbers()
    assert kid_from_jwks(pki.path("jwks.json"), pki.path("jwt-signing.key").read_bytes()) == kid


def test_token_signed_with_the_script_key_verifies_against_its_jwks_bound_to_the_client(pki):
    alice_pem = pki.path("alice.crt").read_bytes()
    token = issue_token(
        private_key_pem=pki.path("jwt-signing.key").read_bytes(),
        sub="alice",
        iss="https://gw",
        aud="gateway",
        bind_cert_pem=alice_pem,
    )
    verifier = TokenVerifier(
        keys=KeyStore(pki.path("jwks.json"), interval_s=0, allowed_algorithms=["RS256"]),
        issuer="https://gw",
        audience="gateway",
    )
    verified = verifier.verify(token, cert_x5t=inspect_peer(alice_pem).x5t_s256)
    assert verified.subject == "alice" and verified.bound is True


def test_audit_hmac_key_is_32_random_bytes_in_hex(pki, other_pki):
    key = pki.path("audit-hmac.key").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key)  # 32 bytes, lowercase hex, nothing else
    assert key != other_pki.path("audit-hmac.key").read_text().strip()


def test_existing_ca_is_not_overwritten_without_force(pki):
    before = snapshot(pki)
    result = gen_certs(pki, "carol", check=False)
    assert result.returncode == 1
    assert "ca.key exists" in result.stderr and "--force" in result.stderr
    assert snapshot(pki) == before  # no carol.crt, the .ca database untouched


def test_force_makes_a_new_ca_and_reissues_everything(pki, pki_copy):
    old_ca = cert(pki_copy, "ca")
    gen_certs("--force", pki_copy, "carol")
    new_ca = cert(pki_copy, "ca")
    assert spki(new_ca.public_key()) != spki(old_ca.public_key())
    assert pki_copy.path("jwks.json").read_bytes() != pki.path("jwks.json").read_bytes()
    for name in ("server", "carol"):
        cert(pki_copy, name).verify_directly_issued_by(new_ca)
    assert stat.S_IMODE(pki_copy.path("carol.key").stat().st_mode) == 0o600
    # A fresh CRL from the new CA, and the new CA certificate in each folder.
    assert load_crl(pki_copy.path("crl.pem"), pki_copy.path("ca.crt")).serials == frozenset()
    assert (pki_copy.dir / "clients" / "carol" / "ca.crt").read_bytes() == pki_copy.read("ca.crt")
    assert not [p for p in pki_copy.dir.iterdir() if p.name.startswith(".gen_certs")]  # staging folder cleaned up


def test_client_adds_a_certificate_from_the_existing_ca_and_leaves_the_rest(pki_copy):
    before = {name: (pki_copy.dir / name).read_bytes() for name in KEYS | PUBLIC}
    result = gen_certs("--client", "dave", pki_copy)
    assert result.stdout.count("\n") == 1
    dave = cert(pki_copy, "dave")
    dave.verify_directly_issued_by(cert(pki_copy, "ca"))
    uris = ext(dave, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["spiffe://gateway.local/client/dave"]
    assert stat.S_IMODE(pki_copy.path("dave.key").stat().st_mode) == 0o600
    folder = pki_copy.dir / "clients" / "dave"
    assert {p.name for p in folder.iterdir()} == {"dave.crt", "dave.key", "ca.crt"}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and (folder / "ca.crt").read_bytes() == pki_copy.read("ca.crt")
    assert {name: (pki_copy.dir / name).read_bytes() for name in KEYS | PUBLIC} == before


def test_client_refuses_to_replace_an_existing_client_key_without_force(pki_copy):
    before = pki_copy.path("alice.key").read_bytes()
    result = gen_certs("--client", "alice", pki_copy, check=False)
    assert result.returncode == 1 and "alice.key exists" in result.stderr
    assert pki_copy.path("alice.key").read_bytes() == before
    gen_certs("--force", "--client", "alice", pki_copy)
    assert pki_copy.path("alice.key").read_bytes() != before


def test_client_with_a_bad_name_is_refused_and_changes_nothing(pki_copy):
    before = snapshot(pki_copy)
    result = gen_certs("--client", "../evil", pki_copy, check=False)
    assert result.returncode == 1 and "bad client name" in result.stderr
    assert snapshot(pki_copy) == before


def test_client_needs_an_existing_ca(tmp_path):
    result = gen_certs("--client", "dave", tmp_path, check=False)
    assert result.returncode == 1 and "no CA" in result.stderr


@pytest.mark.parametrize(
    "name", ["server", "ca", "jwt-signing", "audit-hmac", "Alice", "../x", "-x", "a b", "", "bob!", "a" * 64]
)
def test_reserved_or_malformed_client_names_are_refused_before_anything_is_written(tmp_path, name):
    result = gen_certs(tmp_path / "out", "alice", name, check=False)
    assert result.returncode == 1 and result.stderr.startswith("gen_certs.sh: ")
    assert not (tmp_path / "out").exists()


def test_revoke_puts_the_serial_on_a_crl_that_verifies_against_the_ca(pki_copy):
    ca, alice, bob = cert(pki_copy, "ca"), cert(pki_copy, "alice"), cert(pki_copy, "bob")
    gen_certs("--revoke", "alice", pki_copy)
    crl = x509.load_pem_x509_crl(pki_copy.path("crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key()) and crl.issuer == ca.subject
    assert crl.get_revoked_certificate_by_serial_number(alice.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(bob.serial_number) is None
    gateway_crl = load_crl(pki_copy.path("crl.pem"), pki_copy.path("ca.crt"))  # what the gateway will enforce
    assert gateway_crl.is_revoked(alice.serial_number) and not gateway_crl.is_revoked(bob.serial_number)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    result = gen_certs("--revoke", "alice", pki_copy)  # idempotent; the CRL is re-signed with a higher number
    assert "already revoked" in result.stdout
    again = x509.load_pem_x509_crl(pki_copy.path("crl.pem").read_bytes())
    assert [r.serial_number for r in again] == [alice.serial_number]
    assert again.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number


def test_revoke_in_a_copied_folder_leaves_the_original_untouched(pki, pki_copy):
    # The e2e suite revokes in copies of one session PKI: a copy must not write to the original's CA database.
    before = snapshot(pki)
    gen_certs("--revoke", "bob", pki_copy)
    assert snapshot(pki) == before
    assert len(x509.load_pem_x509_crl(pki_copy.path("crl.pem").read_bytes())) == 1


def test_revoke_refuses_a_certificate_from_another_ca(pki_copy, other_pki):
    pki_copy.path("eve.crt").parent.mkdir()
    shutil.copy(other_pki.path("eve.crt"), pki_copy.path("eve.crt"))
    before = pki_copy.path("crl.pem").read_bytes()
    result = gen_certs("--revoke", "eve", pki_copy, check=False)
    assert result.returncode == 1 and "openssl verify failed" in result.stderr
    assert pki_copy.path("crl.pem").read_bytes() == before


@pytest.mark.parametrize(("name", "message"), [("nobody", "no certificate"), ("server", "reserved"), ("../x", "bad")])
def test_revoke_of_anything_but_a_known_client_is_refused(pki_copy, name, message):
    before = snapshot(pki_copy)
    result = gen_certs("--revoke", name, pki_copy, check=False)
    assert result.returncode == 1 and message in result.stderr
    assert snapshot(pki_copy) == before


def test_server_rotation_issues_a_new_key_and_certificate_from_the_same_ca(pki_copy):
    old, old_key = cert(pki_copy, "server"), pki_copy.path("server.key").read_bytes()
    gen_certs("--server", pki_copy)
    new = cert(pki_copy, "server")
    assert new.serial_number != old.serial_number
    assert pki_copy.path("server.key").read_bytes() != old_key and spki(new.public_key()) != spki(old.public_key())
    new.verify_directly_issued_by(cert(pki_copy, "ca"))
    assert stat.S_IMODE(pki_copy.path("server.key").stat().st_mode) == 0o600
    validate_server(pki_copy)


def test_unknown_option_is_refused_with_a_message(tmp_path):
    result = gen_certs("--bogus", tmp_path, check=False)
    assert result.returncode == 1 and "unknown option --bogus" in result.stderr
