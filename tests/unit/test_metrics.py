"""Metric label values are bounded: every refusal maps to a fixed reason class and detail."""

from __future__ import annotations

import pytest

from gateway.context import Outcome
from gateway.errors import (
    AuthenticationError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from gateway.metrics import refusal_labels


def _call(rule: str | None = None) -> Outcome:
    return Outcome(rule=rule)


@pytest.mark.parametrize(
    ("reason", "labels"),
    [
        ("no client certificate", ("certificate", "no client certificate")),
        ("client certificate revoked", ("certificate", "client certificate revoked")),
        (
            "no CRL for the certificate chain: issuer of intermediate CA CN=x",
            ("certificate", "no CRL for the certificate chain"),
        ),
        ("token expired", ("token", "token expired")),
        ("missing claim: sub", ("token", "missing claim")),
        ("malformed claim: groups", ("token", "malformed claim")),
        # The algorithm comes from the token's header: a detail, never a label value.
        ("algorithm not allowed: x-invented-by-caller", ("token", "algorithm not allowed")),
        ("malformed token: duplicate member in its header", ("token", "malformed token")),
        ("anything new", ("token", "invalid token")),
    ],
)
def test_authentication_refusals_have_bounded_labels(reason, labels):
    assert refusal_labels(AuthenticationError(reason=reason), _call()) == labels


def test_policy_denials_are_labelled_by_rule_id_or_default_deny():
    assert refusal_labels(PermissionDeniedError(reason="x"), _call("deny-suspended")) == (
        "policy_deny",
        "deny-suspended",
    )
    assert refusal_labels(PermissionDeniedError(reason="x"), _call()) == ("policy_deny", "default deny")


def test_limits_and_other_codes_have_fixed_labels():
    assert refusal_labels(ResourceExhaustedError(reason="concurrent call limit"), _call()) == (
        "limit",
        "concurrent call limit",
    )
    assert refusal_labels(ResourceExhaustedError(reason="something else"), _call()) == ("limit", "other")
    assert refusal_labels(InvalidArgumentError("caller text 'x'"), _call()) == ("invalid_argument", "-")
    assert refusal_labels(UnavailableError(reason="audit sink unhealthy"), _call()) == ("unavailable", "-")


def _settings(tmp_path, text: str):
    from gateway.config import load_settings

    path = tmp_path / "gateway.yaml"
    path.write_text("tls: {cert: s.crt, key: s.key, client_ca: ca.crt}\nauth: {jwks: jwks.json}\n" + text)
    return load_settings(path)


def test_metrics_are_off_unless_listen_is_set(tmp_path):
    settings = _settings(tmp_path, "")
    assert settings.metrics.listen is None
    assert _settings(tmp_path, "metrics: {listen: '127.0.0.1:9464'}\n").metrics.listen == "127.0.0.1:9464"


def test_a_bad_metrics_listen_address_is_an_error_naming_the_key(tmp_path):
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=r"metrics\.listen: 'nowhere' is not HOST:PORT"):
        _settings(tmp_path, "metrics: {listen: nowhere}\n")


def test_metrics_tls_needs_the_tls_material_dev_insecure_transport_skips(tmp_path):
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=r"^.*metrics\.tls: needs tls\.cert"):
        _settings(tmp_path, "dev_insecure_transport: true\nmetrics: {listen: '127.0.0.1:9464', tls: true}\n")


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ("{allowed_identities: [cn:scraper]}", r"metrics\.allowed_identities: needs metrics\.tls"),
        ("{tls: true, allowed_identities: [scraper]}", r"metrics\.allowed_identities: 'scraper' must start with"),
        ("{max_connections: 0}", r"metrics\.max_connections: must be between 1"),
        ("{timeout_s: 0}", r"metrics\.timeout_s: must be more than 0"),
    ],
)
def test_bad_scraper_settings_are_errors_naming_the_key(tmp_path, metrics, message):
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _settings(tmp_path, f"metrics: {metrics}\n")


def test_workers_open_no_metrics_listener_of_their_own(tmp_path):
    from gateway.config import for_worker

    settings = _settings(tmp_path, "metrics: {listen: '127.0.0.1:9464', tls: true}\n")
    assert for_worker(settings, 1).metrics.listen is None


def test_a_default_deny_is_spelt_alike_in_the_record_the_metric_and_policy_check():
    from gateway.policy import Decision

    decision = Decision(allowed=False, rule_id=None)
    reason, detail = refusal_labels(PermissionDeniedError(reason=decision.reason), _call())
    assert (reason, detail) == ("policy_deny", decision.reason)  # the audit record's and the log's reason
    assert detail in decision.explain()  # what `gateway policy check` prints


def test_the_backend_codes_are_grpcs_status_codes():
    import grpc

    from gateway.metrics import GRPC_CODES

    assert tuple(code.name for code in grpc.StatusCode) == GRPC_CODES
