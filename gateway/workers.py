"""Several gateway processes on one port (``workers: N``), for machines with more cores than one Python process
can use: each worker is a full gateway with its own audit chain, and the kernel spreads connections between them
(``SO_REUSEPORT``). This module is the supervisor: it starts the workers, forwards SIGTERM/SIGINT and SIGHUP, and stops
the rest when one dies, so that a process manager sees the failure and restarts the whole set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import structlog

from gateway.metrics import (
    MULTIPROCESS_DIR_ENV,
    ListenerLimits,
    MetricsListener,
    MetricsTls,
    mark_worker_dead,
    registry,
)
from gateway.server import catch_signals, raise_open_files_limit

log = structlog.get_logger(__name__)

_POLL_S = 0.2


def run_workers(
    serve_args: Sequence[str],
    count: int,
    *,
    grace_s: float,
    metrics_listen: str | None,
    metrics_tls: MetricsTls | None,
    metrics_limits: ListenerLimits | None = None,
) -> int:
    """Run ``count`` workers of ``gateway serve serve_args`` until a signal or a worker exits; the exit code.

    The workers write their metrics to a fresh folder (prometheus_client's multiprocess mode); this process
    serves them all on ``metrics_listen``, when set, and removes the folder at the end."""
    received = catch_signals()
    raise_open_files_limit()  # the supervisor's metrics listener; each worker raises its own
    with tempfile.TemporaryDirectory(prefix="gateway-metrics-") as metrics_dir:
        listener = None
        if metrics_listen is not None:  # bound first: a port in use stops the start before any worker runs
            listener = MetricsListener(
                metrics_listen, tls=metrics_tls, source=registry(metrics_dir), limits=metrics_limits
            )
            log.info("metrics_listening", listen=metrics_listen, port=listener.port, workers=count)
        env = {**os.environ, MULTIPROCESS_DIR_ENV: metrics_dir}
        try:
            # Each worker is a fresh interpreter (no fork): grpc's threads and ONNX Runtime's pools do not survive
            # fork.
            workers = [
                subprocess.Popen(  # noqa: S603 (our own argv)
                    [sys.executable, "-m", "gateway", "serve", *serve_args, "--worker-index", str(index)], env=env
                )
                for index in range(count)
            ]
            log.info("workers_started", count=count, pids=[w.pid for w in workers])
            return _supervise(workers, received, grace_s=grace_s, metrics_dir=metrics_dir)
        finally:
            if listener is not None:
                listener.stop()


def _supervise(workers: list[subprocess.Popen[bytes]], received: list[int], *, grace_s: float, metrics_dir: str) -> int:
    """Wait for a stop signal or a worker's exit (passing SIGHUP on), stop every worker; the exit code."""
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
        mark_worker_dead(worker.pid, metrics_dir)
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
