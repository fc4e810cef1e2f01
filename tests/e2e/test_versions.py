"""A pinned default version and a canary per model (models.versions): which version serves a request that names
none, why (the record's version_reason), policies deciding per version, and a pinned version disappearing."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
from structlog.testing import capture_logs

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub

X = np.zeros((1, 784), np.float32)

# bob may use mlp version 1 only: a canary must not turn his calls into refusals.
POLICY = """
rules:
  - id: alice-all
    effect: allow
    principals: {subjects: [alice]}
    models: ["*"]
    actions: "*"
  - id: bob-mlp-v1
    effect: allow
    principals: {subjects: [bob]}
    models: [mlp]
    versions: ["1"]
    actions: "*"
"""


def routed(percent: float) -> dict:
    return {"models.versions": {"mlp": {"default": 1, "canary": {"version": 2, "percent": percent}}}}


def predict(gw, *, version: str = "", user: str = "alice", request_id: str = "r-1") -> pb.PredictResponse:
    with gw.channel(user) as channel:
        metadata = auth(gw.token(user, bind=user), ("x-request-id", request_id))
        request = predict_request("mlp", {"input": X}, version=version)
        return stub(channel).Predict(request, metadata=metadata, timeout=TIMEOUT)


def last(gw) -> tuple[str, str, str]:
    record = gw.audit_records()[-1]
    return record["version"], record["version_reason"], record["code"]


def test_a_pinned_default_and_an_explicit_version_are_served_and_recorded_with_why(start_gateway, model_repo):
    gw = start_gateway(models=model_repo, policy=POLICY, overrides=routed(0))
    assert predict(gw).model_version == "1"
    assert last(gw) == ("1", "pinned", "OK")
    assert predict(gw, version="2").model_version == "2"
    assert last(gw) == ("2", "requested", "OK")
    with gw.channel("alice") as channel:
        listed = stub(channel).ListModels(pb.ListModelsRequest(), metadata=auth(gw.token()), timeout=TIMEOUT)
    assert {m.name: m.default_version for m in listed.models}["mlp"] == "1"


def test_a_full_canary_serves_every_unversioned_call_but_not_a_caller_the_policy_keeps_off_it(
    start_gateway, model_repo
):
    gw = start_gateway(models=model_repo, policy=POLICY, overrides=routed(100))
    assert predict(gw, request_id="any").model_version == "2"
    assert last(gw) == ("2", "canary", "OK")
    # bob may use version 1 only: he gets the pinned default, not a refusal.
    assert predict(gw, user="bob").model_version == "1"
    assert last(gw) == ("1", "pinned", "OK")
    # Asking for version 2 by name is still refused to him, and recorded as such.
    exc = rpc_error(lambda: predict(gw, user="bob", version="2"))
    assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
    assert last(gw) == ("2", "requested", "PERMISSION_DENIED")


def test_a_pinned_version_that_disappears_refuses_unversioned_calls_until_it_is_back(start_gateway, model_repo):
    gw = start_gateway(models=model_repo, policy=POLICY, overrides=routed(0))
    saved = model_repo.parent / "mlp-1"
    shutil.move(model_repo / "mlp" / "1", saved)
    with capture_logs() as logs:
        assert gw.gateway.models.reload_now()
    (missing,) = [e for e in logs if e["event"] == "model_pinned_version_missing"]
    assert missing["model"] == "mlp" and "models.versions.mlp.default" in missing["detail"]
    exc = rpc_error(lambda: predict(gw))
    assert exc.code() == grpc.StatusCode.NOT_FOUND and "no default version" in exc.details()
    record = gw.audit_records()[-1]
    assert (record["model"], record["version"], record["code"]) == ("mlp", None, "NOT_FOUND")
    assert predict(gw, version="2").model_version == "2"  # a named version serves on

    shutil.move(saved, model_repo / "mlp" / "1")
    with capture_logs() as logs:
        assert gw.gateway.models.reload_now()
    assert [e["model"] for e in logs if e["event"] == "model_version_routing_restored"] == ["mlp"]
    assert predict(gw).model_version == "1"
