"""Packaging: the build gives no setuptools warning (as ``make setup``'s ``pip install -e`` runs it); the wheel's dependency split (the SDK needs grpcio, protobuf, numpy, cryptography and httpx; the server is an extra) and its
type information, and an SDK-only install, simulated by a Python that cannot import the server extra's modules."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway import cli
from tests.conftest import ROOT, SERVER_ONLY_MODULES, sdk_only_env

SDK = {"grpcio", "protobuf", "numpy", "cryptography", "httpx"}
SERVER = {
    "grpcio-health-checking",
    "grpcio-reflection",
    "pyjwt",
    "structlog",
    "onnxruntime",
    "pyyaml",
    "prometheus-client",
    "aiohttp",
    "orjson",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel pip builds from a copy of the sources (offline, with the setuptools already installed)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT / "gateway", source / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    subprocess.run([*command, "--wheel-dir", tmp / "dist", source], check=True, capture_output=True, timeout=120)
    (path,) = (tmp / "dist").glob("gateway-*.whl")
    return zipfile.ZipFile(path)


def metadata(wheel: zipfile.ZipFile) -> Message:
    (name,) = (n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return Parser().parsestr(wheel.read(name).decode())


def requirements(wheel: zipfile.ZipFile, extra: str | None) -> set[str]:
    """Names of the distributions the wheel requires, unconditionally (None) or with ``extra``."""
    found = set()
    for line in metadata(wheel).get_all("Requires-Dist") or ():
        requirement = Requirement(line)
        marker = requirement.marker
        if (marker is None) if extra is None else (marker is not None and marker.evaluate({"extra": extra})):
            found.add(canonicalize_name(requirement.name))
    return found


def test_wheel_requires_grpcio_protobuf_numpy_cryptography_and_httpx_alone(wheel):
    assert requirements(wheel, None) == SDK


def test_wheel_puts_the_server_dependencies_in_the_server_extra(wheel):
    # The tools (tests, demo models, SBOM) are dependency groups: never an extra a user of the wheel can ask for.
    assert set(metadata(wheel).get_all("Provides-Extra") or ()) == {"server", "otel", "signing"}
    assert requirements(wheel, "server") == SERVER  # model signing is its own extra (the image installs both)
    assert requirements(wheel, "signing") == {"model-signing", "pyopenssl"}


def test_wheel_ships_its_type_information(wheel):
    names = set(wheel.namelist())
    assert {"gateway/py.typed", "gateway/_pb/gateway/v1/gateway_pb2.pyi"} <= names


def test_type_checkers_see_the_sdk_names_themselves(tmp_path):
    """The names of ``import gateway`` load lazily; py.typed is worth shipping only if a checker still sees them."""
    pytest.importorskip("mypy")
    use = tmp_path / "use.py"
    use.write_text("import gateway\n\ngateway.Client(1)\nerror: gateway.GatewayError = gateway.NotFoundError()\n")
    command = [
        sys.executable,
        "-m",
        "mypy",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--follow-imports=silent",
        str(use),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert 'Argument 1 to "Client" has incompatible type "int"; expected "str"' in result.stdout
    assert "use.py:4" not in result.stdout  # the error classes keep their hierarchy


def test_the_modules_an_sdk_only_install_lacks_are_those_of_the_server_extra():
    provided = importlib.metadata.packages_distributions()
    assert {canonicalize_name(dist) for module in SERVER_ONLY_MODULES for dist in provided[module]} == SERVER
    assert set(SERVER_ONLY_MODULES) == cli.SERVER_MODULES  # the modules whose absence the CLI reports


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Python with the server extra's modules unavailable."""
    env = sdk_only_env(tmp_path)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)


@pytest.mark.parametrize("module", SERVER_ONLY_MODULES)
def test_the_simulated_install_lacks_each_server_module(tmp_path, module):
    result = run(tmp_path, "-c", f"import {module}")
    assert result.returncode == 1 and "ModuleNotFoundError" in result.stderr


SDK_SCRIPT = """
import base64, json, time
import gateway

for name in gateway.__all__:
    getattr(gateway, name)
claims = base64.urlsafe_b64encode(json.dumps({"exp": time.time() + 3600}).encode()).rstrip(b"=").decode()
fetched = []
provider = gateway.RefreshingToken(lambda: fetched.append(1) or f"e30.{claims}.sig")
provider.token(), provider.token()
assert len(fetched) == 1, fetched  # exp read without a JWT library: fetched once for an hour-long token
print("ok")
"""


def test_the_sdk_imports_and_reads_token_expiry_without_the_server_dependencies(tmp_path):
    result = run(tmp_path, "-c", SDK_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


@pytest.mark.parametrize("command", [[], ["predict"], ["models"], ["metadata"], ["audit", "verify"]])
def test_client_commands_and_audit_verify_start_without_the_server_dependencies(tmp_path, command):
    result = run(tmp_path, "-m", "gateway", *command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: gateway")


def test_a_client_command_runs_without_the_server_dependencies(tmp_path):
    result = run(tmp_path, "-m", "gateway", "models", "--target", "localhost:1")
    assert result.returncode == 2
    assert result.stderr == "error: missing --ca (GATEWAY_CA), --cert (GATEWAY_CERT), --key (GATEWAY_KEY)\n"


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("serve", ["serve", "--listen", "127.0.0.1:0"]),
        ("token issue", ["token", "issue", "--key", "k.pem", "--sub", "alice"]),
        ("policy check", ["policy", "check", "--policies", ".", "--model", "mlp", "--action", "predict"]),
    ],
)
def test_server_commands_without_the_server_extra_say_how_to_install_it_in_one_line(tmp_path, name, command):
    result = run(tmp_path, "-m", "gateway", *command)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: gateway {name} needs the server extra: pip install 'gateway[server]' (no module ")


def test_the_editable_build_gives_no_setuptools_deprecation_warning(tmp_path):
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("gateway", "meta", "dist"):
        (tmp_path / folder).mkdir()
    (tmp_path / "gateway" / "__init__.py").write_text("")
    build = (
        "from setuptools import build_meta\n"
        "print(build_meta.prepare_metadata_for_build_editable('meta'))\n"
        "print(build_meta.build_editable('dist'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", build], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Warning" not in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
