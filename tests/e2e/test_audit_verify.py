"""``gateway audit verify`` over several pods' trails, run as the installed command (.venv/bin/gateway) on real
files written by the audit writer: a cut tail cannot hide behind a deleted checkpoint or another trail's one."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway.audit import AuditLog, checkpoint_path
from tests.conftest import ROOT
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub

GATEWAY = ROOT / ".venv" / "bin" / "gateway"
KEY = b"pod-audit-key-" + b"k" * 18
PODS = ("gateway-0", "gateway-1", "gateway-2")


def verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``gateway audit verify ARGS`` in a subprocess, with no GATEWAY_* variable set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [str(GATEWAY), "audit", "verify", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def write_trail(path: Path, chain: str, records: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with AuditLog(path, chain_id=chain, hmac_key=KEY, max_bytes=600) as audit:
        for i in range(records):
            audit.write({"event": "call", "request_id": f"{chain}-{i}", "sub": "alice", "code": "OK"})


@pytest.fixture
def trails(tmp_path: Path) -> dict[str, Path]:
    """One trail per pod in its own folder (its volume), as a StatefulSet's pods write them, and the key file."""
    made = {pod: tmp_path / "audit" / pod / "audit.log" for pod in PODS}
    for pod, path in made.items():
        write_trail(path, pod, 8)  # rotated after 3 and 6: the active file holds 7..8
    (tmp_path / "audit-hmac.key").write_bytes(KEY)
    return made


def cut_tail(path: Path, keep: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:keep]))


def report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_several_intact_trails_verify_with_their_checkpoints(trails: dict[str, Path], tmp_path: Path) -> None:
    result = verify(tmp_path / "audit", "--hmac-key", tmp_path / "audit-hmac.key")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "OK: 24 records in 3 chain(s) verified"
    assert all(", checkpoint at seq 8" in line for line in result.stdout.splitlines()[:3])


