"""Tests for scripts/make_demo_models.py: layout, signatures and behaviour of the demo model repository."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_demo_models.py"
MODEL_PATHS = [
    "digits/1/model.onnx",
    "iris/1/model.onnx",
    "labels/1/model.onnx",
    "mlp/1/model.onnx",
    "mlp/2/model.onnx",
]


def run_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def open_session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def signature(args: list[onnxruntime.NodeArg]) -> list[tuple[str, str, list[int | str | None]]]:
    return [(arg.name, arg.type, arg.shape) for arg in args]


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_demo_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("repo") / "models"
    result = run_script(outdir)
    assert result.returncode == 0, result.stderr
    assert len([line for line in result.stdout.splitlines() if line.startswith("wrote ")]) == len(MODEL_PATHS)
    return outdir


def test_script_writes_one_file_per_model_version(repository: Path) -> None:
    written = sorted(path.relative_to(repository).as_posix() for path in repository.rglob("*") if path.is_file())
    # Exactly the models: no temporary files left behind by the atomic writes.
    assert written == MODEL_PATHS


def test_digits_classifies_held_out_digits(repository: Path, demo: ModuleType) -> None:
    _, x_test, _, y_test = demo.split_digits()
    session = open_session(repository / "digits/1/model.onnx")

    labels, probabilities = session.run(["label", "probabilities"], {"input": x_test})

    assert labels.dtype == np.int64 and labels.shape == (len(x_test),)
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(x_test), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), labels)
    assert (labels == y_test).mean() > 0.9


def test_digits_outputs_are_plain_tensors(repository: Path) -> None:
    session = open_session(repository / "digits/1/model.onnx")

    assert signature(session.get_inputs()) == [("input", "tensor(float)", [None, 64])]
    assert signature(session.get_outputs()) == [
        ("label", "tensor(int64)", [None]),
        ("probabilities", "tensor(float)", [None, 10]),
    ]


@pytest.mark.parametrize("version", [1, 2])
def test_mlp_version_has_dynamic_batch_signature(repository: Path, version: int) -> None:
    session = open_session(repository / f"mlp/{version}/model.onnx")

    assert signature(session.get_inputs()) == [("input", "tensor(float)", ["batch", 784])]
    assert signature(session.get_outputs()) == [("output", "tensor(float)", ["batch", 10])]


def test_mlp_versions_give_different_results(repository: Path) -> None:
    batch = np.random.default_rng(0).random((3, 784), dtype=np.float32)

    (first,) = open_session(repository / "mlp/1/model.onnx").run(None, {"input": batch})
    (second,) = open_session(repository / "mlp/2/model.onnx").run(None, {"input": batch})

    for output in (first, second):
        assert output.dtype == np.float32 and output.shape == (3, 10)
        assert np.isfinite(output).all() and np.abs(output).max() > 0.1
    assert not np.allclose(first, second)


def test_mlp_build_is_deterministic(demo: ModuleType) -> None:
    assert demo.build_mlp(1).SerializeToString() == demo.build_mlp(1).SerializeToString()
    assert demo.build_mlp(1).SerializeToString() != demo.build_mlp(2).SerializeToString()


def test_iris_probabilities_are_a_sequence_of_maps(repository: Path) -> None:
    session = open_session(repository / "iris/1/model.onnx")

    # The upstream example has a fixed [3, 2] input and names its map output "probabilities".
    assert signature(session.get_inputs()) == [("float_input", "tensor(float)", [3, 2])]
    assert signature(session.get_outputs()) == [
        ("label", "tensor(int64)", [3]),
        ("probabilities", "seq(map(int64,tensor(float)))", []),
    ]
    features = np.array([[5.1, 3.5], [6.2, 2.9], [7.7, 3.0]], dtype=np.float32)
    labels, probabilities = session.run(None, {"float_input": features})
    assert labels.shape == (3,)
    assert isinstance(probabilities, list) and len(probabilities) == 3
    assert all(sorted(row) == [0, 1, 2] for row in probabilities)


def test_existing_model_is_not_overwritten_without_force(tmp_path: Path, repository: Path) -> None:
    outdir = tmp_path / "models"
    other_version = outdir / "mlp" / "7" / "model.onnx"
    other_version.parent.mkdir(parents=True)
    other_version.write_bytes(b"not ours")

    refused = run_script(outdir)

    assert refused.returncode == 1
    assert str(outdir / "mlp") in refused.stderr
    assert not (outdir / "digits").exists()
    assert not (outdir / "mlp" / "1").exists()

    forced = run_script(outdir, "--force")

    assert forced.returncode == 0, forced.stderr
    assert other_version.read_bytes() == b"not ours"
    # A second run in a fresh process reproduces every model byte for byte.
    for name in MODEL_PATHS:
        assert (outdir / name).read_bytes() == (repository / name).read_bytes(), name
