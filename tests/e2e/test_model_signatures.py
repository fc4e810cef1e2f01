"""Only signed models run: with models.signatures required, a version whose files do not match a trusted signature
is refused at start and on reload (the previous version serving on), and every record names the bytes that ran.

Real signatures made by the OpenSSF library (model-signing) with the key pair scripts/gen_certs.sh makes; nothing
reaches a network (key trust only).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.inference import grpc_service_pb2 as oip
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
from gateway.models import signature
from tests.e2e.helpers import TIMEOUT, auth, predict_request, stub

X = np.zeros((1, 784), np.float32)
FAILURES = "gateway_model_signature_failures_total"


def sign(folder: Path, key: Path) -> None:
    signature.sign(folder, private_key=key)


def auditor_digest(folder: Path) -> str:
    """docs/model-signing.md's recipe, by hand: SHA-256 over each file's SHA-256, files by path, model.sig left out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != signature.SIGNATURE_FILE)
    root = hashlib.sha256()
    for path in sorted(files, key=lambda p: PurePosixPath(p.relative_to(folder).as_posix())):
        root.update(hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + root.hexdigest()


def signed_subject(folder: Path) -> str:
    """The digest the signature itself vouches for (the in-toto statement's subject)."""
    bundle = json.loads((folder / signature.SIGNATURE_FILE).read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    return "sha256:" + statement["subject"][0]["digest"]["sha256"]


def failures(mode: str) -> float:
    return REGISTRY.get_sample_value(FAILURES, {"model": "mlp", "mode": mode}) or 0.0


@pytest.fixture
def mlp_repo(demo_models: Path, tmp_path: Path, pki) -> Path:
    """mlp versions 1 and 2, each signed with the set's model-signing key."""
    root = tmp_path / "signed-models"
    for version in ("1", "2"):
        shutil.copytree(demo_models / "mlp" / version, root / "mlp" / version)
        sign(root / "mlp" / version, pki.dir / "signing" / "model-signing.key")
    return root


def test_the_digest_is_the_signed_subject_for_nested_files(demo_models, tmp_path, pki):
    """A Hugging Face-like layout: "tokenizer/vocab.txt" and "tokenizer.json" order differently as strings and as
    paths; the digest must follow the library's manifest (by path components) to name what was signed."""
    folder = tmp_path / "nested" / "1"
    shutil.copytree(demo_models / "mlp" / "1", folder)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    sign(folder, pki.dir / "signing" / "model-signing.key")
    assert signature.digest(folder) == signed_subject(folder) == auditor_digest(folder)


def required(pki, mode: str = "required") -> dict:
    return {"models.signatures": mode, "models.signature_trust.public_key": pki.server_dir / "model-signing.pub"}


def predict(gw) -> pb.PredictResponse:
    with gw.channel("alice") as channel:
        return stub(channel).Predict(predict_request("mlp", {"input": X}), metadata=auth(gw.token()), timeout=TIMEOUT)


def ready(gw, version: str) -> bool:
    with gw.channel("alice") as channel:
        client = oip_grpc.GRPCInferenceServiceStub(channel)
        request = oip.ModelReadyRequest(name="mlp", version=version)
        return client.ModelReady(request, metadata=auth(gw.token()), timeout=TIMEOUT).ready


def test_signed_versions_are_served_and_records_and_metadata_name_their_bytes(start_gateway, mlp_repo, pki):
    gw = start_gateway(models=mlp_repo, overrides=required(pki))
    expected = auditor_digest(mlp_repo / "mlp" / "2")
    assert expected == signed_subject(mlp_repo / "mlp" / "2")

    assert predict(gw).model_version == "2"
    record = gw.audit_records()[-1]
    assert (record["version"], record["code"], record["model_digest"]) == ("2", "OK", expected)
    with gw.channel("alice") as channel:
        md = auth(gw.token())
        meta = stub(channel).GetModelMetadata(
            pb.GetModelMetadataRequest(model_name="mlp", model_version="1"), metadata=md, timeout=TIMEOUT
        )
        config = oip_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
            oip.ModelConfigRequest(name="mlp"), metadata=md, timeout=TIMEOUT
        )
    assert meta.model_digest == auditor_digest(mlp_repo / "mlp" / "1") != expected
    assert config.config.parameters["model_digest"].string_value == expected
    assert gw.audit_records()[-1]["model_digest"] == expected  # the ModelConfig call's record


def tamper_byte(folder: Path, key: Path) -> None:
    model = folder / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))


