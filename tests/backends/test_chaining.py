"""Another gateway as the backend (edge gateway -> cluster gateway) over mutual TLS: the edge calls with its own
certificate and its own token, never the caller's; each gateway decides and records, and the two records share the
request id. The version the edge's policy judged is the version the cluster runs, whatever the cluster's own
default; a backend whose certificate does not verify is down, and nothing reaches it."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import gateway
from gateway._pb.inference import grpc_service_pb2 as oip
from gateway._pb.inference import grpc_service_pb2_grpc as oip_grpc
from gateway.tracing import Tracing
from tests.backends.conftest import BACKEND_POLICY, empty_repository
from tests.conftest import ROOT, Pki, run_script
from tests.e2e.helpers import TIMEOUT, auth

EDGE_POLICY = (
    BACKEND_POLICY
    + """
  - id: alice-not-v1
    effect: deny
    principals: {subjects: [alice]}
    models: [mlp]
    versions: [1]
    actions: "*"
"""
)

X = np.random.default_rng(11).random((3, 784), dtype=np.float32)


@pytest.fixture(scope="module")
def edge_pki(pki, tmp_path_factory) -> Pki:
    """The session PKI and one more client, ``edge``: the edge gateway's identity towards the cluster gateway."""
    directory = tmp_path_factory.mktemp("edge-pki") / "pki"
    shutil.copytree(pki.dir, directory)
    run_script(ROOT / "scripts/gen_certs.sh", "--client", "edge", directory)
    return Pki(directory)


def traced() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


@pytest.fixture(scope="module")
def gateways(start_module_gateway, edge_pki, tmp_path_factory):
    (edge_tracing, edge_spans), (cluster_tracing, cluster_spans) = traced(), traced()
    # The cluster pins mlp 1 as its default: the edge, which judged 2 (the highest the cluster advertises), asks for 2.
    cluster = start_module_gateway(
        pki=edge_pki, overrides={"models.versions": {"mlp": {"default": 1}}}, tracing=cluster_tracing
    )
    token_file = tmp_path_factory.mktemp("edge-token") / "token"
    token_file.write_text(cluster.token("edge", bind="edge") + "\n")
    backend = {
        "addresses": [cluster.target],
        "ca": str(edge_pki.path("ca.crt")),
        "cert": str(edge_pki.path("edge.crt")),
        "key": str(edge_pki.path("edge.key")),
        "token_file": str(token_file),
        "models": {"mlp": "mlp"},
        "health_interval_s": 0.2,
    }
    # The same cluster, with a certificate name it does not carry, and with a CA that did not sign it.
    misnamed = {**backend, "server_name": "nobody.invalid", "models": {"mlp-misnamed": "mlp"}, "health_interval_s": 1}
    wrong_ca = {
        **backend,
        "ca": str(edge_pki.path("edge.crt")),
        "models": {"mlp-wrong-ca": "mlp"},
        "health_interval_s": 1,
    }
    edge = start_module_gateway(
        pki=edge_pki,
        models=empty_repository(tmp_path_factory),
        policy=EDGE_POLICY,
        overrides={
            "backends": {"cluster": backend, "cluster-misnamed": misnamed, "cluster-wrong-ca": wrong_ca},
            "http.listen": "127.0.0.1:0",
        },
        tracing=edge_tracing,
    )
    edge.extra["spans"], cluster.extra["spans"] = edge_spans, cluster_spans
    return edge, cluster


def client(gw, name: str) -> gateway.Client:
    pki = gw.pki
    return gateway.Client(
        gw.target,
        ca=pki.path("ca.crt"),
        cert=pki.path(f"{name}.crt"),
        key=pki.path(f"{name}.key"),
        token=gw.token(name, bind=name),
    )


