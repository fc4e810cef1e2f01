"""Runs every target in one session, interleaving repetitions, and writes JSON, Markdown and a PNG plot.

    python -m bench [--quick] [--reps 3] [--window 3] [--warmup 1] [--in-flight 1,4,16,64] [--out bench/results]

Targets: (a) ONNX Runtime in-process, (b) tutorial server, (c) tutorial server + mTLS + tuned ORT (the
transport floor), (d) gateway dev mode, (e) gateway fully secured, (f) (e) over PredictStream.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from bench.load import LoadSpec, run_client

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
FEATURES = 784


@dataclass
class Target:
    """One thing measured: how to reach it and what to send."""

    key: str
    label: str
    form: str = "tensor"
    mode: str = "unary"
    secure: bool = False
    token: bool = False
    process: subprocess.Popen[bytes] | None = None
    port: int = 0


@dataclass
class Measurement:
    """One run: a target at one in-flight count."""

    target: str
    in_flight: int
    rep: int
    requests: int
    errors: int
    seconds: float
    rps: float
    inferences_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server_cpu_us_per_request: float
    extra: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_ready(target: str, certs: Path | None, timeout_s: float = 60) -> None:
    if certs:
        credentials = grpc.ssl_channel_credentials(
            (certs / "ca.crt").read_bytes(), (certs / "alice.key").read_bytes(), (certs / "alice.crt").read_bytes()
        )
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)


def start_targets(targets: list[Target], *, certs: Path, models: Path, workdir: Path) -> None:
    """Start each server target as a subprocess on its own loopback port."""
    gateway_bin = [sys.executable, "-m", "gateway", "serve", "--models", str(models)]
    commands = {
        "b": [sys.executable, "-m", "bench.tutorial_server", "--models", str(models)],
        "c": [sys.executable, "-m", "bench.tutorial_server", "--models", str(models), "--certs", str(certs), "--tuned"],
        "d": [*gateway_bin, "--dev", "insecure_transport", "--dev", "no_auth"],
        "e": [*gateway_bin, "--certs", str(certs), "--policies", str(ROOT / "policies")],
    }
    shared_secure: Target | None = None
    for target in targets:
        if target.key == "a":
            continue
        if target.key == "f" and shared_secure is not None:  # the same secured gateway, over PredictStream
            target.port, target.process = shared_secure.port, shared_secure.process
            continue
        key = "e" if target.key == "f" else target.key
        target.port = free_port()
        command = [
            *commands[key],
            "--port" if key in "bc" else "--listen",
            str(target.port) if key in "bc" else f"127.0.0.1:{target.port}",
        ]
        if key in "de":
            command += ["--audit-log", str(workdir / f"audit-{target.key}" / "audit.log")]
        log = (workdir / f"server-{target.key}.log").open("wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        target.process = subprocess.Popen(command, stdout=log, stderr=log, cwd=workdir, env=env)
        wait_ready(f"127.0.0.1:{target.port}", certs if target.secure else None)
        if key == "e":
            shared_secure = target


def stop_targets(targets: list[Target]) -> None:
    for target in targets:
        if target.process is not None and target.process.poll() is None:
            target.process.send_signal(signal.SIGTERM)
            try:
                target.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                target.process.kill()


def issue_token(certs: Path) -> str:
    from gateway.auth.tokens import issue_token as issue
    from gateway.auth.tokens import kid_from_jwks

    key = (certs / "jwt-signing.key").read_bytes()
    return issue(
        private_key_pem=key,
        sub="alice",
        kid=kid_from_jwks(certs / "jwks.json", key),
        iss="https://gateway.local",
        aud="gateway",
        ttl_s=6 * 3600,
        bind_cert_pem=(certs / "alice.crt").read_bytes(),
    )


def summarize(
    target: str, in_flight: int, rep: int, latencies: list[float], errors: int, seconds: float, cpu: float, batch: int
) -> Measurement:
    count = len(latencies)
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return Measurement(
        target=target,
        in_flight=in_flight,
        rep=rep,
        requests=count,
        errors=errors,
        seconds=seconds,
        rps=count / seconds,
        inferences_per_s=count * batch / seconds,
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        server_cpu_us_per_request=cpu / max(count, 1) * 1e6,
    )


def measure_in_process(models: Path, in_flight: int, rep: int, warmup: float, window: float, batch: int) -> Measurement:
    """(a): ONNX Runtime alone, ``in_flight`` threads calling one session (1 intra-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(models / "mlp" / "2" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).random((batch, FEATURES), dtype=np.float32)
    start = time.time()
    measure_from, measure_until = start + warmup, start + warmup + window
    latencies: list[float] = []

    def worker() -> None:
        while (now := time.time()) < measure_until:
            t0 = time.perf_counter()
            session.run(None, {"input": x})
            if now >= measure_from:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, measure_from - time.time()))
    cpu0 = time.process_time()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu0
    return summarize("a", in_flight, rep, latencies, 0, window, cpu, batch)


