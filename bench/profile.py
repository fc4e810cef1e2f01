"""Where the time of a secured call goes: server CPU per request with one part of the work taken out at a time.

    python -m bench.profile [--window 4] [--reps 3]

A sampling profiler cannot attribute a multi-threaded gRPC server's CPU cleanly (most of it is spent in
grpcio's C core and in thread hand-offs, outside any Python frame), so this measures by difference: the
fully secured gateway runs in this process, 16 calls in flight from two client processes over mutual TLS,
and each variant replaces one step with a no-op. The difference in server CPU per request is that step's
cost. Bench code only: nothing here changes how the gateway runs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from bench.load import LoadSpec, run_client
from bench.run import ALLOW_ALICE, ROOT, issue_token

IN_FLIGHT = 16


@contextmanager
def _replaced(owner: object, name: str, value: object) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


BASELINE = "full (e)"


def variants() -> dict[str, tuple[str, Callable[[], AbstractContextManager[Any]]]]:
    """Each part of the work that can be taken out alone: short name -> (label, a context manager factory that
    replaces it with a no-op while it is open). ``python -m bench.callpath --without NAME`` takes the same parts."""
    from gateway import tracing
    from gateway.audit import writer
    from gateway.audit.active import ActiveFile
    from gateway.audit.writer import AuditLog
    from gateway.auth.verifier import TokenVerifier
    from gateway.models.runtime import ModelVersion

    output = {"output": np.zeros((1, 10), np.float32)}
    # No Prometheus variant: this gateway has no metrics.listen, so it records no per-call metrics at all.
    return {
        "audit": ("without the audit write", lambda: _replaced(AuditLog, "append", _no_append)),
        # Parts of it, each taken out alone (the record still goes through the group commit):
        "seal": ("... its sealing (orjson's canonical JSON, HMAC)", lambda: _replaced(writer, "seal", _sealed_alike)),
        "write": ("... its os.write", lambda: _replaced(ActiveFile, "write", lambda self, data: None)),
        "ort": ("without ONNX Runtime", lambda: _replaced(ModelVersion, "execute", lambda self, inputs: output)),
        "token": (
            "without the token check (cache hit)",
            lambda: _replaced(TokenVerifier, "verify", _first_result(TokenVerifier.verify)),
        ),
        "tracing": (
            "without tracing hooks (tracing off)",
            lambda: _replaced(tracing, "span", lambda call, name, attributes=None: nullcontext()),
        ),
    }


async def _no_append(self: object, record: object, *, alone: bool = False) -> None:
    return None


def _sealed_alike(record: object, digest: object, *, body: bytes | None = None) -> tuple[bytes, str]:
    """A line and hash of the usual sizes, computed from nothing."""
    return _SEALED_LINE, _SEALED_HASH


_SEALED_HASH = "0" * 64
_SEALED_LINE = b'{"x":"' + b"x" * 900 + b'"}\n'


def _first_result(verify: Callable[..., object]) -> Callable[..., object]:
    """``verify`` once, then its answer for every call: the cost of the cached path taken out."""
    cached: list[object] = []

    def replacement(self: object, token: str, *, cert_x5t: str | None) -> object:
        if not cached:
            cached.append(verify(self, token, cert_x5t=cert_x5t))
        return cached[0]

    return replacement


def load_spec(port: int, certs: Path, token: str, window: float, *, form: str) -> LoadSpec:
    """What each of the two client processes sends: half the in-flight calls over 4 connections, measured over
    ``window`` seconds after a 1 s warm-up that starts half a second from now."""
    start = time.time() + 0.5
    return LoadSpec(
        target=f"127.0.0.1:{port}",
        model="mlp",
        form=form,
        mode="unary",
        in_flight=IN_FLIGHT // 2,
        batch=1,
        features=784,
        measure_from=start + 1.0,
        measure_until=start + 1.0 + window,
        certs=str(certs),
        token=token,
        connections=4,
    )


def measure(
    port: int, certs: Path, token: str, window: float, pool: ProcessPoolExecutor, *, form: str = "tensor"
) -> tuple[float, float]:
    """(requests/s, server CPU us per request) over one window; ``form``: the request form (bench.load)."""
    spec = load_spec(port, certs, token, window, form=form)
    measure_from, measure_until = spec.measure_from, spec.measure_until
    futures = [pool.submit(run_client, spec) for _ in range(2)]
    time.sleep(max(0.0, measure_from - time.time()))
    cpu0 = time.process_time()
    time.sleep(max(0.0, measure_until - time.time()))
    cpu1 = time.process_time()
    requests = sum(len(future.result(timeout=120)[0]) for future in futures)  # those completed in the window
    return requests / window, (cpu1 - cpu0) / max(1, requests) * 1e6


@contextmanager
def serving(certs: Path, models: Path) -> Iterator[tuple[int, str]]:
    """The fully secured gateway started in this process on a loopback port: yields (port, token)."""
    with started_gateway(certs, models) as gateway:
        yield gateway.port, issue_token(certs)


@contextmanager
def started_gateway(certs: Path, models: Path) -> Iterator[Any]:
    """The fully secured gateway (a gen_certs.sh folder's server credentials, a policy letting alice do anything,
    an audit trail in a temp dir) started in this process on a loopback port, stopped after the block."""
    import yaml

    from gateway.config import certs_dir_overrides, load_settings
    from gateway.server import Gateway

    with tempfile.TemporaryDirectory(prefix="gateway-profile-") as tmp:
        policies = Path(tmp) / "policies"
        policies.mkdir()
        (policies / "bench.yaml").write_text(yaml.safe_dump(ALLOW_ALICE))
        overrides = {
            **certs_dir_overrides(certs / "server"),
            "listen": "127.0.0.1:0",
            "models.repository": models,
            "policies.directory": policies,
            "audit.path": Path(tmp) / "audit" / "audit.log",
        }
        gateway = Gateway(load_settings(None, overrides))
        gateway.start()
        try:
            yield gateway
        finally:
            gateway.stop(1.0)


def client_pool() -> ProcessPoolExecutor:
    """Two spawned client processes: a process forked from one running grpc.aio (the gateway runs in this one)
    hangs in grpc."""
    return ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))


def main(argv: list[str] | None = None) -> int:
    from gateway import logging as oplog

    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--certs", type=Path, default=ROOT / "certs", help="a folder written by scripts/gen_certs.sh")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    args = parser.parse_args(argv)
    oplog.configure(fmt="json", level="warning")
    results: dict[str, list[tuple[float, float]]] = {}
    with client_pool() as pool, serving(args.certs, args.models) as (port, token):
        for _ in range(args.reps):
            for name, replace in [(BASELINE, nullcontext), *variants().values()]:  # interleaved, as in bench.run
                with replace():
                    results.setdefault(name, []).append(measure(port, args.certs, token, args.window, pool))
    base = statistics.median(cpu for _, cpu in results[BASELINE])
    print(
        f"server CPU per request, {IN_FLIGHT} in flight, medians of {args.reps} "
        f"({os.cpu_count()} CPUs, Python {sys.version.split()[0]})"
    )
    print("| variant | req/s | server CPU us/req | the step costs |\n|---|---:|---:|---:|")
    for name, runs in results.items():
        rps, cpu = statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs)
        print(f"| {name} | {rps:,.0f} | {cpu:.0f} | {'' if name == BASELINE else f'{base - cpu:.0f} us'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
