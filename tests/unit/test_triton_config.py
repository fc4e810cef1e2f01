"""A Triton model folder's config.pbtxt: read against Triton's model_config.proto, default_model_filename honoured,
every other field named in the load log with where the gateway keeps it; a broken file changes nothing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.models.placement import Placement
from gateway.models.repository import ModelRepository
from gateway.models.runtime import RuntimeOptions

TRITON_CONFIG = """
name: "mlp"
platform: "onnxruntime_onnx"
max_batch_size: 8
default_model_filename: "net.onnx"
input [ { name: "input", data_type: TYPE_FP32, dims: [ 784 ] } ]
output [ { name: "output", data_type: TYPE_FP32, dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
instance_group [ { kind: KIND_GPU, count: 2 } ]
version_policy { latest { num_versions: 1 } }
"""


@pytest.fixture
def placement() -> Iterator[Placement]:
    shared = Placement(threads=1, inline_max_s=0.001)
    yield shared
    shared.close()


def triton_layout(demo_models: Path, root: Path) -> Path:
    """mlp as Triton lays it out: config.pbtxt beside the versions, each version's file named net.onnx."""
    for version in ("1", "2"):
        folder = root / "mlp" / version
        folder.mkdir(parents=True)
        shutil.copy(demo_models / "mlp" / version / "model.onnx", folder / "net.onnx")
    (root / "mlp" / "config.pbtxt").write_text(TRITON_CONFIG)
    return root


def load(root: Path, placement: Placement) -> tuple[ModelRepository, list[dict]]:
    repository = ModelRepository(root, options=RuntimeOptions(), placement=placement, poll_interval_s=0)
    with capture_logs() as logs:
        repository.load_all()
    return repository, logs


def test_default_model_filename_is_honoured_and_every_other_field_is_explained(demo_models, tmp_path, placement):
    repository, logs = load(triton_layout(demo_models, tmp_path / "models"), placement)
    assert repository.resolve("mlp", None).path == tmp_path / "models" / "mlp" / "2" / "net.onnx"
    (read,) = [e for e in logs if e["event"] == "model_config_pbtxt_read"]
    assert read["honoured"] == ["name", "platform", "default_model_filename"]
    assert read["model_file"] == "net.onnx"
    ignored = read["ignored"]
    assert set(ignored) == {"max_batch_size", "input", "output", "dynamic_batching", "instance_group", "version_policy"}
    assert ignored["dynamic_batching"].startswith("models.batching.mlp")
    assert "models.versions.mlp" in ignored["version_policy"]
    assert "models.providers_by_model.mlp" in ignored["instance_group"]
    assert not [e for e in logs if e["event"] == "model_entry_ignored"]  # config.pbtxt is no stray file


def test_a_new_default_model_filename_reloads_the_versions_from_the_named_file(demo_models, tmp_path, placement):
    root = triton_layout(demo_models, tmp_path / "models")
    repository, _ = load(root, placement)
    for version in ("1", "2"):
        shutil.copy(root / "mlp" / version / "net.onnx", root / "mlp" / version / "other.onnx")
    config = root / "mlp" / "config.pbtxt"
    config.write_text(TRITON_CONFIG.replace("net.onnx", "other.onnx"))
    with capture_logs() as logs:
        repository.rescan()
    assert repository.resolve("mlp", None).path.name == "other.onnx"
    assert [e["model_file"] for e in logs if e["event"] == "model_config_pbtxt_read"] == ["other.onnx"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('name: "mlp"\nmax_batch_sise: 8\n', '2:1 : Message type "triton.config.ModelConfig" has no field named'),
        ('default_model_filename: "../../etc/model.onnx"\n', "is not a file name in the version folder"),
    ],
)
def test_a_config_the_gateway_cannot_use_is_logged_and_the_versions_load_model_onnx(
    demo_models, tmp_path, placement, text, reason
):
    root = tmp_path / "models"
    shutil.copytree(demo_models / "mlp", root / "mlp")
    (root / "mlp" / "config.pbtxt").write_text(text)
    repository, logs = load(root, placement)
    (invalid,) = [e for e in logs if e["event"] == "model_config_pbtxt_invalid"]
    assert reason in invalid["reason"], invalid
    assert repository.resolve("mlp", None).path.name == "model.onnx"


def test_a_platform_other_than_onnx_runtime_is_said_at_load(demo_models, tmp_path, placement):
    root = tmp_path / "models"
    shutil.copytree(demo_models / "mlp", root / "mlp")
    (root / "mlp" / "config.pbtxt").write_text('name: "resnet"\nplatform: "tensorrt_plan"\n')
    _, logs = load(root, placement)
    details = [e["detail"] for e in logs if e["event"] == "model_config_pbtxt_mismatch"]
    assert any("the model is served as 'mlp'" in detail for detail in details)
    assert any("tensorrt_plan" in detail and "ONNX models only" in detail for detail in details)
