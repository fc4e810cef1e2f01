"""KServe's Python model server (kserve.ModelServer, its gRPC v2 endpoint) as the gateway's backend: stock
tritonclient and the SDK get KServe's own answers through the gateway; a refused caller reaches nothing. KServe
reports no model version: a rule that names versions cannot be satisfied by it, so a deny naming versions holds."""

from __future__ import annotations

import numpy as np
import pytest

import gateway
from tests.backends.conftest import BACKEND_POLICY, empty_repository, plaintext_backend, triton
from tests.e2e.helpers import TIMEOUT

VALUES = [1.5, -2.0, 3.25]
INFER = {
    "op": "infer",
    "args": {
        "model": "double",
        "inputs": [{"name": "x", "datatype": "FP32", "numpy": "float32", "shape": [3], "data": VALUES}],
    },
}


# "guarded" is KServe's "double" under another name, which alice may not use at version 1.
POLICY = (
    BACKEND_POLICY
    + """
  - id: alice-not-guarded-v1
    effect: deny
    principals: {subjects: [alice]}
    models: [guarded]
    versions: [1]
    actions: "*"
"""
)


@pytest.fixture(scope="module")
def gw(start_module_gateway, kserve_server, tmp_path_factory):
    return start_module_gateway(
        models=empty_repository(tmp_path_factory),
        policy=POLICY,
        overrides={"backends": {"kserve": plaintext_backend(kserve_server, {"double": "double", "guarded": "double"})}},
    )


def test_tritonclient_gets_kserves_answer_through_the_gateway_and_bob_reaches_nothing(gw, kserve_server, tmp_path):
    [through] = triton(gw, tmp_path, [INFER])
    [straight] = triton(gw, tmp_path, [INFER], target=kserve_server.target)
    assert through["ok"]["outputs"] == straight["ok"]["outputs"]
    assert through["ok"]["outputs"]["output-0"]["data"] == [3.0, -4.0, 6.5]
    infers = kserve_server.calls()["ModelInfer"]
    [refused] = triton(gw, tmp_path, [INFER], client="bob")
    assert refused["error"]["status"] == "StatusCode.PERMISSION_DENIED"
    assert kserve_server.calls()["ModelInfer"] == infers
    allowed, denied = [r for r in gw.audit_records() if r["model"] == "double"][-2:]
    assert (allowed["code"], allowed["backend"]["code"], allowed["backend"]["address"]) == (
        "OK",
        "OK",
        kserve_server.target,
    )
    assert (denied["code"], denied["backend"]["address"]) == ("PERMISSION_DENIED", None)


def test_sdk_predicts_on_a_kserve_model(gw):
    pki = gw.pki
    with gateway.Client(
        gw.target, ca=pki.path("ca.crt"), cert=pki.path("alice.crt"), key=pki.path("alice.key"), token=gw.token()
    ) as client:
        result = client.predict("double", {"x": np.array(VALUES, np.float32)}, timeout=TIMEOUT)
    np.testing.assert_array_equal(result.outputs["output-0"], np.array(VALUES, np.float32) * 2)


def test_a_deny_naming_versions_holds_for_a_backend_that_reports_no_version(gw, kserve_server):
    """Fail closed: KServe's version is unknown, so it may be 1; the call is denied and nothing is sent."""
    infers = kserve_server.calls()["ModelInfer"]
    pki = gw.pki
    with gateway.Client(
        gw.target, ca=pki.path("ca.crt"), cert=pki.path("alice.crt"), key=pki.path("alice.key"), token=gw.token()
    ) as client:
        with pytest.raises(gateway.PermissionDeniedError):
            client.predict("guarded", {"x": np.array(VALUES, np.float32)}, timeout=TIMEOUT)
        assert "guarded" not in {m.name for m in client.list_models(timeout=TIMEOUT)}
    assert kserve_server.calls()["ModelInfer"] == infers
    record = [r for r in gw.audit_records() if r["model"] == "guarded"][-1]
    assert (record["code"], record["version"], record["rule"]) == ("PERMISSION_DENIED", None, "alice-not-guarded-v1")
