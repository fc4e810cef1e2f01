"""scripts/fetch_deb.sh (the pinned Debian packages behind promtool and perf_analyzer's runtime) against a local
HTTP mirror: a pinned package whose sha256 matches is kept, one that does not is refused loudly, and one that is
gone or unreachable says why, so that the tests needing it skip with that reason."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "fetch_deb.sh"
POOL_PATH = "pool/main/t/tool/tool_1.0-1_amd64.deb"
CONTENT = b"!<arch>\nnot really a package, but bytes with a known sha256\n"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A plain HTTP server over a folder holding one pool file (and no dists/: apt finds no index there)."""
    root = tmp_path_factory.mktemp("mirror")
    (root / POOL_PATH).parent.mkdir(parents=True)
    (root / POOL_PATH).write_bytes(CONTENT)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def fetch(mirror: str, out: Path, sha256: str, path: str = POOL_PATH) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_MIRROR": mirror, "PYTHON": sys.executable}
    return subprocess.run(
        [str(SCRIPT), "bookworm", str(out), "tool", "1.0-1", sha256, path],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_a_package_matching_its_pinned_sha256_is_kept(mirror: str, tmp_path: Path) -> None:
    result = fetch(mirror, tmp_path, hashlib.sha256(CONTENT).hexdigest())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tool_1.0-1_amd64.deb").read_bytes() == CONTENT


def test_a_package_not_matching_its_pinned_sha256_is_refused_and_removed(mirror: str, tmp_path: Path) -> None:
    result = fetch(mirror, tmp_path, "0" * 64)
    assert result.returncode == 1
    assert f"tool 1.0-1: sha256 mismatch for {mirror}/{POOL_PATH} (pinned {'0' * 64}): refused" in result.stderr
    assert not list(tmp_path.iterdir())


def test_a_pinned_version_gone_from_the_pool_is_named_and_what_failed_after_it_said(
    mirror: str, tmp_path: Path
) -> None:
    """Gone (404): a WARNING names it; the suite's index cannot be had from this mirror, so it ends unavailable
    (exit 3) with the reason last, which the callers turn into their skip note."""
    result = fetch(mirror, tmp_path, "0" * 64, path="pool/main/t/tool/tool_0.9-1_amd64.deb")
    assert result.returncode == 3
    assert "WARNING: tool 1.0-1 is gone from" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "gone from Debian's pool" in last or "apt-get update of bookworm failed" in last, last


def test_an_unreachable_mirror_is_unavailable_with_its_reason(tmp_path: Path) -> None:
    result = fetch("http://127.0.0.1:9", tmp_path, "0" * 64)  # the discard port: nothing listens there
    assert result.returncode == 3
    assert result.stderr.strip().endswith("could not be downloaded (no network?)")
