"""Runs every target in one session, interleaving repetitions, and writes JSON, Markdown and a PNG plot.

    python -m bench [--quick] [--reps 3] [--window 3] [--warmup 1] [--in-flight 1,4,16,64] [--out bench/results]

Targets: (a) ONNX Runtime in-process, (b) tutorial server, (c) tutorial server + mTLS + tuned ORT (the
transport floor), (d) gateway dev mode, (e) gateway fully secured, (f) (e) over PredictStream. Remote backends
(``--targets m,g-m``, not in the default sweep): (m) MLServer alone, (g-m) the secured gateway routing to it, the
gateway hop's cost (docs/backends.md). Extras (not with --quick): each step of the secure path switched off or on
at 16 in flight, dynamic batching at 64 in flight, request size from 1 KiB to 4 MiB, and memory per loaded model
version. Loopback only; every run is bounded.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
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
import yaml

from bench.load import LoadSpec, client_credentials, run_client

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
FEATURES = 784
ALLOW_ALICE = {
    "rules": [
        {"id": "bench", "effect": "allow", "principals": {"subjects": ["alice"]}, "models": ["*"], "actions": "*"}
    ]
}


@dataclass
class Target:
    """One thing measured: how to start it, how to reach it and what to send."""

    key: str
    label: str
    kind: str  # "ort" (in-process), "tutorial", "gateway" or "mlserver" (.venv-mlserver: tests/backends/servers.py)
    # "flat" (tutorial repeated float), "tensor" (raw bytes), "oip" (ModelInfer, raw) or "rest" (the REST
    # binding, tritonclient.http's default binary form)
    form: str = "tensor"
    mode: str = "unary"  # or "stream"
    secure: bool = False
    token: bool = False
    tuned: bool = False  # tutorial server: one intra-op thread per session
    config: dict[str, Any] = field(default_factory=dict)  # gateway.yaml overlay
    shares: str | None = None  # measured on another target's server (PredictStream on (e))
    backend: str | None = None  # a gateway routing the model to this target's server (backends.bench, plaintext)
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    rest_port: int = 0  # a secure gateway's http.listen port


@dataclass
class Measurement:
    """One run: a target at one in-flight count (and request size)."""

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
    request_bytes: int = 0
    model: str = "mlp"


SECURE_GATEWAY = {"secure": True, "token": True, "kind": "gateway"}
TARGETS: dict[str, dict[str, Any]] = {
    "a": {"label": "(a) ONNX Runtime in-process", "kind": "ort"},
    "b": {"label": "(b) tutorial grpcio server (insecure, default ORT)", "kind": "tutorial", "form": "flat"},
    "c": {
        "label": "(c) tutorial server + mTLS + tuned ORT (transport floor)",
        "kind": "tutorial",
        "form": "flat",
        "secure": True,
        "tuned": True,
    },
    "d": {"label": "(d) gateway, dev mode (no TLS, no auth)", "kind": "gateway"},
    "e": {
        "label": "(e) gateway, fully secured (mTLS, bound JWT, policy, audit)",
        **SECURE_GATEWAY,
        # One bench principal stands for a fleet: (f) at 64 in flight holds 64 streams.
        "config": {"limits": {"per_principal": {"max_in_flight": 256, "max_streams": 256}}},
    },
    "f": {"label": "(f) gateway, fully secured, PredictStream", **SECURE_GATEWAY, "mode": "stream", "shares": "e"},
    # Extras: one step of the secure path changed at a time.
    "e-nocache": {
        "label": "(e) without the verified-token cache",
        **SECURE_GATEWAY,
        "config": {"auth": {"token_cache_size": 0}},
    },
    "e-ortdefault": {
        "label": "(e) with ORT's default thread pool",
        **SECURE_GATEWAY,
        "config": {"models": {"intra_op_threads": 0}},
    },
    "e-always": {"label": "(e) with audit fsync: always", **SECURE_GATEWAY, "config": {"audit": {"fsync": "always"}}},
    "e-batch": {
        "label": "(e) with dynamic batching (32 rows, 500 us)",
        **SECURE_GATEWAY,
        "config": {"models": {"batching": {"mlp": {"max_batch_size": 32, "max_queue_delay_us": 500}}}},
    },
    "e-w2": {"label": "(e) with 2 worker processes", **SECURE_GATEWAY, "config": {"workers": 2}},
    "e-oip": {
        "label": "(e) through the Open Inference Protocol (ModelInfer, raw_input_contents)",
        **SECURE_GATEWAY,
        "form": "oip",
        "shares": "e",
    },
    "e-rest": {
        "label": "(e) through the REST binding (HTTPS, binary tensors)",
        **SECURE_GATEWAY,
        "form": "rest",
        "shares": "e",
    },
    "m": {"label": "(m) MLServer alone (ModelInfer, plaintext loopback)", "kind": "mlserver", "form": "oip"},
    "g-m": {
        "label": "(g-m) gateway, fully secured, routing to (m) MLServer",
        **SECURE_GATEWAY,
        "form": "oip",
        "backend": "m",
        "config": {"limits": {"per_principal": {"max_in_flight": 256, "max_streams": 256}}},
    },
    "e-pool": {
        "label": "(e) with every model run on the run pool (models.inline_max_ms: 0)",
        **SECURE_GATEWAY,
        "config": {"models": {"inline_max_ms": 0}},
    },
}
SWEEP = "a,b,c,d,e,f"
ABLATIONS = "e,e-oip,e-rest,e-nocache,e-ortdefault,e-always,e-pool,e-w2,c"
BATCHING = "e,e-batch"
SIZES_TARGETS = "c,e"
SIZES = (1 << 10, 64 << 10, 1 << 20, 4 << 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _own_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (the workers of a supervisor), from /proc (Linux)."""
    total = _own_cpu(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    for child in children:
        try:
            total += cpu_seconds(int(child))
        except OSError:
            continue  # exited meanwhile
    return total


def wait_ready(target: str, certs: Path | None, timeout_s: float = 60) -> None:
    if certs:
        channel = grpc.secure_channel(target, client_credentials(certs, "alice"))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)


