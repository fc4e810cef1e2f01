"""A pinned default version and a canary per model (models.versions): which version serves a request that names
none, why (the record's version_reason), policies deciding per version, and a pinned version disappearing."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
from structlog.testing import capture_logs

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway.models.routing import request_share
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


def request_id(*, canary: bool) -> str:
    """A request id the half-and-half canary below takes (or leaves): the choice is a function of the id."""
    return next(f"r-{i}" for i in range(1000) if (request_share("mlp", f"r-{i}") < 50) == canary)


def predict(gw, *, version: str = "", user: str = "alice", request_id: str = "r-1") -> pb.PredictResponse:
    with gw.channel(user) as channel:
        metadata = auth(gw.token(user, bind=user), ("x-request-id", request_id))
        request = predict_request("mlp", {"input": X}, version=version)
        return stub(channel).Predict(request, metadata=metadata, timeout=TIMEOUT)


def last(gw) -> tuple[str, str, str]:
    record = gw.audit_records()[-1]
    return record["version"], record["version_reason"], record["code"]


@pytest.fixture(scope="module")
def gw(start_gateway_module):
    return start_gateway_module(policy=POLICY, overrides=routed(50))


def test_the_pinned_default_the_canary_and_an_explicit_version_are_recorded_with_why(gw):
    outside, inside = request_id(canary=False), request_id(canary=True)
    assert predict(gw, request_id=outside).model_version == "1"
    assert last(gw) == ("1", "pinned", "OK")
    assert predict(gw, request_id=inside).model_version == "2"
    assert last(gw) == ("2", "canary", "OK")
    assert predict(gw, request_id=inside).model_version == "2"  # the same id, the same version
    assert predict(gw, version="2", request_id=outside).model_version == "2"
    assert last(gw) == ("2", "requested", "OK")
    with gw.channel("alice") as channel:
        listed = stub(channel).ListModels(pb.ListModelsRequest(), metadata=auth(gw.token()), timeout=TIMEOUT)
    assert {m.name: m.default_version for m in listed.models}["mlp"] == "1"


def test_a_caller_the_policy_keeps_off_the_canary_gets_the_default_not_a_refusal(gw):
    # bob may use version 1 only: in the canary's share he gets the pinned default.
    assert predict(gw, user="bob", request_id=request_id(canary=True)).model_version == "1"
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