def add_file(folder: Path, key: Path) -> None:
    (folder / "extra.bin").write_bytes(b"not signed")


def remove_file(folder: Path, key: Path) -> None:
    (folder / "notes.txt").unlink()  # signed with it, served without it


def swap_signature(folder: Path, key: Path) -> None:
    shutil.copy(folder.parent / "1" / signature.SIGNATURE_FILE, folder / signature.SIGNATURE_FILE)


def untrusted_key(folder: Path, key: Path) -> None:
    sign(folder, key)


DEFECTS = {
    "tampered_byte": (tamper_byte, "Hash mismatch for 'model.onnx'"),
    "added_file": (add_file, "Extra files found"),
    "removed_file": (remove_file, "Missing files"),
    "swapped_signature": (swap_signature, "Hash mismatch"),
    "untrusted_key": (untrusted_key, "Key mismatch"),
}


def defective_version(demo_models: Path, folder: Path, defect: str, pki, other_pki) -> None:
    """A copy of mlp 2 signed with the trusted key, then given the defect."""
    shutil.copytree(demo_models / "mlp" / "2", folder)
    if defect == "removed_file":
        (folder / "notes.txt").write_text("model card")
    sign(folder, pki.dir / "signing" / "model-signing.key")
    DEFECTS[defect][0](folder, other_pki.dir / "signing" / "model-signing.key")


def refusals(logs: list[dict], version: int) -> list[dict]:
    return [e for e in logs if e["event"] == "model_signature_invalid" and e["version"] == version]


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_a_version_not_matching_a_trusted_signature_is_refused_at_start_and_on_reload(
    defect, start_gateway, mlp_repo, demo_models, pki, other_pki
):
    shutil.rmtree(mlp_repo / "mlp" / "2")
    defective_version(demo_models, mlp_repo / "mlp" / "2", defect, pki, other_pki)
    before = failures("required")
    with capture_logs() as logs:
        gw = start_gateway(models=mlp_repo, overrides=required(pki))
    (refused,) = refusals(logs, 2)
    assert DEFECTS[defect][1] in refused["reason"] and refused["action"] == "refused"
    assert gw.gateway.models.info("mlp").versions == (1,)
    assert failures("required") == before + 1
    assert (ready(gw, "1"), ready(gw, "2")) == (True, False)

    # On reload: a new version 3 with the same defect is refused, version 1 serves on, records say so.
    defective_version(demo_models, mlp_repo / "mlp" / "3", defect, pki, other_pki)
    with capture_logs() as logs:
        assert gw.gateway.models.reload_now()
    (refused,) = refusals(logs, 3)
    assert DEFECTS[defect][1] in refused["reason"]
    assert failures("required") == before + 2
    assert gw.gateway.models.info("mlp").versions == (1,)
    assert not ready(gw, "3")
    assert predict(gw).model_version == "1"
    record = gw.audit_records()[-1]
    assert (record["version"], record["model_digest"]) == ("1", auditor_digest(mlp_repo / "mlp" / "1"))


def test_a_version_rewritten_unsigned_keeps_serving_its_last_good_load(start_gateway, mlp_repo, pki):
    gw = start_gateway(models=mlp_repo, overrides=required(pki))
    good = auditor_digest(mlp_repo / "mlp" / "2")
    tamper_byte(mlp_repo / "mlp" / "2", pki.dir)
    with capture_logs() as logs:
        assert gw.gateway.models.reload_now()
    (refused,) = refusals(logs, 2)
    assert refused["still_serving"] is True
    assert ("mlp", 2) in gw.gateway.models.failures()
    assert predict(gw).model_version == "2"
    assert gw.audit_records()[-1]["model_digest"] == good  # what ran: the last good load, not the file on disk


