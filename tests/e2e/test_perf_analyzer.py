"""Triton's Performance Analyzer (the real perf_analyzer 2.60 binary, unmodified) against the gateway over mutual
TLS with a bearer token: it must run its measurement with no request refused, on ModelInfer, ModelStreamInfer and
the REST binding (-i http).

It sends ``triton_enable_empty_final_response`` on every request and calls ModelMetadata, ModelConfig and
ServerMetadata first. Installed by ``make setup`` (scripts/install_perf_analyzer.sh); where its binary cannot run,
the tests skip with the installer's reason.
"""

from __future__ import annotations

import collections
import subprocess

import pytest

from tests.conftest import ROOT

INSTALL = ROOT / ".tools/perf-analyzer"
RUN = INSTALL / "run"


def _binary() -> str:
    if (INSTALL / "unavailable").exists():
        pytest.skip(f"perf_analyzer cannot run here: {(INSTALL / 'unavailable').read_text().strip()}")
    if not RUN.exists():
        pytest.fail("perf_analyzer is not installed: run `make setup` (scripts/install_perf_analyzer.sh)")
    return str(RUN)


@pytest.fixture(scope="module")
def gw(start_gateway_module):
    return start_gateway_module(overrides={"http.listen": "127.0.0.1:0"})


def perf_analyzer(gw, *args: str, client: str = "alice", http: bool = False) -> subprocess.CompletedProcess[str]:
    """One short measurement (40 requests, 2 in flight) of the digits model, over gRPC or the REST binding."""
    pki = gw.pki
    token = gw.token(client, bind=client)
    ca, key, crt = (str(pki.path(name)) for name in ("ca.crt", f"{client}.key", f"{client}.crt"))
    if http:
        transport = [
            *("-i", "http", "-u", f"https://localhost:{gw.gateway.http_port}", "--ssl-https-ca-certificates-file", ca),
            *("--ssl-https-client-certificate-file", crt, "--ssl-https-client-certificate-type", "PEM"),
            *("--ssl-https-private-key-file", key, "--ssl-https-private-key-type", "PEM"),
            *("--ssl-https-verify-peer", "1", "--ssl-https-verify-host", "2"),
        ]
    else:
        transport = [
            *("-i", "grpc", "-u", gw.target, "--ssl-grpc-use-ssl", "true"),
            *("--ssl-grpc-root-certifications-file", ca, "--ssl-grpc-private-key-file", key),
            *("--ssl-grpc-certificate-chain-file", crt),
        ]
    command = [
        _binary(),
        *("-m", "digits", *transport),
        *("-H", f"authorization:Bearer {token}", "--shape", "input:1,64", "--concurrency-range", "2:2"),
        *("--request-count", "40"),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize(
    ("args", "http", "method"),
    [
        ((), False, "ModelInfer"),
        (("--streaming",), False, "ModelStreamInfer"),
        ((), True, "POST /v2/models/{model}/infer"),
    ],
    ids=["grpc", "grpc-stream", "http"],
)
def test_perf_analyzer_measures_with_every_request_served(gw, args, http, method):
    before = len(gw.audit_records())
    done = perf_analyzer(gw, *args, http=http)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Throughput:" in done.stdout and "infer/sec" in done.stdout
    records = gw.audit_records()[before:]
    # perf_analyzer ends its streams by cancelling them (one per request in flight): each stream's own record says
    # CANCELLED, every message's record OK.
    codes = collections.Counter(
        (r["method"] if http else r["method"].rsplit("/", 1)[1], r["code"])
        for r in records
        if not (r["event"] == "stream" and r["code"] == "CANCELLED")
    )
    assert {code for (_, code) in codes} == {"OK"}, codes
    config = "GET /v2/models/{model}/config" if http else "ModelConfig"
    assert codes[(config, "OK")] >= 1 and codes[(method, "OK")] >= 40
    assert {r["sub"] for r in records} == {"alice"}


def test_perf_analyzer_refused_by_policy_reports_the_denial(gw):
    done = perf_analyzer(gw, client="bob")  # bob may read digits' metadata, not predict
    assert done.returncode != 0
    assert "no rule lets you 'predict' on model 'digits'" in done.stdout + done.stderr
    assert gw.audit_records()[-1]["code"] == "PERMISSION_DENIED"
