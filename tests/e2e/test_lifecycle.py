"""Health, graceful shutdown, and `gateway serve` as a process: signals, exit codes, startup errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.conftest import RunningGateway, wait_until
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub, tensor, trailer
from tests.e2e.test_call_boundary import one_then_hold

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GATEWAY = [sys.executable, "-m", "gateway"]
SERVE_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # the tree under test


def health_status(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT).status


def test_health_is_serving_overall_without_a_token(start_gateway):
    gw = start_gateway()
    with gw.channel() as channel:
        assert health_status(channel) == SERVING


def test_health_tells_a_certificate_holder_nothing_about_models(start_gateway):
    # Health needs no token, so it answers the overall status only: whether a model exists is for callers the
    # policy lets see it (GetModelMetadata). An existing and a missing model get the same answers.
    gw = start_gateway()
    with gw.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        checked, watched = set(), set()
        for service in ("model/mlp", "model/no-such-model", "gateway.v1.InferenceService"):
            exc = rpc_error(lambda service=service: health_status(channel, service))
            checked.add((exc.code(), exc.details()))
            updates = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            watched.add(next(updates).status)
            updates.cancel()
    ((code, _details),) = checked  # one answer for all
    assert code == grpc.StatusCode.NOT_FOUND
    assert watched == {health_pb2.HealthCheckResponse.SERVICE_UNKNOWN}


def test_health_needs_mutual_tls(start_gateway):
    gw = start_gateway()
    with gw.channel(None) as channel, pytest.raises(grpc.RpcError):
        health_status(channel)


def test_health_is_not_serving_while_draining_and_calls_are_still_served(start_gateway):
    gw = start_gateway(overrides={"shutdown_drain_s": 1.5})
    stopper = threading.Thread(target=gw.gateway.stop)
    with gw.channel() as channel:
        assert health_status(channel) == SERVING
        stopper.start()
        wait_until(lambda: health_status(channel) == NOT_SERVING, timeout_s=TIMEOUT, interval_s=0.05)
        reply = stub(channel).Predict(
            predict_request("mlp", {"input": np.zeros((1, 784), np.float32)}),
            metadata=auth(gw.token()),
            timeout=TIMEOUT,
        )
        assert reply.model_version == "2"  # draining: still serving, only health says to go elsewhere
    stopper.join(timeout=TIMEOUT)
    assert not stopper.is_alive()


def test_graceful_shutdown_lets_in_flight_calls_finish(start_gateway):
    gw = start_gateway(overrides={"shutdown_grace_s": 20.0})
    big = np.random.default_rng(0).random((12000, 784), dtype=np.float32)  # 37 MB, ~0.5 s of inference
    results: list[object] = []

    def slow_call() -> None:
        with gw.channel() as channel:
            try:
                response = stub(channel).Predict(
                    predict_request("mlp", {"input": big}), metadata=auth(gw.token()), timeout=30
                )
                results.append(response.model_version)
            except grpc.RpcError as exc:
                results.append((exc.code(), exc.details()))

    threads = [threading.Thread(target=slow_call) for _ in range(3)]
    for thread in threads:
        thread.start()
    # Stop once all three are running their model (their messages have arrived); each runs for about a second.
    placement = gw.gateway.placement
    wait_until(lambda: placement.inline_runs + placement.pool_runs >= 3, timeout_s=30, interval_s=0.01)
    gw.gateway.stop(grace_s=20.0)
    for thread in threads:
        thread.join(timeout=30)
    records = gw.audit_records()
    # Every call ran to its end and was recorded OK: none was cancelled by the stop.
    assert [r["code"] for r in records] == ["OK"] * 3, [(r["code"], r["reason"]) for r in records]
    # And every client got its answer: the connections closed only after the answers had left (docs/deploy.md,
    # "Termination": closing one while its client still reads the answer loses it).
    assert results == ["2"] * 3, results


def test_after_the_drain_new_calls_are_refused_as_safe_to_retry_until_the_calls_in_flight_are_done(start_gateway):
    # The listener and connections stay open past the drain while a call is in flight (closing a connection under
    # an answer can lose it): new calls get UNAVAILABLE marked x-retry-safe, which the SDK retries, and a record.
    gw = start_gateway(overrides={"shutdown_grace_s": 20.0})
    token, release = gw.token(), threading.Event()
    x = np.zeros((1, 784), np.float32)
    stopper = threading.Thread(target=gw.gateway.stop)
    with gw.channel() as channel:
        client = stub(channel)
        held = client.PredictStream(
            one_then_hold(pb.PredictRequest(model_name="mlp", inputs=[tensor("input", x)]), release),
            metadata=auth(token),
            timeout=TIMEOUT,
        )
        assert next(held).WhichOneof("outcome") == "response"
        stopper.start()
        attempts: list[tuple[str, grpc.RpcError | None]] = []

        def refused() -> bool:
            request_id = f"after-drain-{len(attempts)}"
            try:
                client.Predict(
                    predict_request("mlp", {"input": x}),
                    metadata=auth(token, ("x-request-id", request_id)),
                    timeout=TIMEOUT,
                )
                attempts.append((request_id, None))
            except grpc.RpcError as exc:
                attempts.append((request_id, exc))
            return attempts[-1][1] is not None

        wait_until(refused, timeout_s=TIMEOUT, interval_s=0.01)
        release.set()
        assert list(held) == []  # the call in flight still ends normally
    stopper.join(timeout=30)
    assert not stopper.is_alive()
    request_id, exc = attempts[-1]
    assert exc is not None and exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    assert trailer(exc, "x-retry-safe") == "true"
    (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id]
    assert (record["code"], record["reason"]) == ("UNAVAILABLE", "shutting down")
    # The certificate's identity is taken before the refusal (it costs nothing): every record names its peer.
    refused = [r for r in gw.audit_records() if r["reason"] == "shutting down"]
    assert {r["cert_identity"] for r in refused} == {"spiffe://gateway.local/client/alice"}
    assert all(r["cert_sha256"] for r in refused)
    assert [r["code"] for r in gw.audit_records() if r["event"] == "stream"] == ["OK"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``gateway serve`` in a child process, with ``env`` added to its environment; its log goes to
    ``tmp_path/serve.log`` (an unread pipe could fill and block the gateway on a log write)."""
    with (tmp_path / "serve.log").open("wb") as log:
        return subprocess.Popen(
            [*GATEWAY, "serve", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**SERVE_ENV, **(env or {})},
        )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal_with_exit_zero(pki, demo_models, tmp_path, signum):
    port = free_port()
    policies = tmp_path / "policies"
    policies.mkdir()
    args = [
        "--certs",
        str(pki.server_dir),
        "--models",
        str(demo_models),
        "--policies",
        str(policies),
        "--listen",
        f"127.0.0.1:{port}",
        "--audit-log",
        str(tmp_path / "audit.log"),
    ]
    process = serve(args, tmp_path)
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", pki.channel_credentials("alice")) as channel:
            wait_until(lambda: _serving(channel), timeout_s=30, interval_s=0.2)
        process.send_signal(signum)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        process.kill()
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log[-3000:]
    assert "gateway_stopped" in log
    # No ./gateway.yaml where it ran and no --config: the log says that no file was read.
    (loaded,) = [json.loads(line) for line in log.splitlines() if '"config_loaded"' in line]
    assert loaded["path"] is None and "no config file" in loaded["detail"]
    assert "listen" in loaded["flags"] and "tls.cert" in loaded["flags"]


