"""The lock is what runs: the venv `make setup` builds holds exactly uv.lock's versions, and the hash-checked
requirement files the image installs from are the lock's current export (a stale one would ship other versions)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

UV = ROOT / ".tools" / "uv" / "bin" / "uv"
EXPORTS = {  # committed file -> the `uv export` selection that makes it (Makefile: lock)
    "requirements/server.txt": ["--no-default-groups", "--extra", "server", "--extra", "signing"],
    "requirements/server-otel.txt": [
        "--no-default-groups",
        "--extra",
        "server",
        "--extra",
        "signing",
        "--extra",
        "otel",
    ],
    "requirements/sbom.txt": ["--only-group", "sbom"],
}


def locked_versions() -> dict[str, set[str]]:
    """Every version uv.lock holds per distribution (one per Python where markers split the resolution)."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions: dict[str, set[str]] = {}
    for package in lock["package"]:
        versions.setdefault(canonicalize_name(package["name"]), set()).add(package["version"])
    return versions


def installed_versions() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


@pytest.fixture
def project_venv() -> None:
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"not the locked environment (.venv) but {sys.prefix}: make test-latest resolves without the lock")


@pytest.mark.usefixtures("project_venv")
def test_every_installed_distribution_is_the_locked_version():
    locked, installed = locked_versions(), installed_versions()
    installed.pop("gateway")  # the project itself, editable
    not_locked = {name: version for name, version in installed.items() if version not in locked.get(name, ())}
    assert not_locked == {}, "installed outside uv.lock (run make setup; make lock to change it)"


@pytest.mark.usefixtures("project_venv")
def test_every_declared_dependency_is_installed():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = list(pyproject["project"]["dependencies"])
    for extra in ("server", "signing", "otel"):
        declared += pyproject["project"]["optional-dependencies"][extra]
    for group in ("demo", "dev", "sbom"):
        declared += [item for item in pyproject["dependency-groups"][group] if isinstance(item, str)]
    installed = installed_versions()
    missing = [spec for spec in declared if canonicalize_name(Requirement(spec).name) not in installed]
    assert missing == []


@pytest.mark.skipif(not UV.exists(), reason="uv is installed by make setup")
@pytest.mark.parametrize("path", sorted(EXPORTS))
def test_the_image_requirements_are_the_current_export_of_the_lock(path):
    command = [UV, "export", "--quiet", "--locked", "--format", "requirements.txt", "--no-emit-project", *EXPORTS[path]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr  # --locked: uv.lock must also match pyproject.toml
    exported = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    committed = [line for line in (ROOT / path).read_text().splitlines() if not line.startswith("#")]
    assert committed == exported, f"{path} is stale: run make lock LOCK_FLAGS="
    assert all("--hash=sha256:" in block for block in (ROOT / path).read_text().split("==")[1:])


@pytest.mark.parametrize("name", ["mlserver", "kserve"])
def test_each_side_venv_requirement_is_pinned_with_hashes_by_its_compiled_file(name):
    """requirements/NAME.txt (make lock) pins what NAME.in asks for, every pin hash-checked: a hand edit of the .in
    that was not recompiled fails here rather than installing something else."""
    compiled = (ROOT / "requirements" / f"{name}.txt").read_text()
    pins: dict[str, set[str]] = {}
    for block in compiled.replace("\\\n", " ").splitlines():
        if block and not block.startswith((" ", "#")):
            requirement = Requirement(block.split(" --hash")[0].split(";")[0].strip())
            assert "--hash=sha256:" in block, block
            pins.setdefault(canonicalize_name(requirement.name), set()).add(str(requirement.specifier)[2:])
    for line in (ROOT / "requirements" / f"{name}.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            wanted = Requirement(line)
            versions = pins.get(canonicalize_name(wanted.name), set())
            assert versions and all(wanted.specifier.contains(v) for v in versions), (line, versions)