def make_echo_model(path: Path) -> None:
    """A model that returns its FP32 input [1, N] unchanged: the request-size sweep measures transport alone."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "echo",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "n"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, "n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    onnx.save(model, path)


def start_targets(targets: list[Target], *, certs: Path, models: Path, workdir: Path) -> None:
    """Start each server target as a subprocess on its own loopback port."""
    server_certs = certs / "server"  # the server's folder of the gen_certs.sh set, all a server reads
    policies = workdir / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "bench.yaml").write_text(yaml.safe_dump(ALLOW_ALICE))
    servers: dict[str, Target] = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for target in targets:
        if target.kind == "ort":
            continue
        if target.shares is not None and target.shares in servers:
            shared = servers[target.shares]
            target.port, target.process, target.rest_port = shared.port, shared.process, shared.rest_port
            continue
        if target.kind == "mlserver":  # binds its own port and reports it
            from tests.backends.servers import OipServer, mlserver_folder

            folder = workdir / f"mlserver-{target.key}"
            folder.mkdir()
            server = OipServer("mlserver", mlserver_folder(folder, models)).start()
            target.port, target.process = server.port or 0, server.process
            servers[target.key] = target
            continue
        target.port = free_port()
        if target.kind == "gateway" and target.secure:  # every secure gateway also serves REST, for (e-rest)
            target.rest_port = free_port()
            target.config = {**target.config, "http": {"listen": f"127.0.0.1:{target.rest_port}"}}
        if target.kind == "tutorial":
            command = [
                sys.executable,
                "-m",
                "bench.tutorial_server",
                "--models",
                str(models),
                "--port",
                str(target.port),
            ]
            command += ["--certs", str(server_certs)] if target.secure else []
            command += ["--tuned"] if target.tuned else []
        else:
            config = workdir / f"gateway-{target.key}.yaml"
            settings = {"log_level": "warning", **target.config}
            served = models
            if target.backend is not None:  # every model routed: an empty repository of its own
                backend = {"addresses": [f"127.0.0.1:{servers[target.backend].port}"], "plaintext": True}
                settings["backends"] = {"bench": {**backend, "models": {"mlp": "mlp"}}}
                served = workdir / f"no-models-{target.key}"
                served.mkdir()
            config.write_text(yaml.safe_dump(settings))
            command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--models", str(served)]
            command += ["--listen", f"127.0.0.1:{target.port}", "--policies", str(policies)]
            command += ["--audit-log", str(workdir / f"audit-{target.key}" / "audit.log")]
            dev = ["--dev", "insecure_transport", "--dev", "no_auth"]
            command += ["--certs", str(server_certs)] if target.secure else dev
        log = (workdir / f"server-{target.key}.log").open("wb")
        target.process = subprocess.Popen(command, stdout=log, stderr=log, cwd=workdir, env=env)
        wait_ready(f"127.0.0.1:{target.port}", certs if target.secure else None)
        servers[target.key] = target


def stop_targets(targets: list[Target]) -> None:
    for target in targets:
        if target.process is not None and target.process.poll() is None:
            target.process.send_signal(signal.SIGTERM)
            try:
                target.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                target.process.kill()


def issue_token(certs: Path) -> str:
    from gateway.auth.issuer import issue_token as issue
    from gateway.auth.keys import kid_from_jwks

    key = (certs / "signing" / "jwt-signing.key").read_bytes()
    return issue(
        private_key_pem=key,
        sub="alice",
        kid=kid_from_jwks(certs / "signing" / "jwks.json", key),
        iss="https://gateway.local",
        aud="gateway",
        ttl_s=6 * 3600,
        bind_cert_pem=(certs / "clients" / "alice" / "alice.crt").read_bytes(),
    )


def summarize(
    target: str, in_flight: int, rep: int, latencies: list[float], errors: int, seconds: float, cpu: float, **extra: Any
) -> Measurement:
    count = len(latencies)
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    batch = extra.pop("batch", 1)
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
        **extra,
    )


def measure_in_process(models: Path, in_flight: int, rep: int, warmup: float, window: float) -> Measurement:
    """(a): ONNX Runtime alone, ``in_flight`` threads calling one session (1 intra-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(models / "mlp" / "2" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).random((1, FEATURES), dtype=np.float32)
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
    return summarize("a", in_flight, rep, latencies, 0, window, cpu)


def measure(
    target: Target,
    *,
    in_flight: int,
    rep: int,
    warmup: float,
    window: float,
    clients: int,
    connections: int,
    certs: Path,
    token: str | None,
    pool: ProcessPoolExecutor,
    model: str = "mlp",
    features: int = FEATURES,
) -> Measurement:
    """One closed-loop run against a server target; server CPU read from /proc over the window."""
    if target.process is None:
        raise RuntimeError(f"target {target.key} is not running")
    clients = min(clients, in_flight)
    start = time.time() + 0.5  # time for the client processes to connect
    measure_from, measure_until = start + warmup, start + warmup + window
    per_client = [in_flight // clients + (1 if i < in_flight % clients else 0) for i in range(clients)]
    specs = [
        LoadSpec(
            target=f"127.0.0.1:{target.rest_port if target.form == 'rest' else target.port}",
            model=model,
            form=target.form,
            mode=target.mode,
            in_flight=n,
            batch=1,
            features=features,
            measure_from=measure_from,
            measure_until=measure_until,
            certs=str(certs) if target.secure else None,
            token=token if target.token else None,
            connections=connections,
        )
        for n in per_client
        if n
    ]
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
    return summarize(
        target.key, in_flight, rep, latencies, errors, window, cpu, request_bytes=features * 4, model=model
    )


def memory_per_version(models: Path, copies: int = 6) -> dict[str, float]:
    """Resident memory each loaded version adds (KiB), for each demo model: ``copies`` loaded, RSS compared."""
    from gateway.models.placement import Placement
    from gateway.models.runtime import ModelVersion, RuntimeOptions

    placement = Placement(threads=1, inline_max_s=0.001)

    def load(name: str, version: int, path: Path) -> ModelVersion:
        return ModelVersion(name=name, version=version, path=path, options=RuntimeOptions(), placement=placement)

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE

    result = {}
    for name, version in (("mlp", 2), ("digits", 1)):
        path = models / name / str(version) / "model.onnx"
        load(name, version, path)  # warm ORT itself up
        gc.collect()
        before = rss()
        loaded = [load(name, version, path) for _ in range(copies)]
        result[f"{name} ({path.stat().st_size / 1024:,.0f} KiB file)"] = (rss() - before) / copies / 1024
        del loaded
    placement.close()
    return result


def _print(m: Measurement) -> None:
    size = f" {m.request_bytes:>8} B" if m.model != "mlp" else ""
    print(
        f"rep {m.rep} in-flight {m.in_flight:>3} {m.target:>12}{size}: {m.rps:8.0f} req/s  p50 {m.p50_ms:6.3f} ms"
        f"  p99 {m.p99_ms:7.3f} ms  cpu {m.server_cpu_us_per_request:6.0f} us/req  errors {m.errors}",
        flush=True,
    )


def run_section(
    keys: list[str],
    levels: list[int],
    args: argparse.Namespace,
    models: Path,
    workdir: Path,
    pool: ProcessPoolExecutor,
    *,
    sizes: tuple[int, ...] = (),
) -> list[Measurement]:
    """Start ``keys``, measure them interleaved (every repetition visits each target in turn), stop them."""
    targets = [Target(key=k, **TARGETS[k]) for k in keys]
    results: list[Measurement] = []
    start_targets(targets, certs=args.certs, models=models, workdir=workdir)
    try:
        token = issue_token(args.certs) if any(t.token for t in targets) else None
        for rep in range(args.reps):
            for level in levels:
                for size in sizes or (0,):
                    for target in targets:
                        if target.kind == "ort":
                            m = measure_in_process(models, level, rep, args.warmup, args.window)
                        else:
                            m = measure(
                                target,
                                in_flight=level,
                                rep=rep,
                                warmup=args.warmup,
                                window=args.window,
                                clients=args.clients,
                                connections=args.connections,
                                certs=args.certs,
                                token=token,
                                pool=pool,
                                **({"model": "echo", "features": size // 4} if size else {}),
                            )
                        results.append(m)
                        _print(m)
    finally:
        stop_targets(targets)
    return results


def main(argv: list[str] | None = None) -> int:
    from bench.report import write_reports

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run of the harness (no extras)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--window", type=float, default=3.0)
    parser.add_argument("--in-flight", default="1,4,16,64")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--connections", type=int, default=4, help="connections per client process")
    parser.add_argument("--targets", default=SWEEP, help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--no-extras", action="store_true", help="only the in-flight sweep")
    parser.add_argument("--certs", type=Path, default=ROOT / "certs", help="a folder written by scripts/gen_certs.sh")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.window, args.in_flight, args.no_extras = 1, 0.2, 0.5, "1,4", True
    levels = [int(n) for n in args.in_flight.split(",")]
    keys = args.targets.split(",")
    unknown = [k for k in keys if k not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}")
    args.out.mkdir(parents=True, exist_ok=True)
    sections: dict[str, list[Measurement]] = {}
    extras: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp, ProcessPoolExecutor(args.clients) as pool:
        workdir = Path(tmp)
        models = workdir / "models"
        shutil.copytree(args.models, models)
        make_echo_model(models / "echo" / "1" / "model.onnx")
        sections["sweep"] = run_section(keys, levels, args, models, workdir, pool)
        if not args.no_extras:
            sections["ablations"] = run_section(ABLATIONS.split(","), [16], args, models, workdir, pool)
            sections["batching"] = run_section(BATCHING.split(","), [64], args, models, workdir, pool)
            sections["sizes"] = run_section(SIZES_TARGETS.split(","), [16], args, models, workdir, pool, sizes=SIZES)
            extras["memory_kib_per_version"] = memory_per_version(models)
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
        "connections": args.connections,
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    labels = {k: v["label"] for k, v in TARGETS.items()}
    write_reports(
        args.out, {name: [asdict(m) for m in ms] for name, ms in sections.items()}, labels, environment, extras
    )
    print(f"\nwrote {args.out}/results.json, results.md, results.png")
    failed = sum(m.errors for ms in sections.values() for m in ms)
    return 1 if failed else 0


def median_by(results: list[dict[str, Any]], key: str, *, by: str = "in_flight") -> dict[tuple[str, int], float]:
    """Median of ``key`` over repetitions, per (target, ``by``)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in results:
        groups.setdefault((r["target"], r[by]), []).append(r[key])
    return {k: statistics.median(v) for k, v in groups.items()}


if __name__ == "__main__":
    raise SystemExit(main())
