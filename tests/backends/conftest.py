"""Real Open Inference Protocol servers as backends: MLServer and KServe's ModelServer, each a subprocess in its own
venv (tests/backends/oip_server.py) on a loopback port it binds itself, and gateways routing to them, started once
per module (MLServer takes seconds to start)."""

from __future__ import annotations

import collections
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway._pb.inference import grpc_service_pb2 as oip
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
from tests.conftest import ALL_ACCESS_POLICY, ROOT, Pki, RunningGateway, wait_until

HERE = Path(__file__).parent
START_TIMEOUT_S = 60.0


def side_python(name: str) -> Path:
    """The interpreter of a side venv (`make setup`); the tests fail, saying so, where it is missing."""
    python = ROOT / f".venv-{name}" / "bin" / "python"
    if not python.exists():
        pytest.fail(f".venv-{name} is missing: run `make setup`", pytrace=False)
    return python


class OipServer:
    """A real backend in a subprocess: ``start`` (again after ``kill``: the same port), ``calls`` (what reached it)."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind = kind
        self.folder = folder
        self.calls_file = folder / "calls.txt"
        self.port: int | None = None
        self.process: subprocess.Popen[str] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> OipServer:
        args = [str(side_python(self.kind)), str(HERE / "oip_server.py"), self.kind, str(self.folder)]
        env = {**os.environ, "OIP_CALLS_FILE": str(self.calls_file), "PYTHONUNBUFFERED": "1"}
        if self.port is not None:  # a restart binds the port it had, so that the gateway's address still holds
            env["OIP_GRPC_PORT"] = str(self.port)
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen(
            args, cwd=self.folder, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True
        )
        self.port = self._reported_port()
        wait_until(self.ready, timeout_s=START_TIMEOUT_S, interval_s=0.1)
        return self

    def _reported_port(self) -> int:
        assert self.process is not None and self.process.stdout is not None
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if readable:
                line = self.process.stdout.readline()
                if line.startswith("GRPC_PORT="):
                    return int(line.split("=", 1)[1])
                if not line and self.process.poll() is not None:
                    break
        self.kill()
        raise AssertionError(f"{self.kind} did not report its port: {(self.folder / 'server.log').read_text()[-3000:]}")

    def ready(self) -> bool:
        with grpc.insecure_channel(self.target) as channel:
            try:
                stub = oip_grpc.GRPCInferenceServiceStub(channel)
                return stub.ServerReady(oip.ServerReadyRequest(), timeout=1).ready
            except grpc.RpcError:
                return False

    def calls(self) -> collections.Counter[str]:
        """RPCs the server received, by method name."""
        text = self.calls_file.read_text() if self.calls_file.exists() else ""
        return collections.Counter(text.split())

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def mlserver_folder(directory: Path, demo_models: Path) -> Path:
    """MLServer's repository: the demo MLP through the ONNX Runtime model class, and the test models of
    tests/backends/onnx_model.py (slow, expand)."""
    shutil.copy(HERE / "onnx_model.py", directory / "onnx_model.py")
    (directory / "settings.json").write_text(
        '{"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "metrics_port": 0, "parallel_workers": 0}'
    )
    models = {
        "mlp": ("onnx_model.OnnxModel", demo_models / "mlp" / "2" / "model.onnx", "2", "input", "FP32", [-1, 784]),
        "slow": ("onnx_model.Sleep", None, "1", "seconds", "FP32", [1]),
        "expand": ("onnx_model.Expand", None, "1", "n", "INT64", [1]),
    }
    import json

    for name, (implementation, source, version, input_name, datatype, shape) in models.items():
        folder = directory / name
        folder.mkdir()
        settings: dict[str, Any] = {
            "name": name,
            "implementation": implementation,
            "parameters": {"version": version},
            "inputs": [{"name": input_name, "datatype": datatype, "shape": shape}],
        }
        if source is not None:
            shutil.copy(source, folder / "model.onnx")
            settings["parameters"]["uri"] = "./model.onnx"
        (folder / "model-settings.json").write_text(json.dumps(settings))
    return directory


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
def start_module_gateway(
    pki: Pki, demo_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningGateway]]:
    """Like conftest's start_gateway, for a module: ``overrides`` as settings keys (``backends`` a mapping)."""
    from gateway.config import certs_dir_overrides, load_settings
    from gateway.server import Gateway

    started: list[RunningGateway] = []

    def start(
        *,
        models: Path | None = None,
        policy: str = BACKEND_POLICY,
        overrides: dict[str, Any],
        pki: Pki = pki,
    ) -> RunningGateway:
        directory = tmp_path_factory.mktemp("gateway")
        (directory / "policies").mkdir()
        (directory / "policies" / "test.yaml").write_text(policy)
        audit_path = directory / "audit" / "audit.log"
        settings: dict[str, Any] = {
            **certs_dir_overrides(pki.server_dir),
            "listen": "127.0.0.1:0",
            "models.repository": models or demo_models,
            "policies.directory": directory / "policies",
            "audit.path": audit_path,
            "shutdown_grace_s": 2.0,
            "shutdown_drain_s": 0.0,
            **overrides,
        }
        gateway = Gateway(load_settings(None, settings))
        running = RunningGateway(gateway, gateway.start(), pki, audit_path, directory / "policies")
        started.append(running)
        return running

    yield start
    for running in started:
        running.gateway.stop(0.5)


def plaintext_backend(server: OipServer, models: dict[str, str], **settings: Any) -> dict[str, Any]:
    """``backends.NAME`` for a loopback backend without TLS (MLServer and KServe have none)."""
    return {"addresses": [server.target], "plaintext": True, "models": models, "health_interval_s": 0.2, **settings}


def empty_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with no model: every model the gateway serves is routed."""
    return tmp_path_factory.mktemp("no-models")