def measure(
    target: Target,
    *,
    in_flight: int,
    rep: int,
    warmup: float,
    window: float,
    clients: int,
    certs: Path,
    token: str | None,
    batch: int,
    pool: ProcessPoolExecutor,
) -> Measurement:
    """One closed-loop run against a server target; server CPU read from /proc over the window."""
    start = time.time() + 0.5  # time for the client processes to connect
    measure_from, measure_until = start + warmup, start + warmup + window
    per_client = [in_flight // clients + (1 if i < in_flight % clients else 0) for i in range(clients)]
    specs = [
        LoadSpec(
            target=f"127.0.0.1:{target.port}",
            model="mlp",
            form=target.form,
            mode=target.mode,
            in_flight=n,
            batch=batch,
            features=FEATURES,
            measure_from=measure_from,
            measure_until=measure_until,
            certs=str(certs) if target.secure else None,
            token=token if target.token else None,
        )
        for n in per_client
        if n
    ]
    if target.process is None:
        raise RuntimeError(f"target {target.key} is not running")
    futures = [pool.submit(run_client, spec) for spec in specs]
    time.sleep(max(0.0, measure_from - time.time()))
    cpu0 = cpu_seconds(target.process.pid)
    time.sleep(max(0.0, measure_until - time.time()))
    cpu = cpu_seconds(target.process.pid) - cpu0
    latencies: list[float] = []
    errors = 0
    for future in futures:
        lat, err = future.result(timeout=warmup + window + 120)
        latencies += lat
        errors += err
    return summarize(target.key, in_flight, rep, latencies, errors, window, cpu, batch)


TARGETS = {
    "a": dict(label="(a) ONNX Runtime in-process"),
    "b": dict(label="(b) tutorial grpcio server (insecure, default ORT)", form="flat"),
    "c": dict(label="(c) tutorial server + mTLS + tuned ORT (transport floor)", form="flat", secure=True),
    "d": dict(label="(d) gateway, dev mode (no TLS, no auth)"),
    "e": dict(label="(e) gateway, fully secured (mTLS, bound JWT, policy, audit)", secure=True, token=True),
    "f": dict(label="(f) gateway, fully secured, PredictStream", secure=True, token=True, mode="stream"),
}


def main(argv: list[str] | None = None) -> int:
    from bench.report import write_reports

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run of the harness")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--in-flight", default="1,4,16,64")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--targets", default="abcdef")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--certs", type=Path, default=ROOT / "certs")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.window, args.in_flight = 1, 0.2, 0.5, "1,4"
    levels = [int(n) for n in args.in_flight.split(",")]
    targets = [Target(key=k, **TARGETS[k]) for k in args.targets]  # type: ignore[arg-type]
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as workdir, ProcessPoolExecutor(args.clients) as pool:
        start_targets(targets, certs=args.certs, models=args.models, workdir=Path(workdir))
        try:
            token = issue_token(args.certs) if any(t.token for t in targets) else None
            for rep in range(args.reps):
                for level in levels:
                    for target in targets:  # interleaved: each repetition visits every target in turn
                        if target.key == "a":
                            m = measure_in_process(args.models, level, rep, args.warmup, args.window, args.batch)
                        else:
                            m = measure(
                                target,
                                in_flight=level,
                                rep=rep,
                                warmup=args.warmup,
                                window=args.window,
                                clients=min(args.clients, level),
                                certs=args.certs,
                                token=token,
                                batch=args.batch,
                                pool=pool,
                            )
                        results.append(m)
                        print(
                            f"rep {rep} in-flight {level:>3} {target.key}: {m.rps:8.0f} req/s  p50 {m.p50_ms:6.3f} ms"
                            f"  p99 {m.p99_ms:6.3f} ms  cpu {m.server_cpu_us_per_request:6.0f} us/req"
                            f"  errors {m.errors}",
                            flush=True,
                        )
        finally:
            stop_targets(targets)
    environment = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": ort.__version__,
        "reps": args.reps,
        "window_s": args.window,
        "warmup_s": args.warmup,
        "clients": args.clients,
        "batch": args.batch,
    }
    write_reports(args.out, [asdict(m) for m in results], {k: TARGETS[k]["label"] for k in args.targets}, environment)
    print(f"\nwrote {args.out}/results.json, results.md, results.png")
    failed = sum(m.errors for m in results)
    return 1 if failed else 0


def median_by(results: list[dict[str, Any]], key: str) -> dict[tuple[str, int], float]:
    """Median of ``key`` over repetitions, per (target, in-flight)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in results:
        groups.setdefault((r["target"], r["in_flight"]), []).append(r[key])
    return {k: statistics.median(v) for k, v in groups.items()}


if __name__ == "__main__":
    raise SystemExit(main())