def test_calls_during_a_swap_are_recorded_with_the_bytes_that_answered_them(start_gateway, mlp_repo, demo_models, pki):
    """Version 2 is replaced by other, validly signed bytes, then rewritten tampered, while a client calls without
    pause: every record names version 2's old or new digest (or version 1's, if a poll saw the folder between
    remove and rename), and once the new bytes answer, the old never do again; the tampered rewrite changes
    nothing."""
    key = pki.dir / "signing" / "model-signing.key"
    gw = start_gateway(models=mlp_repo, overrides=required(pki))
    old, v1 = auditor_digest(mlp_repo / "mlp" / "2"), auditor_digest(mlp_repo / "mlp" / "1")
    staging = mlp_repo / "mlp" / ".2-new"
    shutil.copytree(demo_models / "mlp" / "1", staging)
    (staging / "notes.txt").write_text("version 2, retrained")
    sign(staging, key)
    new = auditor_digest(staging)
    stop, failed = threading.Event(), []

    def caller() -> None:
        with gw.channel("alice") as channel:
            client, metadata = stub(channel), auth(gw.token())
            while not stop.is_set():
                try:
                    client.Predict(predict_request("mlp", {"input": X}), metadata=metadata, timeout=TIMEOUT)
                except grpc.RpcError as exc:
                    failed.append(exc.code())

    assert predict(gw).model_version == "2"
    thread = threading.Thread(target=caller)
    thread.start()
    try:
        shutil.rmtree(mlp_repo / "mlp" / "2")
        staging.rename(mlp_repo / "mlp" / "2")
        gw.gateway.models.reload_now()
        assert predict(gw).model_version == "2"
        tamper_byte(mlp_repo / "mlp" / "2", key)
        gw.gateway.models.reload_now()
        assert predict(gw).model_version == "2"
    finally:
        stop.set()
        thread.join(timeout=60)
    assert failed == []
    served = [(r["version"], r["model_digest"]) for r in gw.audit_records() if r["method"].endswith("/Predict")]
    assert set(served) <= {("2", old), ("2", new), ("1", v1)}
    first_new = served.index(("2", new))
    assert ("2", old) not in served[first_new:]
    assert served[-1] == ("2", new)  # the tampered rewrite was refused: the new load still answers


def test_warn_mode_serves_an_unverified_version_and_counts_it(start_gateway, mlp_repo, pki):
    tamper_byte(mlp_repo / "mlp" / "2", pki.dir)
    before = failures("warn")
    with capture_logs() as logs:
        gw = start_gateway(models=mlp_repo, overrides=required(pki, "warn"))
    (warned,) = refusals(logs, 2)
    assert warned["action"] == "served" and warned["log_level"] == "warning"
    assert failures("warn") == before + 1
    assert predict(gw).model_version == "2"
    # Served, and named by what it is: the tampered bytes, not what was signed.
    digest = gw.audit_records()[-1]["model_digest"]
    assert digest == auditor_digest(mlp_repo / "mlp" / "2") != signed_subject(mlp_repo / "mlp" / "2")


def test_a_missing_signature_is_refused_and_off_needs_none(start_gateway, mlp_repo, pki):
    (mlp_repo / "mlp" / "2" / signature.SIGNATURE_FILE).unlink()
    with capture_logs() as logs:
        gw = start_gateway(models=mlp_repo, overrides=required(pki))
    (refused,) = refusals(logs, 2)
    assert "model.sig is missing" in refused["reason"]
    assert gw.gateway.models.info("mlp").versions == (1,)
    off = start_gateway(models=mlp_repo)
    assert predict(off).model_version == "2"
    assert off.audit_records()[-1]["model_digest"] == auditor_digest(mlp_repo / "mlp" / "2")


def test_strict_required_stops_the_start_on_a_bad_signature(start_gateway, mlp_repo, pki):
    tamper_byte(mlp_repo / "mlp" / "2", pki.dir)
    with pytest.raises(Exception, match="signature not valid"):
        start_gateway(models=mlp_repo, overrides={**required(pki), "models.strict": True})