def test_sigterm_turns_both_health_ports_not_serving_serves_through_the_drain_then_exits_0(pki, demo_models, tmp_path):
    """Kubernetes' termination sequence: SIGTERM, the readiness probe fails while calls still arrive (the endpoint's
    removal takes a while to reach every client), then the gateway stops within the grace period."""
    port, probe_port = free_port(), free_port()
    drain_s, grace_s = 8, 5  # the drain outlasts the call below even on a loaded machine
    env = {
        "GATEWAY_HEALTH__LISTEN": f"127.0.0.1:{probe_port}",
        "GATEWAY_SHUTDOWN_DRAIN_S": str(drain_s),
        "GATEWAY_SHUTDOWN_GRACE_S": str(grace_s),
    }
    process = serve(serve_args(pki, demo_models, tmp_path, port), tmp_path, env)
    caller = RunningGateway(None, port, pki, tmp_path / "audit" / "audit.log", tmp_path / "policies")
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{probe_port}") as probe,
            grpc.secure_channel(caller.target, pki.channel_credentials("alice")) as channel,
        ):
            wait_until(lambda: _serving(probe) and _serving(channel), timeout_s=30, interval_s=0.2)
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: health_status(probe) == NOT_SERVING, timeout_s=TIMEOUT, interval_s=0.05)
            assert health_status(channel) == NOT_SERVING
            reply = stub(channel).Predict(
                predict_request("mlp", {"input": np.zeros((1, 784), np.float32)}),
                metadata=auth(caller.token()),
                timeout=TIMEOUT,
            )
            assert reply.model_version == "2"  # draining: still serving
        code = process.wait(timeout=drain_s + grace_s + 20)
    finally:
        process.kill()
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log[-3000:]
    assert "gateway_stopped" in log
    assert [record["code"] for record in caller.audit_records()] == ["OK"]


