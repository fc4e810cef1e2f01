"""docs/quickstart.md runs as written: its blocks marked ``quickstart`` run in order in a temporary folder (a copy of
the session's certificate set and the demo models), against the gateway its ``quickstart-serve`` block starts, and
each ``text`` block that follows one holds lines that the run printed (request ids aside)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT

DOC = ROOT / "docs" / "quickstart.md"
_BLOCK = re.compile(r"^```(\w+)(?: (quickstart[\w-]*))?\n(.*?)^```\n", re.DOTALL | re.MULTILINE)
_REQUEST_ID = re.compile(r"request id [0-9a-f]+")
DOC_PORT = "50051"


def blocks() -> list[tuple[str, str | None, str]]:
    """(language, mark, text) of every fenced block of the page, in order."""
    return [(m[1], m[2], m[3]) for m in _BLOCK.finditer(DOC.read_text())]


def _normal(text: str) -> list[str]:
    return [_REQUEST_ID.sub("request id ID", line.rstrip()) for line in text.splitlines() if line.strip()]


def _start_server(command: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """The serve block on a port the system picks (the page's port may be taken), and that port."""
    log = cwd / "serve.log"
    command = command.replace(f"127.0.0.1:{DOC_PORT}", "127.0.0.1:0")
    with log.open("wb") as out:
        server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        for line in log.read_text().splitlines():
            if '"gateway_started"' in line:
                return server, int(json.loads(line)["port"])
        time.sleep(0.1)
    server.kill()
    raise AssertionError(f"the serve block did not start: {log.read_text()[-2000:]}")


def test_the_quickstart_runs_as_written(pki, demo_models, tmp_path):
    shutil.copytree(pki.dir, tmp_path / "certs")
    shutil.copytree(demo_models, tmp_path / "models")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "GRPC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    found = blocks()
    marked = [mark for _, mark, _ in found if mark]
    assert marked.count("quickstart-serve") == 1 and marked.count("quickstart") >= 5, marked
    server: subprocess.Popen[bytes] | None = None
    port = DOC_PORT
    printed = ""
    exports = ""  # the page's blocks run in one shell, one after the other: what they export stays set
    try:
        for index, (language, mark, text) in enumerate(found):
            if mark == "quickstart-serve":
                server, bound = _start_server(text.strip(), tmp_path, env)
                port = str(bound)
                continue
            if language == "text" and index and found[index - 1][1] == "quickstart":
                missing = [line for line in _normal(text) if line not in _normal(printed)]
                assert not missing, (missing, printed)
                continue
            if mark != "quickstart":
                continue
            text = text.replace(f"localhost:{DOC_PORT}", f"localhost:{port}")
            if language == "python":
                (tmp_path / f"block{index}.py").write_text(text)
                command = [sys.executable, f"block{index}.py"]
            else:
                command = ["bash", "-euo", "pipefail", "-c", exports + text]
                joined = text.replace("\\\n", " ")
                exports += "".join(f"{line}\n" for line in joined.splitlines() if line.startswith("export "))
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (text, done.stdout, done.stderr)
            printed = done.stdout + done.stderr
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    assert server is not None
