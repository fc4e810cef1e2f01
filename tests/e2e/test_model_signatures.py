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
from pathlib import Path, PurePosixPath

import grpc
import numpy as np
import pytest
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
