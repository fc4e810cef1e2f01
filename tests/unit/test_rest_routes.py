"""The REST binding's routes (names that never hold the caller's path) and its HTTP statuses for the gateway's
errors, without a server."""

from __future__ import annotations

import json

import pytest

from gateway.errors import (
    LOG_POINTER,
    AuthenticationError,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
)
from gateway.rest import METHOD_NAMES, UNKNOWN_PATH, http_status, match, refusal


@pytest.mark.parametrize(
    ("method", "path", "name", "names"),
    [
        ("GET", "/v2", "GET /v2", {}),
        ("GET", "/v2/health/ready", "GET /v2/health/ready", {}),
        ("GET", "/v2/models/mlp", "GET /v2/models/{model}", {"model": "mlp"}),
        (
            "GET",
            "/v2/models/mlp/versions/2",
            "GET /v2/models/{model}/versions/{version}",
            {"model": "mlp", "version": "2"},
        ),
        ("GET", "/v2/models/mlp/ready", "GET /v2/models/{model}/ready", {"model": "mlp"}),
        (
            "GET",
            "/v2/models/mlp/versions/2/config",
            "GET /v2/models/{model}/versions/{version}/config",
            {"model": "mlp", "version": "2"},
        ),
        ("POST", "/v2/models/mlp/infer", "POST /v2/models/{model}/infer", {"model": "mlp"}),
        ("POST", "/v2/repository/index", "POST /v2/repository/index", {}),
    ],
)
def test_each_endpoint_is_named_by_its_template(method, path, name, names):
    route, found, _ = match(method, path)
    assert route is not None and (route.name, found) == (name, names)


def test_health_is_not_audited_and_every_audited_name_is_a_metric_label():
    assert not match("GET", "/v2/health/live")[0].audited
    assert "GET /v2/health/live" not in METHOD_NAMES
    assert {"GET /v2", "POST /v2/models/{model}/infer", UNKNOWN_PATH} <= METHOD_NAMES


def test_unknown_paths_and_other_methods():
    assert match("GET", "/v2/models/a/b/c") == (None, {}, False)
    assert match("DELETE", "/v2/models/mlp") == (None, {}, True)
    assert match("GET", "/v2/models/mlp/infer") == (None, {}, True)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (AuthenticationError(), 401),
        (PermissionDeniedError(), 403),
        (NotFoundError(), 404),
        (InvalidArgumentError(), 400),
        (ResourceExhaustedError(reason="concurrent call limit"), 429),
        (ResourceExhaustedError(reason="message too large"), 413),
        (ResourceExhaustedError(reason="response too large"), 500),
        (UnavailableError(), 503),
        (DeadlineExceededError(reason="call time limit"), 504),
        (DeadlineExceededError(reason="request body not received in time"), 408),
        (UnimplementedError(reason="unknown path"), 404),
        (UnimplementedError(reason="method not allowed"), 405),
        (InternalError(), 500),
    ],
)
def test_each_error_has_its_http_status(error, status):
    assert http_status(error) == status


def test_a_refusal_carries_the_headers_a_client_acts_on_and_no_internal_detail():
    expired = refusal(
        AuthenticationError("token expired: get a new token", reason="token expired"), request_id="r", retry_safe=False
    )
    assert (
        expired.headers["WWW-Authenticate"]
        == 'Bearer realm="gateway", error="invalid_token", error_description="token expired"'
    )
    revoked = refusal(AuthenticationError(reason="client certificate revoked"), request_id="r", retry_safe=False)
    assert revoked.headers["WWW-Authenticate"] == 'Bearer realm="gateway"'  # no token error to tell
    internal = refusal(InternalError(reason="unexpected KeyError"), request_id="r-1", retry_safe=False)
    assert json.loads(internal.text) == {"error": f"internal error (request id r-1; {LOG_POINTER})"}
    retry = refusal(UnavailableError(), request_id="r", retry_safe=True)
    assert (retry.headers["Retry-After"], retry.headers["x-retry-safe"]) == ("1", "true")
    assert "Retry-After" not in refusal(UnavailableError(), request_id="r", retry_safe=False).headers
