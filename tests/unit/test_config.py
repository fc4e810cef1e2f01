"""Settings: strict parsing, precedence flag > environment > file > default, errors naming the key or variable."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from gateway.config import (
    ConfigError,
    certs_dir_overrides,
    check_listen,
    check_paths,
    default_config_file,
    environment_settings,
    environment_variable,
    file_settings,
    load_settings,
    read_secret,
    setting_types,
)

TLS = "tls: {cert: s.crt, key: s.key, client_ca: ca.crt}\n"
SECURE = TLS + "auth: {jwks: jwks.json}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_defaults_are_secure_and_need_tls_material_and_the_error_says_how_to_give_it():
    with pytest.raises(ConfigError, match=r"tls\.cert: required") as raised:
        load_settings(None)
    assert "--certs DIR" in str(raised.value) and "set tls.cert in the config file" in str(raised.value)
    assert "./gateway.yaml" in str(raised.value)
    with pytest.raises(ConfigError, match=r"auth\.jwks: required to verify tokens; give --certs DIR"):
        load_settings(None, {"tls.cert": Path("s.crt"), "tls.key": Path("s.key"), "tls.client_ca": Path("ca.crt")})


def test_the_config_file_defaults_to_gateway_yaml_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_config_file() is None
    (tmp_path / "gateway.yaml").write_text(SECURE)
    assert default_config_file() == Path("gateway.yaml")
    assert load_settings(default_config_file()).tls.cert == tmp_path / "s.crt"


def test_file_paths_are_relative_to_the_file(tmp_path):
    settings = load_settings(write(tmp_path, SECURE + "models: {repository: m}\n"))
    assert settings.models.repository == tmp_path / "m"
    assert settings.tls.cert == tmp_path / "s.crt"


def test_flags_override_the_file_and_are_relative_to_the_working_directory(tmp_path):
    settings = load_settings(
        write(tmp_path, SECURE + "listen: 127.0.0.1:1\nmodels: {repository: m}\n"),
        {"listen": "127.0.0.1:2", "models.repository": Path("flag")},
    )
    assert settings.listen == "127.0.0.1:2"
    assert settings.models.repository == Path.cwd() / "flag"


def test_an_error_in_a_flag_value_names_the_key_not_the_file(tmp_path):
    config = write(tmp_path, SECURE + "listen: 127.0.0.1:1\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, {"listen": "nowhere"})
    assert str(raised.value) == (
        "listen: 'nowhere' is not HOST:PORT: write 127.0.0.1:8081 (this machine only) or 0.0.0.0:8081 (every interface)"
    )
    with pytest.raises(ConfigError, match=rf"^{config}: listen: 'also-nowhere' is not HOST:PORT: write "):
        load_settings(write(tmp_path, SECURE + "listen: also-nowhere\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lisen: 127.0.0.1:1\n", "lisen: unknown key (did you mean 'listen'?)"),
        ("limits: {max_mesage_bytes: 1}\n", "limits.max_mesage_bytes: unknown key (did you mean 'max_message_bytes'?)"),
        ("audit: {hmac_key: k}\n", "audit.hmac_key: unknown key (did you mean 'hmac_key_file'?)"),
        ("nothing_like_any_key: 1\n", "nothing_like_any_key: unknown key"),
    ],
)
def test_unknown_keys_suggest_the_closest_known_one(tmp_path, text, message):
    config = write(tmp_path, SECURE + text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert str(raised.value) == f"{config}: {message}"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n", "found duplicate key 'listen' (line 4, column 1)"),
        ("limits: {max_message_bytes: 1, max_message_bytes: 2}\n", "found duplicate key 'max_message_bytes'"),
    ],
    ids=["top-level", "nested"],
)
def test_duplicate_keys_are_refused_naming_file_and_line(tmp_path, text, where):
    config = write(tmp_path, SECURE + text)
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    assert str(raised.value).startswith(f"{config}: invalid YAML: ") and where in str(raised.value)


def test_yaml_syntax_errors_name_the_file_line_and_column(tmp_path):
    config = write(tmp_path, "listen: [127.0.0.1:1\ntls: {}\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config)
    message = str(raised.value)
    assert message.startswith(f"{config}: invalid YAML: ") and "(line 2, column 4)" in message
    assert "<unicode string>" not in message and "\n" not in message


def test_file_settings_check_values_but_not_the_material_only_serve_needs(tmp_path):
    auth = file_settings(write(tmp_path, "auth: {issuer: https://idp.example, max_token_lifetime_s: 600}\n")).auth
    assert (auth.issuer, auth.max_token_lifetime_s, auth.jwks) == ("https://idp.example", 600.0, None)
    with pytest.raises(ConfigError, match=r"gateway\.yaml: auth\.isuer: unknown key \(did you mean 'issuer'\?\)"):
        file_settings(write(tmp_path, "auth: {isuer: x}\n"))
    assert file_settings(None).auth.audience == "gateway"


def test_check_listen_refuses_an_address_in_use_naming_it(tmp_path):
    settings = load_settings(write(tmp_path, SECURE), {"listen": "127.0.0.1:0"})
    check_listen(settings)  # a free port: no error
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError) as raised:
            check_listen(load_settings(write(tmp_path, SECURE), {"listen": listen}))
    assert str(raised.value).startswith(f"listen: cannot listen on {listen}: Address already in use; ")
    assert "--listen HOST:PORT" in str(raised.value)


def test_check_listen_refuses_a_probe_address_in_use_naming_its_key(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        probe = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = load_settings(write(tmp_path, SECURE), {"listen": "127.0.0.1:0", "health.listen": probe})
        with pytest.raises(ConfigError) as raised:
            check_listen(settings)
    assert str(raised.value).startswith(f"health.listen: cannot listen on {probe}: Address already in use; ")


def test_the_probe_listener_may_use_an_address_other_machines_can_reach(tmp_path):
    # It tells only SERVING or NOT_SERVING; kubelet probes the pod's own address, not loopback.
    settings = load_settings(write(tmp_path, SECURE + "health: {listen: '0.0.0.0:8081'}\n"))
    assert settings.health.listen == "0.0.0.0:8081"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("limits: {max_workrs: 1}\n", r"limits\.max_workrs: unknown key"),
        ("limits: {unary_workers: 4}\n", r"limits\.unary_workers: unknown key"),  # gone with the handler threads
        ("limits: {per_principal: {max_streams: many}}\n", r"limits\.per_principal\.max_streams: expected a non-neg"),
        ("limits: {per_principal: {max_in_flight: 0}}\n", r"limits\.per_principal\.max_in_flight: must be at least 1"),
        ("limits: {per_principal: {max_calls: 1}}\n", r"limits\.per_principal\.max_calls: unknown key"),
        ("limits: {message_timeout_s: 0}\n", r"limits\.message_timeout_s: must be more than 0"),
        ("limits: {max_call_s: 0}\n", r"limits\.max_call_s: must be more than 0"),
        ("limits: {max_stream_s: 0}\n", r"limits\.max_stream_s: must be more than 0"),
        ("limits: {per_principal: {refusal_window_s: 0}}\n", r"limits\.per_principal\.refusal_window_s: must be more"),
        ("limits: {per_principal: {refusal_block_s: 0}}\n", r"limits\.per_principal\.refusal_block_s: must be more"),
        ("limits: {per_principal: {max_refusals: -1}}\n", r"limits\.per_principal\.max_refusals: expected a non-neg"),
        ("limits: {max_streams_per_connection: 0}\n", r"limits\.max_streams_per_connection: must be at least 1"),
        ("models: {run_threads: 0}\n", r"models\.run_threads: must be at least 1"),
        ("audit: {fsync: sometimes}\n", r"audit\.fsync: 'sometimes' is not one of none, batch, always"),
        ("keepalive: {time_s: true}\n", r"keepalive\.time_s: expected a non-negative number"),
        ("listen: nowhere\n", r"listen: 'nowhere' is not HOST:PORT"),
        ("health: {listen: nowhere}\n", r"health\.listen: 'nowhere' is not HOST:PORT"),
        ("health: {listen: '0.0.0.0:50051'}\n", r"health\.listen: port 50051 is the main port"),
        ("workers: 2\nlisten: '127.0.0.1:50051'\nhealth: {listen: '127.0.0.1:0'}\n", r"health\.listen: .* not 0"),
        ("auth: {jwks: j.json, algorithms: [RS256, none]}\n", r"auth\.algorithms: unsupported \['none'\]"),
        ("auth: {jwks: j.json, algorithms: [HS256]}\n", r"auth\.algorithms: \['HS256'\] need auth\.hmac_secret_file"),
        (
            "auth: {jwks: j.json, hmac_secret_file: s.key}\n",
            r"auth\.hmac_secret_file: set, but auth\.algorithms lists no",
        ),
        ("auth: {jwks: j.json, jwks_url: 'https://idp/k'}\n", r"auth\.jwks_url: set together with auth\.jwks; give"),
        ("auth: {jwks: j.json, discovery: true}\n", r"auth\.discovery: set together with auth\.jwks; give exactly"),
        ("auth: {jwks_url: 'https://idp/k', discovery: true}\n", r"auth\.discovery: set together with auth\.jwks_url"),
        ("auth: {jwks_url: 'http://idp/k'}\n", r"auth\.jwks_url: must be an https:// URL"),
        ("auth: {jwks_url: 'https://u@idp/k'}\n", r"auth\.jwks_url: must be https://HOST\[:PORT\]/PATH, without user"),
        ("auth: {jwks_url: 'https://idp:x/k'}\n", r"auth\.jwks_url: not a URL"),
        ("auth: {jwks_url: 3}\n", r"auth\.jwks_url: expected a non-empty string"),
        ("auth: {discovery: true, issuer: 'http://idp'}\n", r"auth\.issuer: must be an https:// URL \(auth\.discovery"),
        ("auth: {discovery: yes please}\n", r"auth\.discovery: expected true or false"),
        ("auth: {jwks: j.json, jwks_ca: ca.pem}\n", r"auth\.jwks_ca: only used to fetch keys"),
        ("auth: {jwks_url: 'https://idp/k', jwks_refresh_interval_s: 0}\n", r"auth\.jwks_refresh_interval_s: must be"),
        ("auth: {discovery: true, jwks_min_refresh_interval_s: 0}\n", r"auth\.jwks_min_refresh_interval_s: must be"),
        ("auth: {jwks_uri: 'https://idp/k'}\n", r"auth\.jwks_uri: unknown key \(did you mean 'jwks_url'\?\)"),
        ("models: {batching: {mlp: {max_batch_size: 1}}}\n", r"models\.batching\.mlp\.max_batch_size: must be between"),
        ("models: {batching: {mlp: {max_queue_delay_us: 2000000}}}\n", r"max_queue_delay_us: at most 1000000"),
        ("models: {batching: {mlp: {max_batch: 8}}}\n", r"models\.batching\.mlp\.max_batch: unknown key"),
        ("models: {batching: [mlp]}\n", r"models\.batching: expected a mapping of names"),
        (
            "models: {signatures: required, signature_trust: {certificate_chain: ca.pem}}\n",
            r"models\.signature_trust\.signer_identities: required with certificate_chain",
        ),
        (
            "models: {signatures: warn, signature_trust: {public_key: k.pem, signer_identities: [cn:x]}}\n",
            r"models\.signature_trust\.signer_identities: only with certificate_chain",
        ),
        (
            "models: {signatures: warn, signature_trust: {certificate_chain: ca.pem, signer_identities: "
            "[spiffe://x/y, release@example.org]}}\n",
            r"models\.signature_trust\.signer_identities: 'release@example\.org' must be a URI SAN .*"
            r"\(write email:release@example\.org\)",
        ),
        (
            "models: {signatures: warn, signature_trust: {certificate_chain: ca.pem, signer_identities: "
            "[dns:Signer.Example.org]}}\n",
            r"models\.signature_trust\.signer_identities: 'dns:Signer\.Example\.org' a DNS name is compared in low",
        ),
        (
            "models: {signatures: warn, signature_trust: {certificate_chain: ca.pem, signer_identities: ['cn:']}}\n",
            r"models\.signature_trust\.signer_identities: 'cn:' names nothing after 'cn:'",
        ),
        (
            "models: {signatures: warn, signature_trust: {certificate_chain: ca.pem, signer_identities: "
            "[' email:a@b']}}\n",
            r"models\.signature_trust\.signer_identities: ' email:a@b' has blank space around it",
        ),
        ("models: {versions: {mlp: {}}}\n", r"models\.versions\.mlp: give default \(a version\) or canary"),
        ("models: {versions: {mlp: {default: 0}}}\n", r"models\.versions\.mlp\.default: must be a version"),
        ("models: {versions: {mlp: {default: v1}}}\n", r"models\.versions\.mlp\.default: expected a non-negative"),
        ("models: {versions: {mlp: {pinned: 1}}}\n", r"models\.versions\.mlp\.pinned: unknown key"),
        ("models: {versions: {'m/x': {default: 1}}}\n", r"models\.versions\.m/x: not a model name"),
        ("models: {versions: {mlp: {canary: {percent: 5}}}}\n", r"models\.versions\.mlp\.canary\.version: required"),
        ("models: {versions: {mlp: {canary: {version: 2}}}}\n", r"models\.versions\.mlp\.canary\.percent: required"),
        (
            "models: {versions: {mlp: {canary: {version: 2, percent: 101}}}}\n",
            r"models\.versions\.mlp\.canary\.percent: required: the share of requests naming no version, 0 to 100",
        ),
        (
            "models: {versions: {mlp: {default: 2, canary: {version: 2, percent: 5}}}}\n",
            r"models\.versions\.mlp\.canary\.version: 2 is the default itself",
        ),
        (
            "models: {versions: {mlp: {canary: {version: 2, share: 5}}}}\n",
            r"models\.versions\.mlp\.canary\.share: unknown key",
        ),
        ("models: {providers: [cuda]}\n", r"models\.providers: unknown provider 'cuda' \(did you mean 'CUDA'\?\)"),
        (
            "models: {providers: [CUDAExecutionProvider]}\n",
            r"models\.providers: unknown provider 'CUDAExecutionProvider' \(did you mean 'CUDA'\?\)",
        ),
        ("models: {providers: []}\n", r"models\.providers: list at least one provider"),
        ("models: {providers: [CPU, CPU]}\n", r"models\.providers: CPU is listed twice"),
        ("models: {providers_by_model: {mlp: [GPU]}}\n", r"models\.providers_by_model\.mlp: unknown provider 'GPU'"),
        ("models: {provider_options: {Cuda: {device_id: 0}}}\n", r"models\.provider_options\.Cuda: unknown provider"),
        ("models: {provider_options: {CUDA: {trt: true}}}\n", r"models\.provider_options\.CUDA\.trt: expected a non-e"),
        ("tls: 3\n", r"tls: expected a mapping"),
        ("- a\n- b\n", r"expected a mapping at the top level"),
        ("a: [\n", r"invalid YAML"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    # The prefix gives what the case does not: a key written twice would be refused as a duplicate.
    prefixes = {"auth:": TLS, "tls:": "auth: {jwks: j.json}\n", "-": "", "a:": ""}
    prefix = next((p for start, p in prefixes.items() if text.startswith(start)), SECURE)
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, prefix + text))


def test_dev_insecure_transport_only_on_loopback(tmp_path):
    config = write(tmp_path, "dev_insecure_transport: true\ndev_no_auth: true\nlisten: 0.0.0.0:50051\n")
    with pytest.raises(ConfigError, match="only allowed on a loopback address"):
        load_settings(config)
    settings = load_settings(config, {"listen": "[::1]:50051"})
    assert settings.host_port == ("::1", 50051)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "10.1.2.3", "gateway.example"])  # noqa: S104 - refused, never bound
def test_dev_no_auth_is_refused_on_an_address_other_machines_can_reach(tmp_path, host):
    config = write(tmp_path, SECURE + f"dev_no_auth: true\nlisten: '{host}:50051'\n")
    with pytest.raises(ConfigError, match="dev_no_auth: only allowed on a loopback address"):
        load_settings(config)


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "10.1.2.3", "gateway.example"])  # noqa: S104 - refused, never bound
@pytest.mark.parametrize("source", ["file", "variable", "flag"])
def test_dev_audit_fail_open_is_refused_on_an_address_other_machines_can_reach(tmp_path, host, source):
    # Calls served with no record are as open as calls served with no authentication: only this machine may.
    listen = f"listen: '{host}:50051'\n"
    text = SECURE + listen + ("dev_audit_fail_open: true\n" if source == "file" else "")
    environ = {"GATEWAY_DEV_AUDIT_FAIL_OPEN": "true"} if source == "variable" else {}
    flags = {"dev_audit_fail_open": True} if source == "flag" else None
    named = "GATEWAY_DEV_AUDIT_FAIL_OPEN" if source == "variable" else "dev_audit_fail_open"
    with pytest.raises(ConfigError, match=f"(^|gateway.yaml: ){named}: only allowed on a loopback address"):
        env_settings(tmp_path, environ, text, flags)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_dev_audit_fail_open_is_allowed_on_loopback(tmp_path, host):
    settings = env_settings(tmp_path, {"GATEWAY_DEV_AUDIT_FAIL_OPEN": "true"}, SECURE + f"listen: '{host}:50051'\n")
    assert settings.dev_audit_fail_open


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_dev_no_auth_is_allowed_on_loopback(tmp_path, host):
    assert load_settings(write(tmp_path, SECURE + f"dev_no_auth: true\nlisten: '{host}:50051'\n")).dev_no_auth


def test_certs_dir_provides_tls_jwks_crl_and_audit_key(tmp_path):
    for name in ("server.crt", "server.key", "ca.crt", "jwks.json", "crl.pem", "audit-hmac.key"):
        (tmp_path / name).write_text("x")
    overrides = certs_dir_overrides(tmp_path)
    assert overrides["tls.crl"] == tmp_path / "crl.pem"
    assert overrides["audit.hmac_key_file"] == tmp_path / "audit-hmac.key"
    settings = load_settings(None, overrides)
    assert settings.tls.client_ca == tmp_path / "ca.crt"


@pytest.mark.parametrize("signing_key", ["ca.key", "jwt-signing.key"])
def test_certs_dir_holding_a_signing_key_is_refused(tmp_path, signing_key):
    for name in ("server.crt", "server.key", "ca.crt", "jwks.json", signing_key):
        (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError, match=rf"--certs: .* holds {signing_key}, a signing key the gateway never needs"):
        certs_dir_overrides(tmp_path)


def test_certs_dir_takes_the_server_folder_of_a_gen_certs_set(pki):
    with pytest.raises(ConfigError, match=rf"holds the whole set; .*: --certs {pki.dir}/server$"):
        certs_dir_overrides(pki.dir)
    overrides = certs_dir_overrides(pki.server_dir)
    assert overrides["tls.key"] == pki.path("server.key") and overrides["auth.jwks"] == pki.path("jwks.json")
    assert overrides["audit.hmac_key_file"] == pki.path("audit-hmac.key")


def test_certs_given_the_signing_or_a_client_folder_names_the_server_folder(pki):
    signing, alice = pki.dir / "signing", pki.dir / "clients" / "alice"
    with pytest.raises(ConfigError) as raised:
        certs_dir_overrides(signing)
    assert str(raised.value) == (
        f"--certs: {signing} is the signing folder (the CA and the token signing key, for gateway token issue "
        f"--key); give the gateway's own folder: --certs {pki.dir / 'server'}"
    )
    with pytest.raises(ConfigError) as raised:
        certs_dir_overrides(alice)
    assert str(raised.value) == (
        f"--certs: {alice} is the client folder of alice (for the client commands' --ca, --cert and --key); give "
        f"the gateway's own folder: --certs {pki.dir / 'server'}"
    )


def test_a_port_alone_where_host_and_port_belong_says_how_to_write_it():
    with pytest.raises(ConfigError) as raised:
        load_settings(None, {"health.listen": "8081"})
    assert str(raised.value) == (
        "health.listen: '8081' is not HOST:PORT: write 127.0.0.1:8081 (this machine only) or 0.0.0.0:8081 "
        "(every interface)"
    )


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_secret_readable_by_its_owner_alone_is_read(tmp_path, mode):
    path = tmp_path / "server.key"
    path.write_bytes(b"secret")
    path.chmod(mode)
    assert read_secret(path, key="tls.key") == b"secret"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o610])
def test_secret_open_to_group_or_others_is_refused_naming_the_file_and_the_fix(tmp_path, mode):
    path = tmp_path / "server.key"
    path.write_bytes(b"secret")
    path.chmod(mode)
    message = f"tls.key: {path} is accessible to group or others (mode {mode:04o}); run: chmod 600 {path}"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        read_secret(path, key="tls.key")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_secret_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "audit-hmac.key"
    path.write_bytes(b"secret")
    path.chmod(0o600)
    os.chown(path, 4242, -1)  # that user could rewrite the key, or open its mode, at any time
    with pytest.raises(ConfigError, match=rf"audit\.hmac_key_file: .* is owned by uid 4242, .*; run: chown 0 {path}$"):
        read_secret(path, key="audit.hmac_key_file")


def test_unreadable_secret_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"auth\.hmac_secret_file: .*nope\.key: cannot read"):
        read_secret(tmp_path / "nope.key", key="auth.hmac_secret_file")


def test_the_example_gateway_yaml_holds_every_option_with_its_default():
    from gateway.config import Settings

    root = Path(__file__).resolve().parents[2]
    example = load_settings(root / "gateway.yaml")
    defaults = Settings()
    # Every section and scalar matches the built-in defaults, except the paths the example fills in.
    for section in ("auth", "policies", "models", "audit", "limits", "keepalive", "tls", "health"):
        got, want = getattr(example, section), getattr(defaults, section)
        for name in want.__dataclass_fields__:
            value = getattr(got, name)
            if isinstance(value, Path):
                continue
            assert value == getattr(want, name), f"{section}.{name}"


def test_keys_from_a_url_or_discovery_need_no_jwks_file(tmp_path):
    remote = load_settings(write(tmp_path, TLS + "auth: {jwks_url: 'https://idp.example/keys', jwks_ca: ca.pem}\n"))
    assert (remote.auth.jwks, remote.auth.jwks_url) == (None, "https://idp.example/keys")
    assert remote.auth.jwks_ca == tmp_path / "ca.pem"
    discovered = load_settings(write(tmp_path, TLS + "auth: {discovery: true, issuer: 'https://idp.example'}\n"))
    assert discovered.auth.discovery and discovered.auth.jwks_refresh_interval_s == 300.0
    for name in ("s.crt", "s.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError, match=r"auth\.jwks_ca: .*ca\.pem is not a readable file"):
        check_paths(remote)


def test_missing_files_and_folders_are_startup_errors_naming_the_key(tmp_path):
    for name in ("s.crt", "s.key", "ca.crt", "jwks.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "models").mkdir()
    (tmp_path / "policies").mkdir()
    base = SECURE + "models: {repository: models}\npolicies: {directory: policies}\n"
    check_paths(load_settings(write(tmp_path, base)))  # everything there: no error
    with_crl = base.replace(TLS, "tls: {cert: s.crt, key: s.key, client_ca: ca.crt, crl: gone.pem}\n")
    for text, message in [
        (base + "audit: {hmac_key_file: missing.key}\n", r"audit\.hmac_key_file: .*missing\.key is not a readable"),
        (with_crl, r"tls\.crl: .*gone\.pem is not"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_paths(load_settings(write(tmp_path, text)))
    for key, folder in (("models", "repository"), ("policies", "directory")):
        text = base.replace(f"{key}: {{{folder}: {key}}}", f"{key}: {{{folder}: nowhere}}")
        with pytest.raises(ConfigError, match=rf"{key}\.{folder}: .*nowhere is not a directory"):
            check_paths(load_settings(write(tmp_path, text)))


@pytest.mark.parametrize(
    ("key", "value", "bound"),
    [("max_message_bytes", 2**30, 2**30 - 1), ("max_metadata_bytes", 2**31, 2**31 - 1)],
)
def test_limits_past_grpcs_32_bit_options_are_a_config_error_naming_the_key(tmp_path, key, value, bound):
    # grpc raised OverflowError at start for these, after the settings were accepted.
    config = write(tmp_path, SECURE + f"limits: {{{key}: {value}}}\n")
    with pytest.raises(ConfigError, match=rf"limits\.{key}: at most {bound} "):
        load_settings(config)
    load_settings(write(tmp_path, SECURE + f"limits: {{{key}: {bound}}}\n"))


def env_settings(tmp_path: Path, environ: dict[str, str], text: str = SECURE, flags: dict | None = None):
    return load_settings(write(tmp_path, text), flags, environment_settings(environ))


def test_every_setting_has_a_variable_named_after_its_key():
    names = {environment_variable(key) for key in setting_types()}
    assert {
        "GATEWAY_LISTEN",
        "GATEWAY_AUDIT__CHAIN_ID",
        "GATEWAY_LIMITS__PER_PRINCIPAL__MAX_IN_FLIGHT",
        "GATEWAY_MODELS__BATCHING",
        "GATEWAY_DEV_NO_AUTH",
    } <= names
    assert "GATEWAY_LIMITS__PER_PRINCIPAL" not in names  # a section is its fields, each its own variable


def test_variables_are_parsed_by_the_fields_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = env_settings(
        tmp_path,
        {
            "GATEWAY_WORKERS": "3",
            "GATEWAY_SHUTDOWN_DRAIN_S": "2.5",
            "GATEWAY_MODELS__STRICT": "true",
            "GATEWAY_TLS__SERVER_NAMES": "gateway, gateway.svc",
            "GATEWAY_AUDIT__PATH": "trail/audit.log",
            "GATEWAY_AUDIT__CHAIN_ID": "gateway-7d9f-abcde",
            "GATEWAY_LIMITS__PER_PRINCIPAL__MAX_IN_FLIGHT": "7",
            "GATEWAY_LIMITS__PER_PRINCIPAL__MAX_REFUSALS": "0",
            "GATEWAY_LIMITS__MAX_STREAM_S": "600",
            "GATEWAY_MODELS__BATCHING": '{"mlp": {"max_batch_size": 8}}',
            "GATEWAY_METRICS__LISTEN": "0.0.0.0:9464",
        },
    )
    assert settings.workers == 3 and settings.shutdown_drain_s == 2.5 and settings.models.strict is True
    assert settings.tls.server_names == ("gateway", "gateway.svc")
    assert settings.audit.path == tmp_path / "trail/audit.log"  # the working directory, like a flag's path
    assert settings.audit.chain_id == "gateway-7d9f-abcde"
    assert settings.limits.per_principal.max_in_flight == 7
    assert settings.limits.per_principal.max_refusals == 0 and settings.limits.max_stream_s == 600
    assert settings.models.batching["mlp"].max_batch_size == 8
    assert settings.metrics.listen == "0.0.0.0:9464"


def test_flags_win_over_variables_which_win_over_the_file(tmp_path):
    text = SECURE + "workers: 2\nlog_level: debug\nshutdown_grace_s: 3\n"
    environ = {"GATEWAY_WORKERS": "4", "GATEWAY_LOG_LEVEL": "warning"}
    settings = env_settings(tmp_path, environ, text, flags={"workers": 5})
    assert (settings.workers, settings.log_level, settings.shutdown_grace_s) == (5, "warning", 3.0)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GATEWAY_WORKERS", "x", "GATEWAY_WORKERS: expected a non-negative integer, got 'x'"),
        ("GATEWAY_WORKERS", "-1", "GATEWAY_WORKERS: expected a non-negative integer, got '-1'"),
        ("GATEWAY_WORKERS", "99", "GATEWAY_WORKERS: must be between 1 and 64"),
        ("GATEWAY_MODELS__STRICT", "1", "GATEWAY_MODELS__STRICT: expected true or false, got '1'"),
        ("GATEWAY_SHUTDOWN_GRACE_S", "soon", "GATEWAY_SHUTDOWN_GRACE_S: expected a non-negative number, got 'soon'"),
        ("GATEWAY_SHUTDOWN_GRACE_S", "inf", "GATEWAY_SHUTDOWN_GRACE_S: expected a non-negative number, got inf"),
        ("GATEWAY_SHUTDOWN_GRACE_S", "nan", "GATEWAY_SHUTDOWN_GRACE_S: expected a non-negative number, got nan"),
        ("GATEWAY_LOG_LEVEL", "loud", "GATEWAY_LOG_LEVEL: 'loud' is not one of debug, info, warning, error"),
        ("GATEWAY_LISTEN", "", "GATEWAY_LISTEN: expected a non-empty string, got ''"),
        ("GATEWAY_AUDIT__PATH", "", "GATEWAY_AUDIT__PATH: expected a path, got ''"),
        ("GATEWAY_TLS__SERVER_NAMES", "a,,b", "GATEWAY_TLS__SERVER_NAMES: expected a list of strings"),
        ("GATEWAY_MODELS__BATCHING", "{mlp}", "GATEWAY_MODELS__BATCHING: not JSON"),
        ("GATEWAY_MODELS__BATCHING", "[1]", "GATEWAY_MODELS__BATCHING: expected a mapping of names"),
        (
            "GATEWAY_MODELS__BATCHING",
            '{"mlp": {"max_batch_size": 1}}',
            "GATEWAY_MODELS__BATCHING: models.batching.mlp.max_batch_size: must be between 2 and 4096",
        ),
        ("GATEWAY_AUDIT__CHAIN_ID", "a b", "GATEWAY_AUDIT__CHAIN_ID: chain_id must"),
    ],
)
def test_a_bad_variable_is_an_error_naming_the_variable(tmp_path, variable, value, message):
    with pytest.raises(ConfigError) as raised:
        env_settings(tmp_path, {variable: value})
    assert str(raised.value).startswith(message)


def test_a_file_error_names_the_file_and_a_flag_error_the_key_alone_with_variables_set(tmp_path):
    config = write(tmp_path, SECURE + "workers: x\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: workers: expected a non-negative integer"):
        load_settings(config, None, environment_settings({"GATEWAY_LOG_LEVEL": "debug"}))
    with pytest.raises(ConfigError, match=r"^workers: must be between 1 and 64"):
        env_settings(tmp_path, {"GATEWAY_WORKERS": "2"}, flags={"workers": 99})


def test_an_unknown_gateway_variable_is_an_error_naming_each_with_a_suggestion():
    with pytest.raises(ConfigError) as raised:
        environment_settings({"GATEWAY_WORKER": "2", "GATEWAY_NOPE": "1", "HOME": "/root", "XGATEWAY_A": "1"})
    assert str(raised.value) == (
        "GATEWAY_NOPE, GATEWAY_WORKER (did you mean 'GATEWAY_WORKERS'?): unknown environment variables "
        "(docs/deploy.md lists them)"
    )


def test_ignored_variables_are_left_alone():
    assert environment_settings({"GATEWAY_TARGET": "x:1", "GATEWAY_WORKERS": "2"}, ignored={"GATEWAY_TARGET"}) == {
        "workers": 2
    }


def test_a_non_finite_number_in_the_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"shutdown_grace_s: expected a non-negative number, got inf"):
        load_settings(write(tmp_path, SECURE + "shutdown_grace_s: .inf\n"))


def test_docs_name_every_variable():
    text = (Path(__file__).parents[2] / "docs" / "deploy.md").read_text()
    missing = [environment_variable(key) for key in setting_types() if f"`{environment_variable(key)}`" not in text]
    assert not missing, f"docs/deploy.md does not list {missing}: add a row to its table"


def test_the_rest_listener_is_off_unless_set_and_its_settings_are_read(tmp_path):
    assert load_settings(write(tmp_path, SECURE)).http.listen is None
    settings = load_settings(
        write(tmp_path, SECURE + "http: {listen: '0.0.0.0:8443', max_connections: 10, idle_timeout_s: 2}\n")
    )
    assert (settings.http.listen, settings.http.max_connections, settings.http.idle_timeout_s) == (
        "0.0.0.0:8443",
        10,
        2.0,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"listen": "127.0.0.1:9000", "http.listen": "127.0.0.1:9000"}, "http.listen: port 9000 is already listen's"),
        ({"http.listen": "127.0.0.1:0", "http.max_connections": 0}, "http.max_connections: must be between"),
        ({"http.listen": "127.0.0.1:0", "http.idle_timeout_s": 0}, "http.idle_timeout_s: must be more than 0"),
        ({"http.listen": "127.0.0.1:0", "http.max_header_bytes": 1024}, "http.max_header_bytes: between"),
        ({"http.listen": "nonsense"}, "http.listen"),
    ],
)
def test_bad_rest_settings_are_errors_naming_their_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(write(tmp_path, SECURE), overrides)


def test_the_rest_listener_is_https_only(tmp_path):
    with pytest.raises(ConfigError, match=r"^http.listen: HTTPS only"):
        load_settings(
            None, {"dev_insecure_transport": True, "auth.jwks": write(tmp_path, "{}"), "http.listen": "127.0.0.1:0"}
        )


def test_check_listen_refuses_a_rest_address_in_use_naming_its_key(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rest = f"127.0.0.1:{taken.getsockname()[1]}"
        settings = load_settings(write(tmp_path, SECURE), {"listen": "127.0.0.1:0", "http.listen": rest})
        with pytest.raises(ConfigError, match=rf"^http.listen: cannot listen on {rest}: Address already in use; "):
            check_listen(settings)
