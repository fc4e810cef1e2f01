"""Shared fixtures: a session PKI made by scripts/gen_certs.sh, demo models made by
scripts/make_demo_models.py, tokens made by the project's issuer, and gateways started in-process on
127.0.0.1:0 with real mutual TLS."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def run_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run one of the project's scripts with this interpreter available to it."""
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True, env=env, timeout=120)


SERVER_FILES = frozenset(
    {"server.crt", "server.key", "ca.crt", "crl.pem", "jwks.json", "audit-hmac.key", "model-signing.pub"}
)
SIGNING_FILES = frozenset({"ca.key", "jwt-signing.key", "jwt-signing.pub", "model-signing.key"})


@dataclass(frozen=True)
class Pki:
    """A folder written by gen_certs.sh: server/, clients/NAME/ and signing/."""

    dir: Path

    @property
    def server_dir(self) -> Path:
        """What ``gateway serve --certs`` takes."""
        return self.dir / "server"

    def path(self, name: str) -> Path:
        """Where the set keeps ``name``: the server's copy of ca.crt and jwks.json, a client's files in its folder."""
        if name in SERVER_FILES:
            return self.server_dir / name
        if name in SIGNING_FILES:
            return self.dir / "signing" / name
        return self.dir / "clients" / name.split(".")[0] / name

    def read(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def channel_credentials(self, client: str | None) -> grpc.ChannelCredentials:
        if client is None:
            return grpc.ssl_channel_credentials(self.read("ca.crt"))
        return grpc.ssl_channel_credentials(self.read("ca.crt"), self.read(f"{client}.key"), self.read(f"{client}.crt"))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    run_script(ROOT / "scripts/gen_certs.sh", directory, "alice", "bob", "carol")
    return Pki(directory)


@pytest.fixture
def pki_copy(pki: Pki, tmp_path: Path) -> Pki:
    """A private copy of the session PKI, for tests that rotate or revoke."""
    target = tmp_path / "pki-copy"
    shutil.copytree(pki.dir, target)
    return Pki(target)


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second, unrelated CA: its clients must be refused at the handshake."""
    directory = tmp_path_factory.mktemp("other-pki")
    run_script(ROOT / "scripts/gen_certs.sh", directory, "alice")
    return Pki(directory)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("models") / "models"
    run_script(sys.executable, ROOT / "scripts/make_demo_models.py", directory)
    return directory


@pytest.fixture
def model_repo(demo_models: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the demo models (for reload tests)."""
    target = tmp_path / "models"
    shutil.copytree(demo_models, target)
    return target


ALL_ACCESS_POLICY = """
rules:
  - id: alice-all
    effect: allow
    principals: {subjects: [alice]}
    models: ["*"]
    actions: "*"
  - id: bob-metadata-digits
    effect: allow
    principals: {subjects: [bob]}
    models: [digits]
    actions: [metadata, list]
  - id: deny-suspended
    effect: deny
    principals: {groups: [suspended]}
    models: ["*"]
    actions: "*"
"""


@dataclass
class RunningGateway:
    """A gateway started in-process for one test."""

    gateway: Any
    port: int
    pki: Pki
    audit_path: Path
    policy_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, client: str | None = "alice", pki: Pki | None = None) -> grpc.Channel:
        return grpc.secure_channel(self.target, (pki or self.pki).channel_credentials(client))

    def token(self, sub: str = "alice", *, bind: str | None = "alice", **kwargs: Any) -> str:
        from gateway.auth.issuer import issue_token
        from gateway.auth.keys import kid_from_jwks

        key = self.pki.read("jwt-signing.key")
        bind_pem = self.pki.read(f"{bind}.crt") if bind else None
        kwargs.setdefault("iss", "https://gateway.local")
        kwargs.setdefault("aud", "gateway")
        return issue_token(
            private_key_pem=key,
            sub=sub,
            kid=kwargs.pop("kid", None) or kid_from_jwks(self.pki.path("jwks.json"), key),
            bind_cert_pem=bind_pem,
            **kwargs,
        )

    def audit_records(self) -> list[dict[str, Any]]:
        """Every record written so far (a call's record is committed before its response leaves). A last line
        still being written (another call's, read mid-write) is not a record yet: it is left out."""
        import json

        if not self.audit_path.exists():
            return []
        complete = self.audit_path.read_bytes().split(b"\n")[:-1]
        return [json.loads(line) for line in complete if line.strip()]


# Prometheus' promtool, as `make setup` installs it (scripts/get_promtool.sh).
PROMTOOL = ROOT / ".tools" / "prometheus" / "promtool"
PROMETHEUS_RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"


