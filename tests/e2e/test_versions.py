"""A pinned default version and a canary per model (models.versions): which version serves a request that names
none, why (the record's version_reason), policies deciding per version, and a pinned version disappearing."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pytest
from structlog.testing import capture_logs

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub

X = np.zeros((1, 784), np.float32)

# bob may use mlp version 1 only: a canary must not turn his calls into refusals. carol may use neither 1 nor 2.
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
  - id: carol-mlp-v3
    effect: allow
    principals: {subjects: [carol]}
    models: [mlp]
    versions: ["3"]
    actions: "*"
  - id: carol-not-mlp-v2
    effect: deny
    principals: {subjects: [carol]}
    models: [mlp]
    versions: ["2"]
    actions: "*"
"""


def routed(percent: float) -> dict:
    return {"models.versions": {"mlp": {"default": 1, "canary": {"version": 2, "percent": percent}}}}


# Calls made on a half-and-half canary until each version has served: the gateway draws each call's share at
# random, and all of them landing on one side has a probability of 2 * 2**-CALLS.
CALLS = 40


def predict(gw, *, version: str = "", user: str = "alice", request_id: str = "r-1") -> pb.PredictResponse:
    client = "bob" if user == "bob" else "alice"  # carol: alice's certificate, her own token
    with gw.channel(client) as channel:
        metadata = auth(gw.token(user, bind=client), ("x-request-id", request_id))
        request = predict_request("mlp", {"input": X}, version=version)
        return stub(channel).Predict(request, metadata=metadata, timeout=TIMEOUT)


def served(gw, *, request_id: str) -> list[tuple[str, str, str]]:
    """(version, version_reason, code) of CALLS unversioned calls on one channel, all with one request id."""
    with gw.channel("alice") as channel:
        metadata = auth(gw.token(), ("x-request-id", request_id))
        for _ in range(CALLS):
            stub(channel).Predict(predict_request("mlp", {"input": X}), metadata=metadata, timeout=TIMEOUT)
    return [(r["version"], r["version_reason"], r["code"]) for r in gw.audit_records()[-CALLS:]]


def last(gw) -> tuple[str, str, str]:
    record = gw.audit_records()[-1]
    return record["version"], record["version_reason"], record["code"]


@pytest.fixture(scope="module")
def gw(start_gateway_module):
    return start_gateway_module(policy=POLICY, overrides=routed(50))


@pytest.fixture(scope="module")
def all_canary(start_gateway_module):
    """Every unversioned call taken by the canary: what the policies make of it is certain."""
    return start_gateway_module(policy=POLICY, overrides=routed(100))


def test_the_pinned_default_the_canary_and_an_explicit_version_are_recorded_with_why(gw):
    assert set(served(gw, request_id="r-1")) == {("1", "pinned", "OK"), ("2", "canary", "OK")}
    assert predict(gw, version="2").model_version == "2"
    assert last(gw) == ("2", "requested", "OK")
    with gw.channel("alice") as channel:
        listed = stub(channel).ListModels(pb.ListModelsRequest(), metadata=auth(gw.token()), timeout=TIMEOUT)
    assert {m.name: m.default_version for m in listed.models}["mlp"] == "1"


def test_the_callers_request_id_does_not_choose_the_canary(gw):
    """The share is drawn by the gateway for each call: a caller resending one request id (or a client reusing a
    constant one) lands on both sides of the split, as callers with fresh ids do."""
    for request_id in ("r-1", "constant-id-of-a-naive-client"):
        assert {version for version, _, _ in served(gw, request_id=request_id)} == {"1", "2"}


def test_the_messages_of_one_stream_share_one_draw(gw):
    """A stream is one call: its messages land on one version (drawn apart, all on one has odds 2 * 2**-CALLS)."""
    with gw.channel("alice") as channel:
        messages = iter([predict_request("mlp", {"input": X})] * CALLS)
        replies = list(stub(channel).PredictStream(messages, metadata=auth(gw.token()), timeout=TIMEOUT))
    assert len({reply.response.model_version for reply in replies}) == 1 and len(replies) == CALLS


def test_a_caller_the_policy_keeps_off_the_canary_gets_the_default_not_a_refusal(all_canary):
    # bob may use version 1 only: in the canary's share he gets the pinned default.
    assert predict(all_canary, user="bob").model_version == "1"
    assert last(all_canary) == ("1", "pinned", "OK")
    # Asking for version 2 by name is still refused to him, and recorded as such.
    exc = rpc_error(lambda: predict(all_canary, user="bob", version="2"))
    assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
    assert last(all_canary) == ("2", "requested", "PERMISSION_DENIED")


def test_a_caller_kept_off_both_the_canary_and_the_default_is_refused_for_the_canary(all_canary):
    """The record is one decision: the version the call was routed to (the canary), why, and the rule that denied
    it; not the default's version beside the canary's rule."""
    exc = rpc_error(lambda: predict(all_canary, user="carol"))
    assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
    record = all_canary.audit_records()[-1]
    assert (record["version"], record["version_reason"], record["decision"], record["rule"]) == (
        "2",
        "canary",
        "deny",
        "carol-not-mlp-v2",
    )


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
