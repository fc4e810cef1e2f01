"""backends: settings: each backend's addresses, transport and bounds, the models routed to it, every error naming
its key; the same settings from GATEWAY_BACKENDS (a JSON object)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.config import ConfigError, environment_settings, load_settings

SECURE = "tls: {cert: s.crt, key: s.key, client_ca: ca.crt}\nauth: {jwks: jwks.json}\n"
MTLS = {"addresses": ["10.0.0.7:8001"], "ca": "ca.crt", "cert": "gw.crt", "key": "gw.key", "models": {"mlp": "mlp"}}
LOOPBACK = {"addresses": ["127.0.0.1:8081"], "plaintext": True, "models": {"iris": "iris-v2"}}


def settings(tmp_path: Path, backends: dict):
    path = tmp_path / "gateway.yaml"
    path.write_text(SECURE + "backends: " + json.dumps(backends) + "\n")
    return load_settings(path)


def test_a_backend_over_mutual_tls_and_one_over_loopback_plaintext(tmp_path):
    loaded = settings(tmp_path, {"triton": MTLS, "sidecar": LOOPBACK}).backends
    assert loaded["triton"].ca == tmp_path / "ca.crt" and loaded["triton"].models == {"mlp": "mlp"}
    assert loaded["sidecar"].plaintext and loaded["sidecar"].models == {"iris": "iris-v2"}
    assert loaded["triton"].deadline_s == 30.0 and not loaded["triton"].required


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ({**LOOPBACK, "addresses": ["10.0.0.7:8081"]}, r"backends\.b\.plaintext: only for loopback addresses"),
        ({**MTLS, "ca": None}, r"backends\.b\.ca: required for mutual TLS"),
        ({**LOOPBACK, "cert": "gw.crt"}, r"backends\.b\.cert: set, but backends\.b\.plaintext is true"),
        ({**MTLS, "addresses": []}, r"backends\.b\.addresses: at least one HOST:PORT"),
        ({**MTLS, "addresses": ["triton"]}, r"backends\.b\.addresses: 'triton' is not HOST:PORT"),
        ({**MTLS, "deadline_s": 0}, r"backends\.b\.deadline_s: must be more than 0"),
        ({**MTLS, "max_in_flight": 0}, r"backends\.b\.max_in_flight: must be at least 1"),
        ({**MTLS, "max_message_bytes": 2**31}, r"backends\.b\.max_message_bytes: between 1 and"),
        # An answer the gateway could not send on, a deadline past the call's own limit.
        ({**MTLS, "max_message_bytes": 64 * 2**20 + 1}, r"backends\.b\.max_message_bytes: between 1 and limits\."),
        ({**MTLS, "deadline_s": 61}, r"backends\.b\.deadline_s: at most limits\.max_call_s \(60\)"),
        ({**MTLS, "models": {}}, r"backends\.b\.models: name the models it serves"),
        ({**MTLS, "models": {"a b": "x"}}, r"backends\.b\.models\.a b: model names are made of"),
        ({**MTLS, "modles": {}}, r"backends\.b\.modles: unknown key \(did you mean 'models'\?\)"),
    ],
)
def test_a_bad_backend_setting_is_refused_naming_its_key(tmp_path, backend, message):
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path, {"b": backend})


def test_a_model_routed_to_two_backends_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"backends\.second\.models\.mlp: already routed to backends\.first"):
        settings(tmp_path, {"first": MTLS, "second": MTLS})
    patterned = {**LOOPBACK, "models": {}, "model_patterns": ["ml*"]}
    with pytest.raises(ConfigError, match=r"backends\.p\.model_patterns: 'ml\*' also matches 'mlp'"):
        settings(tmp_path, {"first": MTLS, "p": patterned})


def test_backends_from_the_environment_are_a_json_object():
    found = environment_settings({"GATEWAY_BACKENDS": json.dumps({"sidecar": LOOPBACK})})
    assert found == {"backends": {"sidecar": LOOPBACK}}
    loaded = load_settings(
        None, {"tls.cert": "s.crt", "tls.key": "s.key", "tls.client_ca": "c", "auth.jwks": "j"}, found
    )
    assert loaded.backends["sidecar"].addresses == ("127.0.0.1:8081",) and loaded.backends["sidecar"].plaintext


def test_a_missing_backend_file_is_a_config_error_naming_its_key(tmp_path):
    """check_paths, as at start (exit 2), rather than a traceback when the channel is made."""
    from gateway.config import check_paths

    for name in ("s.crt", "s.key", "ca.crt", "jwks.json", "gw.crt", "gw.key"):
        (tmp_path / name).write_text("x")
    (tmp_path / "models").mkdir()
    (tmp_path / "policies").mkdir()
    path = tmp_path / "gateway.yaml"
    backend = {**MTLS, "token_file": "token"}
    path.write_text(
        SECURE
        + "models: {repository: models}\npolicies: {directory: policies}\nbackends: "
        + json.dumps({"b": backend})
    )
    with pytest.raises(ConfigError, match=r"backends\.b\.token_file: .*token is not a readable file"):
        check_paths(load_settings(path))
    (tmp_path / "token").write_text("t")
    (tmp_path / "gw.key").unlink()
    with pytest.raises(ConfigError, match=r"backends\.b\.key: .*gw\.key is not a readable file"):
        check_paths(load_settings(path))