def test_alice_through_the_edge_runs_the_clusters_model_as_the_edge(gateways, demo_models):
    edge, cluster = gateways
    with client(edge, "alice") as alice:
        result = alice.predict("mlp", {"input": X}, timeout=TIMEOUT)
    session = ort.InferenceSession(str(demo_models / "mlp" / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(result.outputs["output"], session.run(None, {"input": X})[0], rtol=1e-6)
    assert result.version == "2"
    at_edge = edge.audit_records()[-1]
    at_cluster = [r for r in cluster.audit_records() if r["request_id"] == at_edge["request_id"]]
    assert (at_edge["sub"], at_edge["code"], at_edge["backend"]["code"]) == ("alice", "OK", "OK")
    # The edge judged 2 and asked the cluster for 2 (not the cluster's pinned default, 1): one version throughout.
    assert (at_edge["requested_version"], at_edge["version"]) == (None, "2")
    assert (at_cluster[0]["requested_version"], at_cluster[0]["version"]) == ("2", "2")
    assert at_edge["backend"]["address"] == cluster.target
    [record] = at_cluster
    assert (record["sub"], record["cert_identity"], record["code"]) == (
        "edge",
        "spiffe://gateway.local/client/edge",
        "OK",
    )
    # One trace: the cluster's call span is a child of the edge's gateway.backend span (W3C traceparent).
    assert record["trace_id"] == at_edge["trace_id"] is not None
    [hop] = [s for s in edge.extra["spans"].get_finished_spans() if s.name == "gateway.backend"]
    [served] = [s for s in cluster.extra["spans"].get_finished_spans() if s.name.endswith("/ModelInfer")]
    assert served.parent.span_id == hop.context.span_id
    assert hop.attributes["gateway.backend"] == "cluster"


def test_bob_is_refused_at_the_edge_and_the_cluster_sees_nothing(gateways):
    edge, cluster = gateways
    cluster_records = len(cluster.audit_records())
    with client(edge, "bob") as bob, pytest.raises(gateway.PermissionDeniedError):
        bob.predict("mlp", {"input": X}, timeout=TIMEOUT)
    # The edge's health poll (ServerReady, ModelMetadata, RepositoryIndex) goes on: nothing else reaches the cluster.
    polls = {"ServerReady", "ModelMetadata", "RepositoryIndex"}
    seen = [r["method"].rsplit("/", 1)[1] for r in cluster.audit_records()[cluster_records:]]
    assert [method for method in seen if method not in polls] == []
    assert edge.audit_records()[-1]["code"] == "PERMISSION_DENIED"


def test_a_routed_model_answers_over_the_edges_rest_binding_through_the_same_path(gateways, demo_models):
    import http.client
    import json
    import ssl

    edge, cluster = gateways
    context = ssl.create_default_context(cafile=str(edge.pki.path("ca.crt")))
    context.load_cert_chain(edge.pki.path("alice.crt"), edge.pki.path("alice.key"))
    connection = http.client.HTTPSConnection("localhost", edge.gateway.http_port, context=context, timeout=TIMEOUT)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 784], "data": X.ravel().tolist()}]}
    headers = {"Authorization": f"Bearer {edge.token('alice')}", "Content-Type": "application/json"}
    connection.request("POST", "/v2/models/mlp/infer", body=json.dumps(body), headers=headers)
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 200, answer
    session = ort.InferenceSession(str(demo_models / "mlp" / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
    (output,) = answer["outputs"]
    np.testing.assert_allclose(np.array(output["data"]).reshape(3, 10), session.run(None, {"input": X})[0], rtol=1e-5)
    at_edge = edge.audit_records()[-1]
    assert (at_edge["method"], at_edge["sub"], at_edge["backend"]["code"]) == (
        "POST /v2/models/{model}/infer",
        "alice",
        "OK",
    )
    assert [r["sub"] for r in cluster.audit_records() if r["request_id"] == at_edge["request_id"]] == ["edge"]


def test_model_config_of_a_gateway_backend_is_its_own_renamed_to_the_edges_name(gateways):
    edge, _ = gateways
    with edge.channel() as channel:
        config = oip_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
            oip.ModelConfigRequest(name="mlp"), metadata=auth(edge.token()), timeout=TIMEOUT
        )
    assert (config.config.name, config.config.platform) == ("mlp", "onnxruntime_onnx")
    assert [i.name for i in config.config.input] == ["input"]
    assert edge.audit_records()[-1]["backend"]["code"] == "OK"


def test_a_version_the_edge_denies_never_reaches_the_cluster(gateways):
    edge, cluster = gateways
    cluster_records = len(cluster.audit_records())
    with client(edge, "alice") as alice, pytest.raises(gateway.PermissionDeniedError):
        alice.predict("mlp", {"input": X}, version="1", timeout=TIMEOUT)
    record = edge.audit_records()[-1]
    assert (record["version"], record["rule"], record["backend"]["address"]) == ("1", "alice-not-v1", None)
    polls = {"ServerReady", "ModelMetadata", "RepositoryIndex"}
    seen = [r["method"].rsplit("/", 1)[1] for r in cluster.audit_records()[cluster_records:]]
    assert [method for method in seen if method not in polls] == []


@pytest.mark.parametrize("model", ["mlp-misnamed", "mlp-wrong-ca"])
def test_a_backend_whose_certificate_does_not_verify_is_down_and_reaches_nothing(gateways, model):
    edge, cluster = gateways
    with client(edge, "alice") as alice, pytest.raises(gateway.UnavailableError):
        alice.predict(model, {"input": X}, timeout=TIMEOUT)
    record = edge.audit_records()[-1]
    assert (record["model"], record["code"], record["backend"]["address"]) == (model, "UNAVAILABLE", None)
    # No handshake completed, so no call of that backend's reached the cluster: none carries its request id.
    assert not [r for r in cluster.audit_records() if r["request_id"] == record["request_id"]]