def test_per_model_override_verifies_only_the_model_it_names(start_gateway, mlp_repo, pki):
    tamper_byte(mlp_repo / "mlp" / "2", pki.dir)
    overrides = {**required(pki, "off"), "models.signatures_by_model": {"mlp": "required"}}
    gw = start_gateway(models=mlp_repo, overrides=overrides)
    assert gw.gateway.models.info("mlp").versions == (1,)
    with gw.channel("alice") as channel:
        exc = None
        try:
            stub(channel).Predict(
                predict_request("mlp", {"input": X}, version="2"), metadata=auth(gw.token()), timeout=TIMEOUT
            )
        except grpc.RpcError as error:
            exc = error
    assert exc is not None and exc.code() == grpc.StatusCode.NOT_FOUND


def test_model_sign_and_verify_commands_wrap_the_library_with_the_sets_keys(demo_models, tmp_path, pki, other_pki):
    gateway = [sys.executable, "-m", "gateway"]
    repository = tmp_path / "repo"
    shutil.copytree(demo_models / "mlp", repository / "mlp")
    key = pki.dir / "signing" / "model-signing.key"
    signed = subprocess.run([*gateway, "model", "sign", repository, "--key", key], capture_output=True, text=True)
    assert signed.returncode == 0, signed.stderr
    assert signed.stdout.count("signed ") == 2
    assert f"{auditor_digest(repository / 'mlp' / '2')}" in signed.stdout

    def verify(public: Path) -> subprocess.CompletedProcess[str]:
        command = [*gateway, "model", "verify", repository, "--public-key", public]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert verify(pki.server_dir / "model-signing.pub").returncode == 0
    untrusted = verify(other_pki.server_dir / "model-signing.pub")
    assert untrusted.returncode == 1 and untrusted.stdout.count("FAILED") == 2
    tamper_byte(repository / "mlp" / "1", key)
    tampered = verify(pki.server_dir / "model-signing.pub")
    assert tampered.returncode == 1
    assert "OK " in tampered.stdout and "FAILED " in tampered.stdout and "Hash mismatch" in tampered.stdout


# Certificate trust: a model-signing CA and its signing certificates, made with the cryptography library (the
# project's gen_certs.sh makes no model-signing certificates: key trust is what the demo uses).
SIGNER = "spiffe://gateway.local/model-signer/release"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