def test_serve_reads_gateway_yaml_where_it_runs_and_flags_override_it(pki, demo_models, tmp_path):
    port = free_port()
    policies = tmp_path / "policies"
    policies.mkdir()
    (tmp_path / "gateway.yaml").write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"tls: {{cert: {pki.path('server.crt')}, key: {pki.path('server.key')}, client_ca: {pki.path('ca.crt')}}}\n"
        f"auth: {{jwks: {pki.path('jwks.json')}}}\n"
        f"models: {{repository: {demo_models}}}\n"
        "policies: {directory: policies}\n"  # relative to the file's folder
        "audit: {path: audit/audit.log}\n"
        "log_format: json\n"
        "log_level: warning\n"
    )
    # No --config: ./gateway.yaml is read. The log flags win over the file's json and warning.
    code, log = serve_until_stopped(["--log-format", "console", "--log-level", "info"], tmp_path, pki, port)
    assert code == 0, log[-3000:]
    (loaded,) = [line for line in log.splitlines() if "config_loaded" in line]
    assert f"path={tmp_path / 'gateway.yaml'}" in loaded and "flags=['log_format', 'log_level']" in loaded
    assert not any(line.startswith("{") for line in log.splitlines())  # console, not the file's json
    assert (tmp_path / "audit" / "audit.log").exists()


