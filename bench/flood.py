"""Connection and stream floods against a ``gateway serve`` child process under a lowered descriptor limit: what the
gateway holds (descriptors, RSS) and whether it still serves, for issue 27 item 2 and docs/operations.md.

    python -m bench.flood [--nofile 1024] [--idle 1100] [--watches 20000] [--silent-tls 1100]

Needs ``make certs models`` (certs/, models/, policies/). Loopback only; prints one line per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway._pb.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.tensors import encode

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # then an empty SETTINGS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _limit(nofile: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


@contextlib.contextmanager
def gateway(nofile: int, workdir: Path, extra: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], int, int]]:
    """``gateway serve`` with RLIMIT_NOFILE soft = hard = ``nofile``; (process, main port, probe port)."""
    port, probe = _free_port(), _free_port()
    config = workdir / "gateway.yaml"
    config.write_text(f"health:\n  listen: 127.0.0.1:{probe}\n")
    args = [
        *(sys.executable, "-m", "gateway", "serve", "--config", str(config), "--certs", str(ROOT / "certs/server")),
        *("--models", str(ROOT / "models"), "--policies", str(ROOT / "policies")),
        *("--listen", f"127.0.0.1:{port}", "--audit-log", str(workdir / "audit/audit.log"), *extra),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRPC_VERBOSITY": "NONE"}
    with (workdir / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, preexec_fn=lambda: _limit(nofile)
        )
    try:
        yield process, port, probe
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def held(pid: int) -> tuple[int, int]:
    """(open descriptors, RSS in MiB) of process ``pid``."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss_kib = next(
        int(line.split()[1])
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS")
    )
    return fds, rss_kib // 1024


def _credentials(client: str = "alice") -> grpc.ChannelCredentials:
    certs = ROOT / "certs"
    folder = certs / "clients" / client
    return grpc.ssl_channel_credentials(
        (certs / "server/ca.crt").read_bytes(),
        (folder / f"{client}.key").read_bytes(),
        (folder / f"{client}.crt").read_bytes(),
    )


def _token() -> str:
    from gateway.auth.issuer import issue_token
    from gateway.auth.keys import kid_from_jwks

    key = (ROOT / "certs/signing/jwt-signing.key").read_bytes()
    return issue_token(
        private_key_pem=key,
        sub="alice",
        kid=kid_from_jwks(ROOT / "certs/server/jwks.json", key),
        bind_cert_pem=(ROOT / "certs/clients/alice/alice.crt").read_bytes(),
        iss="https://gateway.local",
        aud="gateway",
    )


def alice_predicts(port: int, token: str) -> str:
    """The status of one Predict by alice on a new connection, and of the main port's health Check."""
    request = pb.PredictRequest(model_name="mlp", inputs=[encode("input", np.zeros((1, 784), np.float32))])
    with grpc.secure_channel(f"127.0.0.1:{port}", _credentials()) as channel:
        try:
            pb_grpc.InferenceServiceStub(channel).Predict(
                request, metadata=[("authorization", f"Bearer {token}")], timeout=5
            )
            predict = "OK"
        except grpc.RpcError as exc:
            predict = exc.code().name
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            health = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            health = exc.code().name
    return f"alice Predict {predict}, health {health}"


def wait_serving(probe: int, process: subprocess.Popen[bytes]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{probe}") as channel:
        for _ in range(300):
            if process.poll() is not None:
                raise SystemExit(f"gateway exited {process.returncode}")
            with contextlib.suppress(grpc.RpcError):
                if health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            time.sleep(0.2)
    raise SystemExit("gateway not serving after 60 s")


def open_idle(port: int, count: int, *, preface: bool) -> list[socket.socket]:
    """``count`` connections (as many as connect), each sending the HTTP/2 preface or nothing, then idle."""
    sockets = []
    for _ in range(count):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            if preface:
                s.sendall(PREFACE)
        except OSError:
            break
        sockets.append(s)
    return sockets


def still_open(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` the server has not closed."""
    count = 0
    for s in sockets:
        s.setblocking(False)
        try:
            while s.recv(65536):
                pass
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


async def watch_flood(port: int, count: int, seconds: float, *, tls: bool) -> tuple[int, str]:
    """``count`` Watch streams over 10 connections (alice's on the main port), held ``seconds``: (answered, first
    error)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    target = f"127.0.0.1:{port}"
    channels = [
        grpc.aio.secure_channel(target, _credentials(), options=options)
        if tls
        else grpc.aio.insecure_channel(target, options=options)
        for _ in range(10)
    ]
    calls = [
        health_pb2_grpc.HealthStub(channels[i % 10]).Watch(health_pb2.HealthCheckRequest(), timeout=seconds + 30)
        for i in range(count)
    ]

    async def first(call: grpc.aio.UnaryStreamCall) -> str:
        try:
            await asyncio.wait_for(call.read(), timeout=seconds + 20)
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        except TimeoutError:
            return "no answer"

    results = await asyncio.gather(*(first(c) for c in calls))
    await asyncio.sleep(seconds)
    answered = sum(r == "OK" for r in results)
    error = next((r for r in results if r != "OK"), "-")
    return answered, error, calls, channels  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.splitlines()[0])
    parser.add_argument("--nofile", type=int, default=1024, help="RLIMIT_NOFILE soft = hard (default %(default)s)")
    parser.add_argument("--idle", type=int, default=1100, help="idle plaintext connections to the probe port")
    parser.add_argument("--watches", type=int, default=20000, help="Watch streams on the probe port")
    parser.add_argument("--silent-tls", type=int, default=1100, help="connections to the main port sending nothing")
    parser.add_argument("--hold", type=float, default=8.0, help="seconds to hold each flood before measuring again")
    args = parser.parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds the flood's other ends
    token = _token()
    with (
        tempfile.TemporaryDirectory(prefix="flood-") as tmp,
        gateway(args.nofile, Path(tmp), []) as (process, port, probe),
    ):
        wait_serving(probe, process)
        pid = process.pid
        print(f"idle gateway: fds, RSS MiB = {held(pid)}; {alice_predicts(port, token)}")

        def idle_flood(target: int, count: int, *, preface: bool, what: str) -> None:
            sockets = open_idle(target, count, preface=preface)
            time.sleep(1)
            print(f"{len(sockets)} {what}: fds, RSS = {held(pid)}; {alice_predicts(port, token)}")
            time.sleep(args.hold)
            print(
                f"  after {args.hold:.0f} s: {still_open(sockets)} still open, fds, RSS = {held(pid)}; "
                f"{alice_predicts(port, token)}"
            )
            for s in sockets:
                s.close()
            time.sleep(1)

        idle_flood(probe, args.idle, preface=True, what="idle probe connections")
        idle_flood(port, args.silent_tls, preface=False, what="silent main-port connections")

        async def watches(target: int, where: str, tls: bool) -> None:
            before = held(pid)
            answered, error, calls, channels = await watch_flood(target, args.watches, 1.0, tls=tls)
            during = held(pid)
            print(
                f"{args.watches} {where} Watch streams: {answered} answered (else {error}); "
                f"fds, RSS {before} -> {during}; "
                f"{await asyncio.to_thread(alice_predicts, port, token)}"
            )
            for call in calls:
                call.cancel()
            for channel in channels:
                await channel.close()

        asyncio.run(watches(probe, "probe", False))
        time.sleep(1)
        asyncio.run(watches(port, "main-port (alice's)", True))
        audit = (Path(tmp) / "serve.log").read_text()
        print(f"audit_write_failed in the log: {audit.count('audit_write_failed')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
