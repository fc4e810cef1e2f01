"""Real Open Inference Protocol servers in subprocesses, each in its own venv (`make setup`: .venv-mlserver,
.venv-kserve), on a loopback port it binds itself and reports (oip_server.py): for tests/backends and the bench."""

from __future__ import annotations

import collections
import json
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from gateway._pb.inference import grpc_service_pb2 as oip
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
START_TIMEOUT_S = 60.0


def side_python(name: str) -> Path:
    """The interpreter of a side venv; an error saying how to make it where it is missing."""
    python = ROOT / f".venv-{name}" / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f".venv-{name} is missing: run `make setup`")
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
        end = time.monotonic() + START_TIMEOUT_S
        while not self.ready():
            if time.monotonic() > end or self.process.poll() is not None:
                self.kill()
                raise RuntimeError(f"{self.kind} did not become ready: see {self.folder / 'server.log'}")
            time.sleep(0.1)
        return self

    def _reported_port(self) -> int:
        assert self.process is not None and self.process.stdout is not None
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            readable, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if readable:
                line = self.process.stdout.readline()
                if line.startswith("GRPC_PORT="):
                    threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would stall the server
                    return int(line.split("=", 1)[1])
                if not line and self.process.poll() is not None:
                    break
        self.kill()
        raise RuntimeError(f"{self.kind} did not report its port: {(self.folder / 'server.log').read_text()[-3000:]}")

    def _drain(self) -> None:
        process = self.process
        if process is not None and process.stdout is not None:
            with (self.folder / "server.log").open("a") as log:
                for line in process.stdout:
                    log.write(line)

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
    """MLServer's repository: the demo MLP and text model through the ONNX Runtime model class, and the test models of
    tests/backends/onnx_model.py (slow, expand, liar)."""
    shutil.copy(HERE / "onnx_model.py", directory / "onnx_model.py")
    (directory / "settings.json").write_text(
        '{"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "metrics_port": 0, "parallel_workers": 0}'
    )
    models = {
        "mlp": ("onnx_model.OnnxModel", demo_models / "mlp" / "2" / "model.onnx", "2", "input", "FP32", [-1, 784]),
        "labels": ("onnx_model.OnnxModel", demo_models / "labels" / "1" / "model.onnx", "1", "text", "BYTES", [-1]),
        "slow": ("onnx_model.Sleep", None, "1", "seconds", "FP32", [1]),
        "expand": ("onnx_model.Expand", None, "1", "n", "INT64", [1]),
        "liar": ("onnx_model.OtherVersion", None, "1", "x", "FP32", [1]),
    }
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