def test_a_cut_tail_with_its_checkpoint_deleted_fails_among_several_trails(
    trails: dict[str, Path], tmp_path: Path
) -> None:
    victim = trails["gateway-1"]
    cut_tail(victim, 1)  # the active file keeps its first record: the chain alone looks intact
    checkpoint_path(victim).unlink()
    key = tmp_path / "audit-hmac.key"

    result = verify(tmp_path / "audit", "--hmac-key", key, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    chains = {chain["chain"]: chain for chain in report(result)["chains"]}
    assert chains["gateway-0"]["ok"] and chains["gateway-2"]["ok"]
    assert not chains["gateway-1"]["ok"]
    assert "no checkpoint" in chains["gateway-1"]["error"] and "--no-checkpoint" in chains["gateway-1"]["error"]

    # The operator knows this trail has none and says so for it alone: it passes, and the summary says so.
    waived = verify(tmp_path / "audit", "--hmac-key", key, "--no-checkpoint", victim)
    assert waived.returncode == 0, waived.stdout + waived.stderr
    (line,) = [line for line in waived.stdout.splitlines() if line.startswith("chain gateway-1:")]
    assert "no checkpoint (--no-checkpoint): a cut tail cannot be detected" in line
    assert "no checkpoint" not in "".join(x for x in waived.stdout.splitlines() if x.startswith("chain gateway-0"))
    as_json = report(verify(tmp_path / "audit", "--hmac-key", key, "--no-checkpoint", victim.parent, "--json"))
    assert [chain["no_checkpoint"] for chain in as_json["chains"]] == [False, True, False]

    # Waiving one trail does not waive another whose checkpoint is missing too.
    checkpoint_path(trails["gateway-2"]).unlink()
    other = verify(tmp_path / "audit", "--hmac-key", key, "--no-checkpoint", victim)
    assert other.returncode == 1 and "chain gateway-2: FAILED" in other.stdout


def test_another_trails_checkpoint_in_place_of_a_trails_own_is_refused(trails: dict[str, Path], tmp_path: Path) -> None:
    victim, donor = trails["gateway-1"], trails["gateway-0"]
    cut_tail(victim, 1)
    checkpoint_path(victim).write_bytes(checkpoint_path(donor).read_bytes())  # a genuine checkpoint, MAC and all

    result = verify(tmp_path / "audit", "--hmac-key", tmp_path / "audit-hmac.key", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    chains = {chain["chain"]: chain for chain in report(result)["chains"]}
    assert chains["gateway-0"]["ok"] and chains["gateway-2"]["ok"]
    error = chains["gateway-1"]["error"]
    assert "checkpoint of chain 'gateway-0'" in error and "trail of chain 'gateway-1'" in error
    assert str(checkpoint_path(victim)) in error

    # Given as the only trail too: the checkpoint beside it names another chain.
    alone = verify(victim, "--hmac-key", tmp_path / "audit-hmac.key")
    assert alone.returncode == 1 and "checkpoint of chain 'gateway-0'" in alone.stdout


def test_no_checkpoint_naming_a_path_that_does_not_exist_is_a_usage_error(
    trails: dict[str, Path], tmp_path: Path
) -> None:
    result = verify(tmp_path / "audit", "--hmac-key", tmp_path / "audit-hmac.key", "--no-checkpoint", tmp_path / "x")
    assert result.returncode == 2 and "x: no such file or directory" in result.stderr


def test_json_summaries_list_the_model_digests_seen_per_model_and_version(tmp_path: Path) -> None:
    """An auditor's index from the trail to the exact bytes: every (model, version, digest) of a verified record,
    per chain and in all; records that ran no model (refusals, listings) add nothing."""
    old, new, iris = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64
    served = [("mlp", "2", old), ("mlp", "2", new), ("mlp", "1", old), ("mlp", "2", new)]
    for pod, calls in (("gateway-0", served), ("gateway-1", [("iris", "1", iris)])):
        path = tmp_path / "audit" / pod / "audit.log"
        path.parent.mkdir(parents=True)
        with AuditLog(path, chain_id=pod, hmac_key=KEY) as audit:
            for model, version, digest in calls:
                ran = {"model": model, "version": version, "model_digest": digest, "code": "OK"}
                audit.write({"event": "call", "action": "predict", **ran})
            audit.write({"event": "call", "model": "mlp", "version": None, "model_digest": None, "code": "NOT_FOUND"})
    (tmp_path / "audit-hmac.key").write_bytes(KEY)

    result = verify(tmp_path / "audit", "--hmac-key", tmp_path / "audit-hmac.key", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data = report(result)
    assert data["model_digests"] == {"iris": {"1": [iris]}, "mlp": {"1": [old], "2": [old, new]}}
    chains = {chain["chain"]: chain["model_digests"] for chain in data["chains"]}
    assert chains == {"gateway-0": {"mlp": {"1": [old], "2": [old, new]}}, "gateway-1": {"iris": {"1": [iris]}}}


ONLY_VERSION_2 = """
rules:
  - id: alice-mlp-2
    effect: allow
    principals: {subjects: [alice]}
    models: [mlp]
    versions: [2]
    actions: [predict]
  - id: alice-read
    effect: allow
    principals: {subjects: [alice]}
    models: [mlp]
    actions: [metadata]
  - id: alice-iris
    effect: allow
    principals: {subjects: [alice]}
    models: [iris]
    actions: [predict]
"""


def test_model_digests_name_only_calls_that_ran_a_model_on_a_real_gateways_trail(start_gateway, tmp_path) -> None:
    """A gateway's own trail: a denied call, a metadata call and a call refused for its inputs all record the
    version they resolved and its digest, but only the call that ran is in ``model_digests``."""
    gw = start_gateway(policy=ONLY_VERSION_2)
    x = {"input": np.zeros((1, 784), np.float32)}
    with gw.channel("alice") as channel:
        client, md = stub(channel), auth(gw.token())
        assert client.Predict(predict_request("mlp", x, "2"), metadata=md, timeout=TIMEOUT).model_version == "2"
        denied = rpc_error(lambda: client.Predict(predict_request("mlp", x, "1"), metadata=md, timeout=TIMEOUT))
        bad = rpc_error(lambda: client.Predict(predict_request("iris", x), metadata=md, timeout=TIMEOUT))
        client.GetModelMetadata(
            pb.GetModelMetadataRequest(model_name="mlp", model_version="1"), metadata=md, timeout=TIMEOUT
        )
    assert (denied.code(), bad.code()) == (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT)
    ran, *refused = [r for r in gw.audit_records() if r["model"]]
    assert [(r["model"], r["version"], r["code"], r["action"]) for r in refused] == [
        ("mlp", "1", "PERMISSION_DENIED", "predict"),
        ("iris", "1", "INVALID_ARGUMENT", "predict"),
        ("mlp", "1", "OK", "metadata"),
    ]
    assert all(r["model_digest"] not in (None, ran["model_digest"]) for r in refused)  # as real refusals have
    gw.gateway.stop(0.5)  # the trail closed, its checkpoint written

    result = verify(gw.audit_path, "--hmac-key", gw.pki.server_dir / "audit-hmac.key", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert report(result)["model_digests"] == {"mlp": {"2": [ran["model_digest"]]}}
