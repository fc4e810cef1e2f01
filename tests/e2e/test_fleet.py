"""Three gateway replicas as one service: each `gateway serve` runs in its own network namespace (a veth into a
bridge in the root namespace), with the same models, policies and server certificate and its own audit chain.
An SDK client balances Predict calls over them (round_robin) while one replica is drained (SIGTERM), another is
killed (SIGKILL) and a policy change is rolled to all three; then the trails are checked against what the
client saw. Needs root and `ip netns` (skipped otherwise)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gateway
from gateway.audit import verify_files
from tests.conftest import ALL_ACCESS_POLICY, ROOT, Pki, wait_until
from tests.e2e.test_sdk import make_token

pytestmark = pytest.mark.fleet

PREFIX = "gwf"  # every namespace and link this test makes: gwf<pid>..., so leftovers of dead runs can be found
PORT = 50051
REPLICAS = 3
THREADS = 6  # callers, over two clients (two connections to each replica)
CALL_TIMEOUT_S = 20.0
RELOAD_INTERVAL_S = 0.5
WAIT_S = 30.0  # the bound of every wait below: readiness, a policy change, an exit
X = np.random.default_rng(16).random((1, 784), dtype=np.float32)
GATEWAY_SERVE = (sys.executable, "-m", "gateway", "serve")
SERVE_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # the tree under test

# The change rolled out under load: bob, who could only read digits' metadata, may now run it.
GRANT = """
rules:
  - id: bob-predict-digits
    effect: allow
    principals: {subjects: [bob]}
    models: [digits]
    actions: [predict]
"""


# --------------------------------------------------------------------------------------------------- network


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["ip", "netns", "exec", namespace, "ip", *args] if namespace else ["ip", *args]
    return subprocess.run(command, capture_output=True, text=True, check=check, timeout=30)


def _owner_alive(name: str) -> bool:
    """Whether the test run that made ``name`` (gwf<pid>...) is still running."""
    owner = re.match(rf"{PREFIX}(\d+)", name)
    if owner is None:
        return False
    try:
        os.kill(int(owner.group(1)), 0)
    except ProcessLookupError:
        return False
    return True


def _remove_leftovers() -> None:
    """Namespaces, their processes, and bridges of earlier runs that died before their cleanup (a SIGKILL)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX) and not _owner_alive(name):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(PREFIX) and not _owner_alive(name):
            _ip("link", "del", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that overlaps no network of this machine (parallel runs each take their own)."""
    inet = re.findall(r"inet (\S+)", _ip("-o", "-4", "addr", "show", check=False).stdout)
    used = [ipaddress.IPv4Interface(address).network for address in inet]
    start = os.getpid() % 250
    for offset in range(250):
        subnet = ipaddress.IPv4Network(f"10.213.{(start + offset) % 250}.0/24")
        if not any(subnet.overlaps(network) for network in used):
            return subnet
    pytest.fail("no free /24 in 10.213.0.0/16")


@dataclass
class Network:
    """A bridge in the root namespace and one namespace per replica, each with an address on the bridge."""

    bridge: str
    namespaces: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)

    def remove(self) -> None:
        for namespace in self.namespaces:  # takes its end of the veth pair, and so the pair, with it
            _ip("netns", "del", namespace, check=False)
        _ip("link", "del", self.bridge, check=False)


def _probe_namespaces() -> None:
    """Skip, saying why, where this machine does not let the test make network namespaces."""
    if os.geteuid() != 0:
        pytest.skip("the fleet test makes network namespaces: it needs root")
    if shutil.which("ip") is None:
        pytest.skip("the fleet test makes network namespaces: `ip` (iproute2) is not installed")
    probe = f"{PREFIX}{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"the fleet test makes network namespaces: `ip netns add` failed: {made.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


@pytest.fixture
def network() -> Iterator[Network]:
    _probe_namespaces()
    _remove_leftovers()
    tag = f"{PREFIX}{os.getpid()}"
    subnet = _free_subnet()
    hosts = list(subnet.hosts())
    net = Network(bridge=f"{tag}b")
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{hosts[0]}/{subnet.prefixlen}", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for index in range(REPLICAS):
            namespace, outside, inside = f"{tag}n{index}", f"{tag}h{index}", f"{tag}p{index}"
            _ip("netns", "add", namespace)
            net.namespaces.append(namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", namespace)
            _ip("link", "set", outside, "master", net.bridge)
            _ip("link", "set", outside, "up")
            address = str(hosts[1 + index])
            _ip("addr", "add", f"{address}/{subnet.prefixlen}", "dev", inside, namespace=namespace)
            _ip("link", "set", inside, "up", namespace=namespace)
            _ip("link", "set", "lo", "up", namespace=namespace)
            net.addresses.append(address)
        yield net
    finally:
        net.remove()


# -------------------------------------------------------------------------------------------------- replicas


@dataclass
class Replica:
    """One `gateway serve` process in its namespace."""

    index: int
    address: str
    audit_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def chain(self) -> str:
        return f"replica-{self.index}"

    @property
    def target(self) -> str:
        return f"{self.address}:{PORT}"

    def exit_code(self) -> int:
        """Wait (bounded) for the process to end."""
        return self.process.wait(timeout=WAIT_S)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def _config(tmp: Path, index: int, address: str, models: Path, policies: Path) -> Path:
    """The replica's own settings file: its address, audit trail and chain; the shared models and policies."""
    path = tmp / f"replica-{index}.yaml"
    path.write_text(
        f"listen: {address}:{PORT}\n"
        "shutdown_drain_s: 0.5\n"
        "shutdown_grace_s: 3\n"
        "log_level: warning\n"
        f"policies: {{directory: {policies}, reload_interval_s: {RELOAD_INTERVAL_S}}}\n"
        f"models: {{repository: {models}, strict: true}}\n"
        f"audit: {{path: {tmp / f'audit-{index}' / 'audit.log'}, chain_id: replica-{index}}}\n"
    )
    return path


@pytest.fixture
def replicas(network: Network, pki: Pki, model_repo: Path, tmp_path: Path) -> Iterator[list[Replica]]:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "base.yaml").write_text(ALL_ACCESS_POLICY)
    started: list[Replica] = []
    try:
        for index, (namespace, address) in enumerate(zip(network.namespaces, network.addresses, strict=True)):
            config = _config(tmp_path, index, address, model_repo, policies)
            log_path = tmp_path / f"replica-{index}.log"
            command = ["ip", "netns", "exec", namespace, *GATEWAY_SERVE, "--config", str(config)]
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [*command, "--certs", str(pki.server_dir)], env=SERVE_ENV, stdout=log, stderr=subprocess.STDOUT
                )
            started.append(Replica(index, address, tmp_path / f"audit-{index}", log_path, process))
        for replica in started:
            _wait_serving(replica, pki)
        yield started
    finally:
        for replica in started:
            if replica.process.poll() is None:
                replica.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                replica.process.wait(timeout=WAIT_S)