def test_serve_takes_settings_from_gateway_variables_under_flags_and_logs_only_their_keys(pki, demo_models, tmp_path):
    port = free_port()
    (tmp_path / "policies").mkdir()
    env = {
        "GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "GATEWAY_MODELS__REPOSITORY": str(demo_models),
        "GATEWAY_POLICIES__DIRECTORY": "policies",  # relative to the working directory
        "GATEWAY_AUDIT__PATH": "audit/audit.log",
        "GATEWAY_AUDIT__CHAIN_ID": "gateway-5d8f9c7b6-x2x7q",
        "GATEWAY_LOG_LEVEL": "error",  # the flag below wins
        "GATEWAY_TARGET": "elsewhere:1",  # a client command's variable: serve leaves it alone
    }
    code, log = serve_until_stopped(["--certs", str(pki.server_dir), "--log-level", "info"], tmp_path, pki, port, env)
    assert code == 0, log[-3000:]
    (loaded,) = [json.loads(line) for line in log.splitlines() if '"config_loaded"' in line]
    assert loaded["environment"] == sorted(
        ["listen", "models.repository", "policies.directory", "audit.path", "audit.chain_id", "log_level"]
    )
    assert "log_level" in loaded["flags"]  # info, so config_loaded was logged at all
    assert "x2x7q" not in json.dumps(loaded)  # names, never values
    checkpoint = json.loads((tmp_path / "audit" / "audit.log.checkpoint").read_text())
    assert checkpoint["chain"] == "gateway-5d8f9c7b6-x2x7q"


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"GATEWAY_WORKER": "2"},
            "error: GATEWAY_WORKER (did you mean 'GATEWAY_WORKERS'?): unknown environment variable",
        ),
        ({"GATEWAY_WORKERS": "x"}, "error: GATEWAY_WORKERS: expected a non-negative integer, got 'x'"),
        ({"GATEWAY_MODELS__STRICT": "yes"}, "error: GATEWAY_MODELS__STRICT: expected true or false, got 'yes'"),
        ({"GATEWAY_MODELS__REPOSITORY": "/no/such"}, "error: GATEWAY_MODELS__REPOSITORY: /no/such is not a directory"),
    ],
    ids=["unknown", "integer", "bool", "missing-folder"],
)
def test_serve_variable_mistakes_are_one_line_exit_2_naming_the_variable(pki, tmp_path, env, line):
    result = run_serve(["--certs", str(pki.server_dir)], tmp_path, env)  # the material: checks get to the folders
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(line), result.stderr