@pytest.fixture(scope="module")
def signing_ca(tmp_path_factory) -> dict[str, Path]:
    """A CA and three signing certificates: the release signer, the same signer expired, another identity."""
    folder = tmp_path_factory.mktemp("model-signing-ca")
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("model-signing CA"))
        .issuer_name(_name("model-signing CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=30))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .sign(ca_key, hashes.SHA256())
    )
    (folder / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    made = {"ca": folder / "ca.crt"}
    for label, identity, start, end in (
        ("release", SIGNER, now - timedelta(days=1), now + timedelta(days=1)),
        ("expired", SIGNER, now - timedelta(days=10), now - timedelta(days=2)),
        ("stranger", "spiffe://gateway.local/model-signer/intern", now - timedelta(days=1), now + timedelta(days=1)),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(label))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
            )  # digitalSignature
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (folder / f"{label}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        made[label] = folder / f"{label}.crt"
        made[f"{label}.key"] = _write_key(key, folder / f"{label}.key")
    return made


def cert_sign(folder: Path, ca: dict[str, Path], signer: str) -> None:
    signature.sign(folder, private_key=ca[f"{signer}.key"], certificate=ca[signer], chain=ca["ca"])


def certificate_trust(ca: dict[str, Path]) -> dict:
    return {
        "models.signatures": "required",
        "models.signature_trust.certificate_chain": ca["ca"],
        "models.signature_trust.signer_identities": [SIGNER],
    }


@pytest.mark.parametrize(
    ("signer", "reason"),
    [
        ("expired", "the signing certificate expired at"),
        ("stranger", "signer spiffe://gateway.local/model-signer/intern, cn:stranger is not one of"),
    ],
)
def test_an_expired_or_wrong_identity_signing_certificate_is_refused_at_start_and_on_reload(
    signer, reason, start_gateway, demo_models, tmp_path, signing_ca
):
    root = tmp_path / "cert-signed"
    for version, by in (("1", "release"), ("2", signer)):
        shutil.copytree(demo_models / "mlp" / version, root / "mlp" / version)
        cert_sign(root / "mlp" / version, signing_ca, by)
    with capture_logs() as logs:
        gw = start_gateway(models=root, overrides=certificate_trust(signing_ca))
    (refused,) = refusals(logs, 2)
    assert reason in refused["reason"], refused
    assert gw.gateway.models.info("mlp").versions == (1,)
    assert predict(gw).model_version == "1"

    # On reload: version 3 by the same signer is refused; one by the allowed, valid signer is served.
    shutil.copytree(demo_models / "mlp" / "2", root / "mlp" / "3")
    cert_sign(root / "mlp" / "3", signing_ca, signer)
    with capture_logs() as logs:
        assert gw.gateway.models.reload_now()
    (refused,) = refusals(logs, 3)
    assert reason in refused["reason"] and refused["still_serving"] is False
    assert predict(gw).model_version == "1"
    assert gw.audit_records()[-1]["model_digest"] == auditor_digest(root / "mlp" / "1")

    cert_sign(root / "mlp" / "3", signing_ca, "release")
    assert gw.gateway.models.reload_now()
    assert gw.gateway.models.info("mlp").versions == (1, 3)
    assert predict(gw).model_version == "3"


def test_model_verify_checks_the_signer_identities(demo_models, tmp_path, signing_ca):
    folder = tmp_path / "mlp" / "1"
    shutil.copytree(demo_models / "mlp" / "1", folder)
    cert_sign(folder, signing_ca, "stranger")
    command = [sys.executable, "-m", "gateway", "model", "verify", folder, "--certificate-chain", signing_ca["ca"]]
    refused = subprocess.run([*command, "--signer-identity", SIGNER], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "is not one of" in refused.stdout
    allowed = [*command, "--signer-identity", "spiffe://gateway.local/model-signer/intern"]
    assert subprocess.run(allowed, capture_output=True, text=True, timeout=60).returncode == 0
    unbound = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert unbound.returncode == 2 and "--signer-identity" in unbound.stderr
    misspelt = [*command, "--signer-identity", "release@example.org"]  # email: left out: it could never match
    refused = subprocess.run(misspelt, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "(write email:release@example.org)" in refused.stderr


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    days: tuple[int, int],
    ca: bool,
) -> x509.Certificate:
    """A certificate for ``subject`` valid from ``days[0]`` to ``days[1]`` days from now, issued by ``issuer``
    (None: self-signed): a CA, or a signer named SIGNER."""
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=days[0]))
        .not_valid_after(now + timedelta(days=days[1]))
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # keyCertSign, cRLSign
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SIGNER)]), False)
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)  # digitalSignature
    return builder.add_extension(usage, critical=True).sign(issuer[1] if issuer else key, hashes.SHA256())


@pytest.mark.parametrize("intermediate_expired", [False, True])
def test_an_intermediate_certificate_expired_at_the_load_is_refused(demo_models, tmp_path, intermediate_expired):
    """The library checks the chain as of the signing certificate's start (when this intermediate was valid); the
    gateway checks it at the load too, as it does the signing certificate."""
    ca_key, middle_key, signer_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _issue("model-signing root", ca_key, None, days=(-30, 30), ca=True)
    middle = _issue(
        "model-signing intermediate", middle_key, (ca, ca_key), days=(-10, -1 if intermediate_expired else 10), ca=True
    )
    signer = _issue("release", signer_key, (middle, middle_key), days=(-5, 5), ca=False)
    pem = {name: tmp_path / f"{name}.pem" for name in ("ca", "middle", "signer")}
    for name, cert in (("ca", ca), ("middle", middle), ("signer", signer)):
        pem[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    folder = tmp_path / "mlp" / "1"
    shutil.copytree(demo_models / "mlp" / "1", folder)
    key = _write_key(signer_key, tmp_path / "signer.key")
    signature.sign(folder, private_key=key, certificate=pem["signer"], chain=pem["middle"])
    trust = signature.SignatureTrust(certificate_chain=pem["ca"], signer_identities=(SIGNER,))
    if not intermediate_expired:
        signature.verify(folder, trust)  # the same chain, valid now: served
        return
    with pytest.raises(signature.SignatureError) as refused:
        signature.verify(folder, trust)
    assert (
        refused.value.reason
        == "the certificate chain is not valid now: certificate has expired (CN=model-signing intermediate)"
    )
