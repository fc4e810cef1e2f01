"""The model repository with broken parts: bad versions are left out and reported, stray entries are named."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.errors import NotFoundError
from gateway.models import signature
from gateway.models.placement import Placement
from gateway.models.repository import ModelRepository, scan
from gateway.models.runtime import ModelLoadError, RuntimeOptions

Make = Callable[..., ModelRepository]


@pytest.fixture
def make_repository() -> Iterator[Make]:
    placement = Placement(threads=1, inline_max_s=0.001)

    def make(root: Path, *, strict: bool = False, **more: Any) -> ModelRepository:
        return ModelRepository(
            root, options=RuntimeOptions(), placement=placement, poll_interval_s=0, strict=strict, **more
        )

    yield make
    placement.close()


def corrupt(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(b"not an onnx model")
    return folder / "model.onnx"


def events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


def test_scan_names_every_entry_it_does_not_serve_and_why(tmp_path):
    (tmp_path / "mlp" / "1").mkdir(parents=True)
    (tmp_path / "mlp" / "1" / "model.onnx").write_bytes(b"")
    (tmp_path / "mlp" / "v4").mkdir()
    (tmp_path / "mlp" / "02").mkdir()
    (tmp_path / "mlp" / "3").mkdir()
    (tmp_path / "mlp" / "model.onnx").write_bytes(b"")
    (tmp_path / "-bad-name").mkdir()
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / ".staging" / "1").mkdir(parents=True)  # hidden: where versions are staged before publishing
    (tmp_path / "mlp" / ".5").mkdir()

    listing = scan(tmp_path)

    assert list(listing.versions) == [("mlp", 1)]
    assert {Path(path).relative_to(tmp_path).as_posix(): reason for path, reason in listing.ignored.items()} == {
        "mlp/v4": "not a version (a positive integer without leading zeros)",
        "mlp/02": "not a version (a positive integer without leading zeros)",
        "mlp/3": "model.onnx: No such file or directory",
        "mlp/model.onnx": "a file where only version folders belong (<version>/model.onnx)",
        "-bad-name": "not a model name (a letter or digit, then letters, digits, '_', '.', '-')",
        "README.md": "a file where only model folders belong",
    }


def test_a_corrupt_version_is_left_out_and_reported_while_the_rest_is_served(make_repository, model_repo):
    broken = corrupt(model_repo / "broken" / "1")
    mlp_3 = corrupt(model_repo / "mlp" / "3")
    repository = make_repository(model_repo)
    with capture_logs() as logs:
        repository.load_all()

    assert [(m.name, m.versions, m.default_version) for m in repository.models()] == [
        ("digits", (1,), 1),
        ("iris", (1,), 1),
        ("labels", (1,), 1),
        ("mlp", (1, 2), 2),
    ]
    assert repository.info("broken") is None  # a model whose every version is bad is not listed
    with pytest.raises(NotFoundError):
        repository.resolve("broken", None)
    with pytest.raises(NotFoundError):
        repository.resolve("mlp", 3)
    assert repository.resolve("mlp", None).version == 2
    failures = repository.failures()
    assert {ident: failure.path for ident, failure in failures.items()} == {("broken", 1): broken, ("mlp", 3): mlp_3}
    assert all(failure.reason.startswith("onnxruntime cannot load it: ") for failure in failures.values())
    failed = events(logs, "model_load_failed")
    assert [(e["model"], e["version"], e["path"], e["still_serving"]) for e in failed] == [
        ("broken", 1, str(broken), False),
        ("mlp", 3, str(mlp_3), False),
    ]
    assert all(e["log_level"] == "error" and "\n" not in e["reason"] for e in failed)


def test_strict_refuses_to_start_with_one_line_naming_the_file(make_repository, model_repo):
    broken = corrupt(model_repo / "mlp" / "3")
    with pytest.raises(ModelLoadError) as refused:
        make_repository(model_repo, strict=True).load_all()
    message = str(refused.value)
    assert message.startswith(f"{broken}: onnxruntime cannot load it: ") and "\n" not in message


def test_a_version_rewritten_corrupt_keeps_its_last_good_load_serving(make_repository, model_repo):
    repository = make_repository(model_repo)
    repository.load_all()
    serving = repository.resolve("mlp", 2)
    good = (model_repo / "mlp" / "2" / "model.onnx").read_bytes()
    corrupt(model_repo / "mlp" / "2")
    with capture_logs() as logs:
        repository.rescan()
        repository.rescan()  # unchanged: not tried, nor logged, again

    assert repository.resolve("mlp", None) is serving
    assert list(repository.failures()) == [("mlp", 2)]
    assert [(e["model"], e["version"], e["still_serving"]) for e in events(logs, "model_load_failed")] == [
        ("mlp", 2, True)
    ]

    (model_repo / "mlp" / "2" / "model.onnx").write_bytes(good)
    with capture_logs() as logs:
        repository.rescan()
    assert repository.resolve("mlp", 2) is not serving
    assert repository.failures() == {}
    assert [e["version"] for e in events(logs, "model_version_reloaded")] == [2]


def test_a_failure_is_forgotten_once_its_version_is_removed(make_repository, model_repo):
    corrupt(model_repo / "broken" / "1")
    repository = make_repository(model_repo)
    repository.load_all()
    assert list(repository.failures()) == [("broken", 1)]
    shutil.rmtree(model_repo / "broken")
    repository.rescan()
    assert repository.failures() == {}


def test_ignored_entries_are_logged_once_each_and_again_when_they_come_back(make_repository, model_repo):
    stray = model_repo / "mlp" / "v4"
    stray.mkdir()
    repository = make_repository(model_repo)
    with capture_logs() as logs:
        repository.load_all()
        repository.rescan()
        (model_repo / "mlp" / "model.onnx").write_bytes(b"")
        repository.rescan()
        stray.rmdir()
        repository.rescan()
        stray.mkdir()
        repository.rescan()

    ignored = events(logs, "model_entry_ignored")
    assert [Path(e["path"]).relative_to(model_repo).as_posix() for e in ignored] == [
        "mlp/v4",
        "mlp/model.onnx",
        "mlp/v4",
    ]
    assert all(e["log_level"] == "warning" and e["reason"] for e in ignored)


@pytest.mark.parametrize("target", ["/dev/zero", "/"], ids=["device", "folder"])
def test_a_version_linking_to_a_device_or_a_folder_is_refused_before_it_is_read(make_repository, model_repo, target):
    """Each load copies the version privately (models/signature.staged): a link planted in the repository must
    not make that copy read /dev/zero or the whole filesystem."""
    version = model_repo / "mlp" / "3"
    shutil.copytree(model_repo / "mlp" / "2", version)
    (version / "planted").symlink_to(target)
    repository = make_repository(model_repo)
    repository.load_all()
    with pytest.raises(NotFoundError):
        repository.resolve("mlp", 3)
    assert "a symbolic link to something not a regular file" in repository.failures()[("mlp", 3)].reason
    assert repository.resolve("mlp", None).version == 2


def test_a_link_to_a_regular_file_is_loaded_as_that_file(make_repository, model_repo):
    version = model_repo / "mlp" / "3"
    version.mkdir()
    (version / "model.onnx").symlink_to(model_repo / "mlp" / "2" / "model.onnx")
    repository = make_repository(model_repo)
    repository.load_all()
    assert repository.resolve("mlp", 3).version == 3


def test_a_version_folder_over_the_byte_budget_is_refused_naming_the_setting(make_repository, model_repo):
    """Each load copies the folder into TMPDIR: models.max_version_bytes bounds that copy."""
    size = (model_repo / "mlp" / "1" / "model.onnx").stat().st_size
    (model_repo / "mlp" / "2" / "weights.bin").write_bytes(b"\0" * 4096)
    repository = make_repository(model_repo, max_version_bytes=size + 1024)
    with capture_logs() as logs:
        repository.load_all()
    (failed,) = [e for e in events(logs, "model_load_failed") if e["model"] == "mlp"]
    assert failed["version"] == 2 and "over models.max_version_bytes" in failed["reason"], failed
    assert repository.resolve("mlp", None).version == 1


def test_a_file_growing_while_it_is_copied_stops_the_copy_at_the_budget(tmp_path):
    source = tmp_path / "grown"
    source.write_bytes(b"x" * 100)  # as if it grew past the budget after the folder was measured
    budget = signature._Budget(64)
    with pytest.raises(signature.SignatureError, match=r"over models\.max_version_bytes"):
        budget.copy(str(source), str(tmp_path / "copy"))
    assert (tmp_path / "copy").stat().st_size <= 64