def test_port_in_use_is_one_line_exit_2_and_the_audit_trail_is_not_created(pki, demo_models, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve(serve_args(pki, demo_models, tmp_path, port), tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: listen: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "choose another address with --listen HOST:PORT or listen in the config file\n"
    )
    assert not (tmp_path / "audit").exists()


def test_gateway_started_on_a_port_in_use_fails_before_opening_its_audit_trail(start_gateway, tmp_path):
    from gateway.config import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match=rf"^listen: cannot listen on {listen}: "):
            start_gateway(overrides={"listen": listen})
    assert not (tmp_path / "audit-0").exists()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--certs", "no-such-folder"], "error: --certs: no-such-folder is not a directory"),
        (["--config", "no-such.yaml"], "error: no-such.yaml: cannot read: No such file or directory"),
        (["--listen", "nowhere"], "error: listen: 'nowhere' is not HOST:PORT"),
        (["--log-level", "loud"], "error: argument --log-level: invalid choice: 'loud'"),
        (["--workers", "many"], "error: argument --workers: invalid int value: 'many'"),
    ],
    ids=["certs-folder", "config-file", "listen", "log-level", "workers"],
)
def test_serve_mistakes_are_one_line_exit_2(tmp_path, args, line):
    result = run_serve(args, tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(line), result.stderr


def serve_until_stopped(
    args: list[str], tmp_path: Path, pki, port: int, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """``gateway serve`` until it is SERVING on ``port``, then SIGTERM: its exit code and its log."""
    process = serve(args, tmp_path, env)
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", pki.channel_credentials("alice")) as channel:
            wait_until(lambda: _serving(channel), timeout_s=30, interval_s=0.2)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    finally:
        process.kill()
    log = (tmp_path / "serve.log").read_text()
    return code, log


def serve_args(pki, demo_models: Path, tmp_path: Path, port: int) -> list[str]:
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "all.yaml").write_text(
        "rules:\n  - id: all\n    effect: allow\n    principals: {subjects: [alice]}\n    models: ['*']\n    actions: '*'\n"
    )
    return [
        *("--certs", str(pki.server_dir), "--models", str(demo_models), "--policies", str(policies)),
        *("--listen", f"127.0.0.1:{port}", "--audit-log", str(tmp_path / "audit" / "audit.log")),
    ]


def test_workers_share_the_port_each_with_its_own_audit_chain(pki, demo_models, tmp_path):
    from gateway.audit import verify_files
    from tests.conftest import RunningGateway

    port = free_port()
    process = serve([*serve_args(pki, demo_models, tmp_path, port), "--workers", "2"], tmp_path)
    token = RunningGateway(None, port, pki, tmp_path, tmp_path).token()
    x = np.zeros((1, 784), np.float32)
    calls = 40
    try:
        for _ in range(calls):  # a new connection per call: the kernel spreads them over both workers
            with grpc.secure_channel(f"127.0.0.1:{port}", pki.channel_credentials("alice")) as channel:
                wait_until(lambda ch=channel: _serving(ch), timeout_s=30, interval_s=0.2)
                reply = stub(channel).Predict(
                    predict_request("mlp", {"input": x}), metadata=auth(token), timeout=TIMEOUT
                )
                assert reply.model_version == "2"
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        process.kill()
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log[-3000:]
    report = verify_files([tmp_path / "audit"], hmac_key=pki.read("audit-hmac.key").strip())
    assert report.ok, report.lines()
    chains = {chain.chain: chain.last_seq for chain in report.chains}
    assert set(chains) == {"main-w0", "main-w1"}
    assert sum(chains.values()) == calls  # every call audited once, in one of the two chains
    assert log.count('"gateway_stopped"') == 2


def test_a_second_gateway_on_the_same_audit_trail_is_refused(pki, demo_models, tmp_path):
    port = free_port()
    first = serve(serve_args(pki, demo_models, tmp_path, port), tmp_path)
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", pki.channel_credentials("alice")) as channel:
            wait_until(lambda: _serving(channel), timeout_s=30, interval_s=0.2)
        second = run_serve(serve_args(pki, demo_models, tmp_path, free_port()), tmp_path)
        assert second.returncode == 1
        assert "in use by another process" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


def _serving(channel: grpc.Channel) -> bool:
    try:
        return health_status(channel) == SERVING
    except grpc.RpcError:
        return False


def run_serve(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GATEWAY, "serve", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={**SERVE_ENV, **(env or {})},
    )


def test_serve_without_tls_material_is_a_usage_error_saying_how_to_give_it(tmp_path):
    result = run_serve(["--listen", "127.0.0.1:0"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: tls.cert: required for mutual TLS; give --certs DIR")
    assert "set tls.cert in the config file (--config FILE; ./gateway.yaml is read when it exists)" in result.stderr


def test_bad_config_key_is_a_usage_error_naming_the_key(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("limits:\n  max_mesage_bytes: 10\n")
    result = run_serve(["--config", str(config)], tmp_path)
    assert result.returncode == 2
    assert "limits.max_mesage_bytes: unknown key (did you mean 'max_message_bytes'?)" in result.stderr


def test_bad_config_value_is_a_usage_error_naming_the_key(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text("audit:\n  fsync: sometimes\n")
    result = run_serve(["--config", str(config)], tmp_path)
    assert result.returncode == 2
    assert "audit.fsync" in result.stderr


def test_serve_refuses_a_certs_folder_holding_signing_keys_in_one_line(pki, demo_models, tmp_path):
    flat = tmp_path / "flat"  # the server's files with the signing keys beside them, as the old layout had it
    shutil.copytree(pki.server_dir, flat)
    shutil.copy(pki.path("ca.key"), flat / "ca.key")
    for certs, message in [
        (pki.dir, f"error: --certs: {pki.dir} holds the whole set; give the gateway its own: --certs {pki.server_dir}"),
        (flat, f"error: --certs: {flat} holds ca.key, a signing key the gateway never needs; move it out"),
    ]:
        args = serve_args(pki, demo_models, tmp_path, 0)
        args[args.index(str(pki.server_dir))] = str(certs)
        result = run_serve(args, tmp_path)
        assert result.returncode == 2
        assert result.stderr.startswith(message) and len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("name", "key", "mode"), [("server.key", "tls.key", 0o644), ("audit-hmac.key", "audit.hmac_key_file", 0o640)]
)
def test_serve_refuses_a_key_file_open_to_group_or_others_in_one_line(pki, demo_models, tmp_path, name, key, mode):
    certs = tmp_path / "server"
    shutil.copytree(pki.server_dir, certs)
    (certs / name).chmod(mode)
    args = serve_args(pki, demo_models, tmp_path, 0)
    args[args.index(str(pki.server_dir))] = str(certs)
    result = run_serve(args, tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    path = certs / name
    assert errors == [f"error: {key}: {path} is accessible to group or others (mode {mode:04o}); run: chmod 600 {path}"]


def test_gateway_refuses_an_hmac_secret_file_open_to_group_or_others(start_gateway, tmp_path):
    from gateway.config import ConfigError

    secret = tmp_path / "hmac.secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o604)
    with pytest.raises(ConfigError, match=rf"^auth\.hmac_secret_file: {secret} is accessible .*chmod 600 {secret}$"):
        start_gateway(overrides={"auth.hmac_secret_file": secret, "auth.algorithms": ["RS256", "HS256"]})


def test_dev_insecure_transport_refuses_a_public_address(tmp_path):
    result = run_serve(["--listen", "0.0.0.0:0", "--dev", "insecure_transport", "--dev", "no_auth"], tmp_path)
    assert result.returncode == 2
    assert "loopback" in result.stderr


def test_dev_no_auth_refuses_a_public_address(pki, demo_models, tmp_path):
    args = serve_args(pki, demo_models, tmp_path, 0)
    args[args.index("127.0.0.1:0")] = "0.0.0.0:0"
    result = run_serve([*args, "--dev", "no_auth"], tmp_path)
    assert result.returncode == 2
    assert "error: dev_no_auth: only allowed on a loopback address, not '0.0.0.0'" in result.stderr


def test_unloadable_model_stops_a_strict_start_with_one_line_naming_the_file(pki, demo_models, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(demo_models, models)
    (models / "mlp" / "3").mkdir()
    (models / "mlp" / "3" / "model.onnx").write_bytes(b"not a model")
    policies = tmp_path / "policies"
    policies.mkdir()
    config = tmp_path / "gateway.yaml"
    config.write_text("models:\n  strict: true\n")
    result = run_serve(
        [
            *("--config", str(config), "--certs", str(pki.server_dir), "--models", str(models)),
            *("--policies", str(policies), "--listen", "127.0.0.1:0", "--audit-log", str(tmp_path / "audit.log")),
        ],
        tmp_path,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: cannot start: {models / 'mlp' / '3' / 'model.onnx'}: onnxruntime cannot load")


def test_an_audit_path_that_cannot_be_created_is_one_line_naming_audit_path(pki, demo_models, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the audit folder should be\n")
    args = serve_args(pki, demo_models, tmp_path, 0)
    args[args.index("--audit-log") + 1] = str(blocker / "audit.log")
    result = run_serve(args, tmp_path)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot start: audit.path: cannot open {blocker}: File exists"], result.stderr


def test_serve_whose_key_server_cannot_be_reached_exits_2_naming_the_url(pki, demo_models, tmp_path):
    # Fail closed at start: a gateway that cannot verify any token must not come up.
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{closed.getsockname()[1]}/jwks.json"
    (tmp_path / "policies").mkdir()
    config = tmp_path / "gateway.yaml"
    server = pki.server_dir
    config.write_text(
        f"tls: {{cert: {server}/server.crt, key: {server}/server.key, client_ca: {server}/ca.crt}}\n"
        f"auth: {{jwks_url: '{url}', jwks_ca: {server}/ca.crt}}\n"
        f"models: {{repository: {demo_models}}}\npolicies: {{directory: policies}}\n"
        "listen: 127.0.0.1:0\naudit: {path: audit/audit.log}\n"
    )
    result = run_serve(["--config", str(config)], tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # the rest: JSON logs
    assert len(errors) == 1 and errors[0].startswith(f"error: auth.jwks_url: cannot fetch the key set: {url}: connect")
    assert not (tmp_path / "audit" / "audit.log").exists()
