"""Several gateway processes on one port (``workers: N``), for machines with more cores than one Python process
can use: each worker is a full gateway with its own audit chain, and the kernel spreads connections between them
(``SO_REUSEPORT``). This module is the supervisor: it starts the workers, forwards SIGTERM/SIGINT and SIGHUP, and stops
the rest when one dies, so that a process manager sees the failure and restarts the whole set.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import structlog

from gateway.server import catch_signals

log = structlog.get_logger(__name__)

_POLL_S = 0.2


def run_workers(serve_args: Sequence[str], count: int, *, grace_s: float) -> int:
    """Run ``count`` workers of ``gateway serve serve_args`` until a signal or a worker exits; the exit code."""
    received = catch_signals()
    # Each worker is a fresh interpreter (no fork): grpc's threads and ONNX Runtime's pools do not survive fork.
    workers = [
        subprocess.Popen([sys.executable, "-m", "gateway", "serve", *serve_args, "--worker-index", str(index)])  # noqa: S603 (our own argv)
        for index in range(count)
    ]
    log.info("workers_started", count=count, pids=[w.pid for w in workers])
    failed = None
    while failed is None and not _stop_requested(received, workers):
        time.sleep(_POLL_S)
        failed = next((w for w in workers if w.poll() is not None), None)
    if failed is not None:
        log.error("worker_exited", pid=failed.pid, code=failed.returncode, detail="stopping the other workers")
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    codes = []
    deadline = time.monotonic() + grace_s + 10
    for worker in workers:
        try:
            codes.append(worker.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            worker.kill()
            codes.append(worker.wait())
    log.info("workers_stopped", codes=codes)
    return 0 if failed is None and all(code == 0 for code in codes) else 1


def _stop_requested(received: list[int], workers: Sequence[subprocess.Popen[bytes]]) -> bool:
    """Whether a stop signal came; a SIGHUP is passed on to every worker, each reloading its own files."""
    while received:
        signum = received.pop(0)
        if signum != signal.SIGHUP:
            return True
        log.info("signal_forwarded", signal="SIGHUP", pids=[w.pid for w in workers])
        for worker in workers:
            worker.send_signal(signal.SIGHUP)
    return False