@pytest.fixture(scope="session")
def promtool() -> Path:
    """promtool's path, or a skip that says how to get it."""
    if not PROMTOOL.is_file():
        note = PROMTOOL.parent / "unavailable"
        why = f" ({note.read_text().strip()})" if note.is_file() else ""
        pytest.skip(f"promtool is not installed at {PROMTOOL}{why}: `make promtool` (scripts/get_promtool.sh)")
    return PROMTOOL


@contextlib.contextmanager
def _gateways(pki: Pki, demo_models: Path, tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    """Start gateways in-process (each with its own policy folder and audit trail under ``tmp_path``), stop them
    all at the end."""
    from gateway.config import certs_dir_overrides, load_settings
    from gateway.server import Gateway

    started: list[RunningGateway] = []

    def start(
        *,
        models: Path | None = None,
        policy: str = ALL_ACCESS_POLICY,
        overrides: dict[str, Any] | None = None,
        use_pki: Pki | None = None,
        tracing: Any = None,
    ) -> RunningGateway:
        the_pki = use_pki or pki
        policy_dir = tmp_path / f"policies-{len(started)}"
        policy_dir.mkdir()
        (policy_dir / "test.yaml").write_text(policy)
        audit_path = tmp_path / f"audit-{len(started)}" / "audit.log"
        settings_overrides: dict[str, Any] = {
            **certs_dir_overrides(the_pki.server_dir),
            "listen": "127.0.0.1:0",
            "models.repository": models or demo_models,
            "policies.directory": policy_dir,
            "audit.path": audit_path,
            "shutdown_grace_s": 2.0,
            "shutdown_drain_s": 0.0,
        }
        settings_overrides.update(overrides or {})
        gateway = Gateway(load_settings(None, settings_overrides), tracing=tracing)
        port = gateway.start()
        running = RunningGateway(gateway, port, the_pki, audit_path, policy_dir)
        started.append(running)
        return running

    try:
        yield start
    finally:
        for running in started:
            running.gateway.stop(0.5)


@pytest.fixture
def start_gateway(pki: Pki, demo_models: Path, tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    with _gateways(pki, demo_models, tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def start_gateway_module(
    pki: Pki, demo_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningGateway]]:
    """As ``start_gateway``, for gateways shared by the tests of one module (stopped after its last test)."""
    with _gateways(pki, demo_models, tmp_path_factory.mktemp("gateways")) as start:
        yield start


# The top-level modules of the server extra: an SDK-only install (`pip install gateway`) has none of them.
SERVER_ONLY_MODULES = (
    "grpc_health",
    "grpc_reflection",
    "jwt",
    "onnxruntime",
    "structlog",
    "yaml",
    "prometheus_client",
    "aiohttp",
    "orjson",
)

_BLOCKER = """
import importlib.abc
import sys


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {modules!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} ({why})", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


def without_modules_env(directory: Path, modules: tuple[str, ...], why: str) -> dict[str, str]:
    """The environment of a Python that cannot import ``modules`` (top-level names), as if not installed: a
    sitecustomize in ``directory``, first on PYTHONPATH, puts a finder that refuses them first on the meta path."""
    (directory / "sitecustomize.py").write_text(_BLOCKER.format(modules=modules, why=why))
    return {**os.environ, "PYTHONPATH": os.pathsep.join((str(directory), str(ROOT)))}


def sdk_only_env(directory: Path) -> dict[str, str]:
    """The environment of a Python that cannot import the server extra's modules, as after ``pip install gateway``."""
    return without_modules_env(directory, SERVER_ONLY_MODULES, "an SDK-only install")


def wait_until(predicate: Callable[[], bool], *, timeout_s: float = 10.0, interval_s: float = 0.05) -> None:
    """Poll until ``predicate()`` is true; fail the test after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(interval_s)


@pytest.fixture
def start_oidc_provider(pki: Pki, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start node-oidc-provider on loopback (tests/oidc_provider.py): a factory taking ``ttl_s``, the lifetime of
    its access tokens. Skips where node is absent; fails, saying why, where the provider is not installed."""
    from tests.oidc_provider import OidcProvider, skip_without_node

    skip_without_node()
    started: list[OidcProvider] = []

    def start(*, ttl_s: int = 300) -> OidcProvider:
        provider = OidcProvider(pki, tmp_path / f"oidc-{len(started)}", ttl_s=ttl_s)
        started.append(provider)
        return provider.start()

    yield start
    for provider in started:
        provider.stop()


@pytest.fixture
def oidc_provider(start_oidc_provider: Callable[..., Any]) -> Any:
    """A running node-oidc-provider: issuer, discovery_url, token_url, jwks_url, resource, ca, client_secret."""
    return start_oidc_provider()