def _wait_serving(replica: Replica, pki: Pki) -> None:
    """Until the replica's health service says SERVING over mutual TLS (bounded)."""
    options = (("grpc.ssl_target_name_override", "localhost"),)
    with grpc.secure_channel(replica.target, pki.channel_credentials("alice"), options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            assert replica.process.poll() is None, f"replica {replica.index} exited:\n{replica.log_tail()}"
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2.0, wait_for_ready=True)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        wait_until(serving, timeout_s=WAIT_S, interval_s=0.2)


def _client(pki: Pki, target: str, user: str, **options: object) -> gateway.Client:
    return gateway.Client(
        target,
        ca=pki.path("ca.crt"),
        cert=pki.path(f"{user}.crt"),
        key=pki.path(f"{user}.key"),
        token=make_token(pki, sub=user, bind=user),
        server_name="localhost",  # the one server certificate names localhost, not the replicas' addresses
        timeout=CALL_TIMEOUT_S,
        **options,
    )


# ------------------------------------------------------------------------------------------------------ load


@dataclass
class Outcome:
    """What the client saw of one Predict call: answered after ``attempts``, or failed with ``code`` (the SDK's
    error does not say after how many attempts: 0)."""

    ok: bool
    attempts: int
    code: str | None = None


class Load:
    """Callers sending Predict calls, each with its own request id, until stopped; what each call came to."""

    def __init__(self, clients: list[gateway.Client]) -> None:
        self._clients = clients
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.outcomes: dict[str, Outcome] = {}
        self._in_flight: dict[int, float] = {}  # caller -> when its current call started
        self._threads = [threading.Thread(target=self._call, args=(n,), daemon=True) for n in range(THREADS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=CALL_TIMEOUT_S + 5)
        if exc_type is None:
            assert not any(thread.is_alive() for thread in self._threads), "a caller did not finish"

    def _call(self, caller: int) -> None:
        client = self._clients[caller % len(self._clients)]
        number = 0
        while not self._stop.is_set():
            request_id = f"load-{caller}-{number}"
            number += 1
            with self._lock:
                self._in_flight[caller] = time.monotonic()
            try:
                result = client.predict("mlp", {"input": X}, request_id=request_id)
                outcome = Outcome(ok=True, attempts=result.attempts)
            except gateway.GatewayError as exc:
                outcome = Outcome(ok=False, attempts=0, code=exc.code)
            with self._lock:
                del self._in_flight[caller]
                self.outcomes[request_id] = outcome

    def answered(self) -> int:
        with self._lock:
            return sum(outcome.ok for outcome in self.outcomes.values())

    def all_stuck(self, for_s: float) -> bool:
        """Every caller has been waiting on its call for ``for_s``: on a stopped replica, the only slow one."""
        now = time.monotonic()
        with self._lock:
            return len(self._in_flight) == THREADS and all(now - t >= for_s for t in self._in_flight.values())


# ----------------------------------------------------------------------------------------------------- steps


def _predict_records(replica: Replica) -> list[dict]:
    """The replica's records of the load's Predict calls (a last line still being written is not one yet)."""
    path = replica.audit_dir / "audit.log"
    complete = path.read_bytes().split(b"\n")[:-1] if path.exists() else []
    records = [json.loads(line) for line in complete if line.strip()]
    return [r for r in records if r["method"].endswith("/Predict") and r["request_id"].startswith("load-")]


def _roll_out_grant(policies: Path, live: list[Replica], pki: Pki) -> None:
    """Bob may not run digits on any replica; the grant is written once; then it is in force on each, asked
    directly (pick_first to one address), within its reload interval plus a generous bound."""
    flat = [0.0] * 64
    direct = [_client(pki, replica.target, "bob") for replica in live]
    try:
        for client in direct:
            with pytest.raises(gateway.PermissionDeniedError):
                client.predict("digits", flat, request_id="probe-before")
        staged = policies / ".grant.tmp"  # not *.yaml: never read half-written
        staged.write_text(GRANT)
        os.replace(staged, policies / "grant.yaml")

        for client in direct:

            def granted(client: gateway.Client = client) -> bool:
                try:
                    client.predict("digits", flat, request_id="probe-after")
                except gateway.PermissionDeniedError:
                    return False
                return True

            wait_until(granted, timeout_s=RELOAD_INTERVAL_S + WAIT_S, interval_s=0.1)
    finally:
        for client in direct:
            client.close()


def test_fleet_survives_drain_kill_and_policy_roll_out_with_every_answer_audited(replicas, pki, tmp_path):
    drained, killed, last = replicas
    retry = gateway.RetryPolicy(max_attempts=6, initial_backoff_s=0.05, max_backoff_s=0.5, retry_lost_predictions=True)
    fleet = "ipv4:" + ",".join(replica.target for replica in replicas)
    clients = [_client(pki, fleet, "alice", load_balancing="round_robin", retry=retry) for _ in range(2)]
    try:
        with Load(clients) as load:
            wait_until(lambda: all(_predict_records(replica) for replica in replicas), timeout_s=WAIT_S)

            _roll_out_grant(tmp_path / "policies", replicas, pki)

            drained.process.send_signal(signal.SIGTERM)
            # Frozen first, so that calls are certainly in flight on it when it dies: their answers are lost.
            killed.process.send_signal(signal.SIGSTOP)
            wait_until(lambda: load.all_stuck(for_s=1.0), timeout_s=WAIT_S)
            killed.process.kill()
            answered = load.answered()
            wait_until(lambda: load.answered() >= answered + 50, timeout_s=WAIT_S)  # the survivor carries on
    finally:
        for client in clients:
            client.close()
    last.process.send_signal(signal.SIGTERM)
    codes = [replica.exit_code() for replica in replicas]
    assert codes == [0, -signal.SIGKILL, 0], [replica.log_tail() for replica in replicas]

    _check_chains(replicas, pki)
    _check_records_match_answers(load.outcomes, clean=[drained, last], killed=killed)


def _check_chains(replicas: list[Replica], pki: Pki) -> None:
    hmac_key = pki.path("audit-hmac.key").read_bytes().strip()
    for replica in replicas:
        report = verify_files([replica.audit_dir], hmac_key=hmac_key)
        assert report.ok, report.lines()
        assert [chain.chain for chain in report.chains] == [replica.chain]


def _check_records_match_answers(outcomes: dict[str, Outcome], *, clean: list[Replica], killed: Replica) -> None:
    """Records of Predict == calls answered.

    A replica that exited cleanly recorded exactly the calls it answered: each OK record is a call the client saw
    succeed, and no call is OK in two such trails; any other record is a refusal the client retried. The killed
    replica's records may also hold calls whose answer was lost, and only calls that the client then retried.
    """
    succeeded = {request_id for request_id, outcome in outcomes.items() if outcome.ok}
    retried = {request_id for request_id, outcome in outcomes.items() if outcome.attempts > 1}
    failed = {request_id: outcome.code for request_id, outcome in outcomes.items() if not outcome.ok}
    retries = sum(outcome.attempts - 1 for outcome in outcomes.values() if outcome.ok)
    clean_records = [record for replica in clean for record in _predict_records(replica)]
    clean_ok = Counter(r["request_id"] for r in clean_records if r["code"] == "OK")
    killed_records = _predict_records(killed)
    killed_ok = {r["request_id"] for r in killed_records if r["code"] == "OK"}
    print(
        f"\nfleet: {len(outcomes)} calls, {len(succeeded)} answered, {retries} retries ({len(retried)} calls), "
        f"{len(failed)} failures surfaced; 1 replica drained, 1 killed; Predict records: "
        f"{len(clean_records)} on the clean replicas, {len(killed_records)} on the killed one "
        f"({len(killed_ok & set(clean_ok))} of them answers lost and run again)"
    )
    assert not failed, failed  # with retry_lost_predictions, every failure was retried
    assert retries > 0  # the calls in flight on the killed replica

    assert max(clean_ok.values()) == 1  # one to one
    assert set(clean_ok) <= succeeded
    assert {r["request_id"] for r in clean_records if r["code"] != "OK"} <= retried

    assert {r["request_id"] for r in killed_records if r["code"] != "OK"} <= retried
    assert killed_ok & set(clean_ok) <= retried  # answered there, lost, run again elsewhere
    assert succeeded == set(clean_ok) | killed_ok  # no call the client saw succeed is missing
