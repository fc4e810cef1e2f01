"""The committed stubs in gateway/_pb are what scripts/gen_proto.sh makes from proto/ today."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def stub_files(root: Path) -> list[Path]:
    """The generated sources under ``root`` (bytecode caches left by imports are not stubs)."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix in (".py", ".pyi"))


def test_committed_stubs_are_fresh(tmp_path):
    subprocess.run(
        [str(ROOT / "scripts/gen_proto.sh"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
        cwd=ROOT,
        timeout=60,
    )
    generated = stub_files(tmp_path)
    committed = stub_files(ROOT / "gateway/_pb")
    assert generated == committed
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, ROOT / "gateway/_pb" / p, shallow=False)]
    assert stale == [], f"run scripts/gen_proto.sh: stale stubs {stale}"


def test_stubs_load_with_the_installed_protobuf_runtime():
    from gateway._pb.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    assert gateway_pb2.DESCRIPTOR.package == "gateway.v1"
    assert hasattr(gateway_pb2_grpc, "InferenceServiceStub")
