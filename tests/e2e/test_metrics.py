"""Prometheus metrics: scraped over real HTTP(S) from the real listener and parsed with prometheus_client's parser."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway._pb.inference import grpc_service_pb2 as oip_pb
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
from tests.conftest import wait_until
from tests.e2e.helpers import TIMEOUT, auth, closed_by_server, predict_request, rpc_error, stub
from tests.e2e.test_lifecycle import _serving, free_port, serve, serve_args

METRICS = {"metrics.listen": "127.0.0.1:0"}
PREDICT = "/gateway.v1.InferenceService/Predict"
X = np.zeros((1, 784), np.float32)

Samples = Counter[tuple[str, frozenset[tuple[str, str]]]]


def scrape(url: str, context: ssl.SSLContext | None = None) -> Samples:
    """Every sample of one scrape, by name and labels."""
    with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as response:  # noqa: S310 (our own URL)
        return scrape_text(response.read().decode())


def scrape_text(text: str) -> Samples:
    """Every sample of an exposition, by name and labels."""
    samples: Samples = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] += sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str) -> set[frozenset[tuple[str, str]]]:
    return {labels for sample_name, labels in samples if sample_name == name}


@pytest.fixture
def metered(start_gateway):
    # Thousands of refusals of one principal are counted here, not blocked (limits.per_principal.max_refusals).
    gw = start_gateway(overrides={**METRICS, "limits.per_principal.max_refusals": 0})
    return gw, f"http://127.0.0.1:{gw.gateway.metrics.port}/metrics"


def test_counters_move_by_exactly_the_calls_allowed_and_refused(metered):
    gw, url = metered
    allowed, refused = 3, 2
    before = scrape(url)
    with gw.channel("alice") as alice, gw.channel("bob") as bob:
        for _ in range(allowed):
            stub(alice).Predict(predict_request("mlp", {"input": X}), metadata=auth(gw.token()), timeout=TIMEOUT)
        for _ in range(refused):
            rpc_error(lambda: stub(alice).Predict(predict_request("mlp", {"input": X}), timeout=TIMEOUT))
        denied = rpc_error(
            lambda: stub(bob).Predict(
                predict_request("mlp", {"input": X}), metadata=auth(gw.token("bob", bind="bob")), timeout=TIMEOUT
            )
        )
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        oip_grpc.GRPCInferenceServiceStub(alice).ServerLive(
            oip_pb.ServerLiveRequest(), metadata=auth(gw.token()), timeout=TIMEOUT
        )
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    calls = "gateway_calls_total"
    assert delta(calls, method=PREDICT, model="mlp", version="2", code="OK") == allowed
    assert delta(calls, method=PREDICT, model="-", version="-", code="UNAUTHENTICATED") == refused
    assert delta(calls, method=PREDICT, model="mlp", version="2", code="PERMISSION_DENIED") == 1
    oip_live = "/inference.GRPCInferenceService/ServerLive"
    assert delta(calls, method=oip_live, model="-", version="-", code="OK") == 1
    refusals = "gateway_refusals_total"
    assert delta(refusals, reason="token", detail="missing token") == refused
    assert delta(refusals, reason="policy_deny", detail="default deny") == 1
    assert delta("gateway_call_duration_seconds_count", method=PREDICT) == allowed + refused + 1
    assert delta("gateway_authentication_duration_seconds_count") == allowed + refused + 2
    assert delta("gateway_model_run_duration_seconds_count", model="mlp", version="2") == allowed
    assert delta("gateway_audit_records_written_total") == allowed + refused + 2
    assert delta("gateway_calls_in_flight") == 0
    assert value(after, "gateway_audit_sink_up") == 1
    assert value(after, "gateway_model_versions_loaded", model="mlp") == 2


def test_invented_model_and_method_names_add_no_series(metered):
    gw, url = metered
    with gw.channel("alice") as alice:
        # One call of each kind first, so that the fixed series they use exist before the count.
        rpc_error(
            lambda: stub(alice).Predict(predict_request("nope", {"input": X}), metadata=auth(gw.token()), timeout=5)
        )
        invented = alice.unary_unary("/invented.Service/Method")
        rpc_error(lambda: invented(b"", metadata=auth(gw.token()), timeout=TIMEOUT))
        before = scrape(url)
        token = gw.token()
        for index in range(1000):
            error = rpc_error(
                lambda i=index: stub(alice).Predict(
                    predict_request(f"invented-{i}", {"input": X}), metadata=auth(token), timeout=TIMEOUT
                )
            )
            assert error.code() == grpc.StatusCode.NOT_FOUND
            rpc_error(
                lambda i=index: alice.unary_unary(f"/invented{i}.Service/M")(b"", metadata=auth(token), timeout=5)
            )
    after = scrape(url)
    for name in ("gateway_calls_total", "gateway_refusals_total", "gateway_call_duration_seconds_count"):
        assert series(after, name) == series(before, name), name
    assert (
        value(after, "gateway_calls_total", method=PREDICT, model="-", version="-", code="NOT_FOUND")
        - value(before, "gateway_calls_total", method=PREDICT, model="-", version="-", code="NOT_FOUND")
        == 1000
    )
    assert (
        value(after, "gateway_calls_total", method="-", model="-", version="-", code="UNIMPLEMENTED")
        - value(before, "gateway_calls_total", method="-", model="-", version="-", code="UNIMPLEMENTED")
        == 1000
    )


def test_security_posture_gauges_come_from_the_stores(metered):
    from cryptography import x509

    gw, url = metered
    samples = scrape(url)
    server = x509.load_pem_x509_certificate(gw.pki.read("server.crt"))
    ca = x509.load_pem_x509_certificate(gw.pki.read("ca.crt"))
    crl = x509.load_pem_x509_crl(gw.pki.read("crl.pem"))
    not_after = "gateway_certificate_not_after_timestamp_seconds"
    assert value(samples, not_after, role="server") == server.not_valid_after_utc.timestamp()
    assert value(samples, not_after, role="client_ca") == ca.not_valid_after_utc.timestamp()
    assert crl.next_update_utc is not None
    assert value(samples, "gateway_crl_next_update_timestamp_seconds") == crl.next_update_utc.timestamp()
    for store in ("jwks", "policies", "crl", "server-tls", "models"):
        assert value(samples, "gateway_last_reload_timestamp_seconds", store=store) > 0, store
    assert value(samples, "process_cpu_seconds_total") > 0  # the library's process metrics


def _client_context(pki, client_pki=None, client: str | None = None) -> ssl.SSLContext:
    """Trusts the server (pki's CA); presents ``client``'s certificate from ``client_pki`` when given."""
    context = ssl.create_default_context(cafile=str(pki.path("ca.crt")))
    if client_pki is not None and client is not None:
        context.load_cert_chain(client_pki.path(f"{client}.crt"), client_pki.path(f"{client}.key"))
    return context


def test_https_listener_requires_a_client_certificate_from_the_client_ca(start_gateway, pki, other_pki):
    gw = start_gateway(overrides={**METRICS, "metrics.tls": True})
    url = f"https://localhost:{gw.gateway.metrics.port}/metrics"
    assert value(scrape(url, _client_context(pki, pki, "alice")), "gateway_audit_sink_up") == 1
    for refused in (_client_context(pki), _client_context(pki, other_pki, "alice")):
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            scrape(url, refused)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(url.replace("https://", "http://"))


def test_no_listener_unless_metrics_listen_is_set(start_gateway):
    assert start_gateway().gateway.metrics is None


def test_one_scrape_counts_the_calls_of_both_workers(pki, demo_models, tmp_path):
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"metrics:\n  listen: 127.0.0.1:{metrics_port}\n")
    args = [*serve_args(pki, demo_models, tmp_path, port), "--workers", "2", "--config", str(config)]
    process = serve(args, tmp_path)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    from gateway.audit import verify_files
    from tests.conftest import RunningGateway

    token = RunningGateway(None, port, pki, tmp_path, tmp_path).token()
    calls = 40
    try:
        for _ in range(calls):  # a new connection per call: the kernel spreads them over both workers
            with grpc.secure_channel(f"127.0.0.1:{port}", pki.channel_credentials("alice")) as channel:
                wait_until(lambda ch=channel: _serving(ch), timeout_s=30, interval_s=0.2)
                stub(channel).Predict(predict_request("mlp", {"input": X}), metadata=auth(token), timeout=TIMEOUT)
        samples = scrape(url)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        process.kill()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert value(samples, "gateway_calls_total", method=PREDICT, model="mlp", version="2", code="OK") == calls
    # The workers share the supervisor's stderr: each of their lines says which one it is, the supervisor's none.
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
    assert sorted(line.get("worker") for line in lines if line["event"] == "gateway_started") == [0, 1]
    assert all("worker" not in line for line in lines if line["event"] in ("workers_started", "workers_stopped"))
    report = verify_files([tmp_path / "audit"], hmac_key=pki.read("audit-hmac.key").strip())
    assert all(chain.last_seq > 0 for chain in report.chains) and len(report.chains) == 2  # both workers served
    assert value(samples, "gateway_audit_sink_up") == 1
    assert value(samples, "gateway_model_versions_loaded", model="mlp") == 2


def test_a_metrics_port_in_use_fails_the_start_before_the_audit_trail_is_opened(start_gateway, tmp_path):
    import socket

    from gateway.config import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^metrics\.listen: cannot listen on 127\.0\.0\.1:{port}: "):
            start_gateway(overrides={"metrics.listen": f"127.0.0.1:{port}"})
    assert not list(tmp_path.glob("audit-*/audit.log"))


def test_a_stream_counts_once_as_a_call(metered):
    gw, url = metered
    stream = "/gateway.v1.InferenceService/PredictStream"
    before = scrape(url)
    with gw.channel("alice") as alice:
        requests = [predict_request("mlp", {"input": X}) for _ in range(3)]
        replies = list(stub(alice).PredictStream(iter(requests), metadata=auth(gw.token()), timeout=TIMEOUT))
    assert len(replies) == 3
    after = scrape(url)
    labels = {"method": stream, "model": "-", "version": "-", "code": "OK"}
    assert value(after, "gateway_calls_total", **labels) - value(before, "gateway_calls_total", **labels) == 1
    assert (
        sum(v for (name, _), v in after.items() if name == "gateway_calls_total")
        - sum(v for (name, _), v in before.items() if name == "gateway_calls_total")
        == 1
    )
    run = "gateway_model_run_duration_seconds_count"
    assert value(after, run, model="mlp", version="2") - value(before, run, model="mlp", version="2") == 3


def test_sink_down_shows_in_the_gauge_and_the_refusals(metered):
    from tests.e2e.test_audit_trail import _point_at_dev_full

    gw, url = metered
    before = scrape(url)
    assert value(before, "gateway_audit_sink_up") == 1
    directory = gw.audit_path.parent
    moved = directory.with_name("audit-moved")
    _point_at_dev_full(gw.gateway.audit)
    directory.rename(moved)  # and reopening fails too, for as long as the outage lasts
    directory.write_text("not a directory")
    try:
        with gw.channel("alice") as alice:
            error = rpc_error(
                lambda: stub(alice).Predict(
                    predict_request("mlp", {"input": X}), metadata=auth(gw.token()), timeout=TIMEOUT
                )
            )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        down = scrape(url)
    finally:
        directory.unlink()
        moved.rename(directory)
    assert value(down, "gateway_audit_sink_up") == 0
    unavailable = {"reason": "unavailable", "detail": "-"}
    assert (
        value(down, "gateway_refusals_total", **unavailable) - value(before, "gateway_refusals_total", **unavailable)
        == 1
    )


def _https(gw) -> str:
    return f"https://localhost:{gw.gateway.metrics.port}/metrics"


def _scrape_status(url: str, context: ssl.SSLContext) -> int:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as response:  # noqa: S310 (our own URL)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=(source, 0))
    return s


def test_an_idle_connection_does_not_stop_https_scrapes(start_gateway, pki):
    gw = start_gateway(overrides={**METRICS, "metrics.tls": True})
    with _connect(gw.gateway.metrics.port):  # connected, and never a ClientHello
        assert _scrape_status(_https(gw), _client_context(pki, pki, "alice")) == 200


def test_metrics_connections_are_capped_per_source_and_in_all_and_idle_ones_closed_after_the_timeout(start_gateway):
    gw = start_gateway(
        overrides={
            **METRICS,
            "metrics.max_connections": 3,
            "metrics.max_connections_per_source": 2,
            "metrics.timeout_s": 1.0,
        }
    )
    port = gw.gateway.metrics.port
    held = [_connect(port), _connect(port), _connect(port, "127.0.0.2")]
    past_source_cap, past_cap = _connect(port), _connect(port, "127.0.0.3")
    try:
        wait_until(lambda: closed_by_server(past_source_cap) and closed_by_server(past_cap), timeout_s=TIMEOUT)
        # metrics.timeout_s: the idle ones are closed, their threads and slots free again.
        wait_until(lambda: all(closed_by_server(s) for s in held), timeout_s=TIMEOUT)
    finally:
        for s in (*held, past_source_cap, past_cap):
            s.close()
    wait_until(lambda: value(scrape(f"http://127.0.0.1:{port}/metrics"), "gateway_audit_sink_up") == 1)


def test_a_revoked_certificate_cannot_scrape(start_gateway, pki_copy):
    from tests.conftest import ROOT, run_script

    run_script(ROOT / "scripts/gen_certs.sh", "--revoke", "alice", pki_copy.dir)
    gw = start_gateway(overrides={**METRICS, "metrics.tls": True}, use_pki=pki_copy)
    assert _scrape_status(_https(gw), _client_context(pki_copy, pki_copy, "alice")) == 403
    assert _scrape_status(_https(gw), _client_context(pki_copy, pki_copy, "bob")) == 200


def test_only_the_allowed_scraper_identities_may_scrape(start_gateway, pki):
    allowed = ["spiffe://gateway.local/client/bob"]
    gw = start_gateway(overrides={**METRICS, "metrics.tls": True, "metrics.allowed_identities": allowed})
    assert _scrape_status(_https(gw), _client_context(pki, pki, "alice")) == 403
    assert _scrape_status(_https(gw), _client_context(pki, pki, "bob")) == 200


@pytest.mark.parametrize("https", [False, True], ids=["http", "https"])
def test_a_peer_trickling_bytes_is_closed_at_the_connection_deadline(start_gateway, pki, https):
    """metrics.timeout_s bounds each read; a request sent a byte at a time just inside it must not hold a slot past
    3x it in all (the TLS handshake is bounded as a whole by the ssl module; the HTTP request was not)."""
    overrides = {**METRICS, "metrics.timeout_s": 1.0, "metrics.tls": https}
    gw = start_gateway(overrides=overrides)
    trickler = _connect(gw.gateway.metrics.port)
    if https:  # a scraper with a good certificate, past the handshake
        trickler = _client_context(pki, pki, "alice").wrap_socket(trickler, server_hostname="localhost")
    request = b"GET /metrics HTTP/1.1\r\nX-Trickle: " + b"a" * 100
    closed_after = None
    try:
        started = time.monotonic()
        for byte in request:  # 100 bytes at 0.2 s: a request line and a header that never ends, for 20 s
            try:
                trickler.send(bytes([byte]))
                trickler.settimeout(0.2)
                if trickler.recv(65536) == b"":
                    raise ConnectionResetError
            except TimeoutError:
                continue  # nothing from the server yet: still open
            except OSError:
                closed_after = time.monotonic() - started
                break
    finally:
        trickler.close()
    assert closed_after is not None, "the trickling peer held its connection for 20 s"


def _scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310 (our own URL)
        return str(response.read().decode())


LATENCY_HISTOGRAMS = (
    "gateway_call_duration_seconds",
    "gateway_authentication_duration_seconds",
    "gateway_model_run_duration_seconds",
    "gateway_audit_commit_duration_seconds",
)


def test_latency_histograms_resolve_calls_from_100_microseconds(metered):
    gw, url = metered
    with gw.channel("alice") as alice:
        stub(alice).Predict(predict_request("mlp", {"input": X}), metadata=auth(gw.token()), timeout=TIMEOUT)
    samples = scrape(url)
    for name in LATENCY_HISTOGRAMS:
        bounds = sorted({float(dict(labels)["le"]) for labels in series(samples, f"{name}_bucket")})
        assert bounds[0] <= 0.0001, name  # steps of ~50 us (a cached token check) are resolved too
        # a p50 and a p99 of calls taking about a millisecond fall in different buckets
        assert len([b for b in bounds if b <= 0.005]) >= 8, (name, bounds)


def test_promtool_accepts_the_exposition(metered, promtool):
    gw, url = metered
    with gw.channel("alice") as alice:
        stub(alice).Predict(predict_request("mlp", {"input": X}), metadata=auth(gw.token()), timeout=TIMEOUT)
        rpc_error(lambda: stub(alice).Predict(predict_request("mlp", {"input": X}), timeout=TIMEOUT))
    text = _scrape_text(url)
    result = subprocess.run(
        [str(promtool), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stdout + result.stderr
    assert "_created" not in text


def test_a_refused_reload_is_counted_per_store_and_the_last_success_kept(start_gateway, model_repo):
    gw = start_gateway(overrides={**METRICS, "models.repository": model_repo})
    url = f"http://127.0.0.1:{gw.gateway.metrics.port}/metrics"
    before = scrape(url)
    (gw.policy_dir / "broken.yaml").write_text("rules:\n  - id: x\n    effect: maybe\n")
    assert gw.gateway.policies is not None and gw.gateway.policies.reload_now()
    (model_repo / "mlp" / "3").mkdir()
    (model_repo / "mlp" / "3" / "model.onnx").write_bytes(b"not a model")
    assert gw.gateway.models.reload_now()
    after = scrape(url)
    for store in ("policies", "models"):
        failures, last = "gateway_reload_failures_total", "gateway_last_reload_timestamp_seconds"
        assert value(after, failures, store=store) - value(before, failures, store=store) == 1, store
        assert value(after, last, store=store) == value(before, last, store=store), store
    jwks = {"store": "jwks"}
    assert value(after, "gateway_reload_failures_total", **jwks) == value(
        before, "gateway_reload_failures_total", **jwks
    )


def test_a_healthy_gateway_without_a_crl_exports_no_gauge_an_alert_misreads(pki_copy, demo_models, tmp_path, promtool):
    """The demo's set-up (a JWKS file) without tls.crl: no CRL or key-fetch gauge, and no shipped alert fires
    over its real exposition (timestamps read relative to the scrape). A fresh process: nothing counted yet."""
    from gateway import package_version

    (pki_copy.server_dir / "crl.pem").unlink()
    process = serve(
        [*serve_args(pki_copy, demo_models, tmp_path, 0)], tmp_path, env={"GATEWAY_METRICS__LISTEN": "127.0.0.1:0"}
    )
    try:
        port = _logged(tmp_path / "serve.log", "metrics_listening")["port"]
        _logged(tmp_path / "serve.log", "gateway_started")
        text = _scrape_text(f"http://127.0.0.1:{port}/metrics")
        scraped_at = time.time()
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert "gateway_crl_next_update_timestamp_seconds " not in text
    assert "gateway_jwks_last_success_timestamp_seconds " not in text
    samples = scrape_text(text)
    assert series(samples, "gateway_reload_failures_total") == {
        frozenset({"store": store}.items()) for store in ("jwks", "policies", "server-tls", "models")
    }
    # Before the first call, the series rates are taken over exist at 0 (a series born at its first increment
    # hides that burst from rate()); and the versions serving.
    assert value(samples, "gateway_calls_total", method=PREDICT, model="-", version="-", code="UNAUTHENTICATED") == 0
    for reason, detail in [
        ("token", "token expired"),
        ("certificate", "client certificate revoked"),
        ("policy_deny", "default deny"),
    ]:
        assert frozenset({"reason": reason, "detail": detail}.items()) in series(samples, "gateway_refusals_total")
    assert sum(v for (name, _), v in samples.items() if name in ("gateway_calls_total", "gateway_refusals_total")) == 0
    (build,) = series(samples, "gateway_build_info")
    assert dict(build)["version"] == package_version() and value(samples, "gateway_build_info", **dict(build)) == 1
    fired = _alerts_over(promtool, text, scraped_at, tmp_path)
    assert fired.returncode == 0, fired.stdout + fired.stderr


def _logged(path, event: str, timeout_s: float = 60) -> dict:
    """The first JSON line of ``event`` in a child gateway's log, waited for."""
    found: list[dict] = []

    def seen() -> bool:
        for line in path.read_text().splitlines():
            if line.startswith("{") and json.loads(line).get("event") == event:
                found.append(json.loads(line))
                return True
        return False

    wait_until(seen, timeout_s=timeout_s, interval_s=0.2)
    return found[0]


def _alerts_over(promtool, exposition: str, scraped_at: float, tmp_path) -> subprocess.CompletedProcess[str]:
    """``promtool test rules`` expecting no alert of the shipped rules over ``exposition`` held for two hours; a
    ``*_timestamp_seconds`` value is moved so that the scrape's moment is the test's 2h."""
    from tests.conftest import PROMETHEUS_RULES

    now = 7200
    series = []
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if not sample.name.startswith("gateway_"):
                continue
            labels = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(sample.labels.items()))
            number = sample.value - scraped_at + now if sample.name.endswith("_timestamp_seconds") else sample.value
            series.append({"series": f"{sample.name}{{{labels}}}", "values": f"{number:.6f}x130"})
    groups = yaml.safe_load(PROMETHEUS_RULES.read_text())["groups"]
    quiet = [
        {"eval_time": f"{now}s", "alertname": rule["alert"], "exp_alerts": []}
        for group in groups
        for rule in group["rules"]
    ]
    test = {
        "rule_files": [str(PROMETHEUS_RULES)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": quiet}],
    }
    path = tmp_path / "scraped.test.yaml"
    path.write_text(yaml.safe_dump(test))
    return subprocess.run(
        [str(promtool), "test", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_every_metric_the_dashboard_and_the_alerts_read_is_exported(metered):
    """A renamed metric breaks the shipped Grafana dashboard and alert rules silently: each name they read must be in
    a real scrape (the key-fetch gauge aside: this gateway reads a JWKS file)."""
    import re

    from tests.conftest import PROMETHEUS_RULES, ROOT

    gw, url = metered
    with gw.channel("alice") as alice:
        stub(alice).Predict(predict_request("mlp", {"input": X}), metadata=auth(gw.token()), timeout=TIMEOUT)
    exported = {name for name, _labels in scrape(url)}
    dashboard = (ROOT / "deploy" / "grafana" / "gateway.json").read_text()
    read = set(re.findall(r"\bgateway_[a-z_]+", dashboard + PROMETHEUS_RULES.read_text()))
    missing = read - exported - {"gateway_jwks_last_success_timestamp_seconds"}
    assert read and not missing, missing


def test_a_backends_call_counters_exist_at_zero_for_every_code_before_its_first_call(start_gateway):
    backend = {"addresses": ["127.0.0.1:1"], "plaintext": True, "models": {"metrics-ghost": "mlp"}}  # nothing there
    gw = start_gateway(overrides={**METRICS, "backends": {"metrics-zero": backend}})
    samples = scrape(f"http://127.0.0.1:{gw.gateway.metrics.port}/metrics")
    backend_series = [dict(labels) for labels in series(samples, "gateway_backend_calls_total")]
    codes = {labels["code"] for labels in backend_series if labels["backend"] == "metrics-zero"}
    assert codes == {code.name for code in grpc.StatusCode}
    assert value(samples, "gateway_backend_calls_total", backend="metrics-zero", code="UNAVAILABLE") == 0


def test_the_rest_routes_call_counters_exist_before_their_first_call(start_gateway):
    from gateway.rest import METHOD_NAMES

    gw = start_gateway(overrides={**METRICS, "http.listen": "127.0.0.1:0"})
    samples = scrape(f"http://127.0.0.1:{gw.gateway.metrics.port}/metrics")
    calls = [dict(labels) for labels in series(samples, "gateway_calls_total")]
    assert {labels["method"] for labels in calls if labels["code"] == "UNAUTHENTICATED"} >= METHOD_NAMES
