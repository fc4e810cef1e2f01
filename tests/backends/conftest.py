"""Real Open Inference Protocol servers as backends: MLServer and KServe's ModelServer, each a subprocess in its own
venv (tests/backends/oip_server.py) on a loopback port it binds itself, and gateways routing to them, started once
per module (MLServer takes seconds to start)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backends.servers import OipServer, mlserver_folder
from tests.conftest import ALL_ACCESS_POLICY, ROOT, Pki, RunningGateway


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[OipServer]:
    server = OipServer("mlserver", mlserver_folder(tmp_path_factory.mktemp("mlserver"), demo_models)).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def kserve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OipServer]:
    server = OipServer("kserve", tmp_path_factory.mktemp("kserve")).start()
    yield server
    server.kill()


BACKEND_POLICY = (
    ALL_ACCESS_POLICY
    + """
  - id: edge-mlp
    effect: allow
    principals: {subjects: [edge]}
    models: [mlp]
    actions: [predict, stream, metadata, list]
"""
)


@pytest.fixture(scope="module")
def start_module_gateway(start_gateway_module: Callable[..., RunningGateway]) -> Callable[..., RunningGateway]:
    """conftest's start_gateway_module with the backend tests' policy; ``overrides`` as settings keys (``backends``
    a mapping)."""

    def start(
        *,
        models: Path | None = None,
        policy: str = BACKEND_POLICY,
        overrides: dict[str, Any],
        pki: Pki | None = None,
        tracing: Any = None,
    ) -> RunningGateway:
        return start_gateway_module(models=models, policy=policy, overrides=overrides, use_pki=pki, tracing=tracing)

    return start


def plaintext_backend(server: OipServer, models: dict[str, str], **settings: Any) -> dict[str, Any]:
    """``backends.NAME`` for a loopback backend without TLS (MLServer and KServe have none)."""
    return {"addresses": [server.target], "plaintext": True, "models": models, "health_interval_s": 0.2, **settings}


def empty_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with no model: every model the gateway serves is routed."""
    return tmp_path_factory.mktemp("no-models")


def triton(gw, tmp_path: Path, steps: list[dict], *, client: str | None = "alice", target: str | None = None):
    """Stock tritonclient in its own process (tests/interop/triton_client.py): through the gateway with ``client``'s
    certificate and token, or, with ``target``, straight to a plaintext backend."""
    if target is not None:
        job = {"target": target, "steps": steps}
    else:
        pki = gw.pki
        job = {
            "target": gw.target,
            "ca": str(pki.path("ca.crt")),
            "cert": str(pki.path(f"{client}.crt")),
            "key": str(pki.path(f"{client}.key")),
            "token": gw.token(client, bind=client),
            "steps": steps,
        }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests/interop/triton_client.py"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
