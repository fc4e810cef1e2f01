"""The ``gateway`` command end to end: client commands against a real gateway over mutual TLS, token issue,
policy check and audit verify, each run as ``python -m gateway`` in a subprocess, with its exit code."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import ROOT

TIMEOUT_S = 30
X = np.random.default_rng(11).random((2, 784), dtype=np.float32)
ALICE_ID = "spiffe://gateway.local/client/alice"


@pytest.fixture
def gw(start_gateway):
    return start_gateway()


# The commands read ./gateway.yaml when it is there: they run in this folder, which has none, unless told.
HERE = Path(__file__).resolve().parent


def run(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path = HERE, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``python -m gateway ARGS`` (the tree under test) with only the given GATEWAY_* variables set."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "GRPC_"))}
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        stderr=subprocess.PIPE,
        text=True,
        env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=cwd,
        timeout=TIMEOUT_S,
        check=False,
        **kwargs,
    )


def client_env(gw, client: str = "alice", token: str | None = None) -> dict[str, str]:
    """The connection settings of ``client`` as GATEWAY_* variables, with a token bound to its certificate."""
    return {
        "GATEWAY_TARGET": gw.target,
        "GATEWAY_CA": str(gw.pki.path("ca.crt")),
        "GATEWAY_CERT": str(gw.pki.path(f"{client}.crt")),
        "GATEWAY_KEY": str(gw.pki.path(f"{client}.key")),
        "GATEWAY_TOKEN": token if token is not None else gw.token(client, bind=client),
    }


def ok(result: subprocess.CompletedProcess[str]):
    """The JSON a successful command printed."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def refused(gw, result: subprocess.CompletedProcess[str], code: str) -> dict:
    """Exit 1, the error with its code and request id on stderr, nothing on stdout; its audit record."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert code in result.stderr and "error:" in result.stderr
    request_id = result.stderr.rsplit("request id ", 1)[1].split(";")[0]
    (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id]
    assert record["code"] == code
    return record


def usage_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert fragment in result.stderr
    assert result.stdout == ""


def reference(models: Path, version: int, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(
        str(models / "mlp" / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"input": x})[0]


def strict_json(text: str):
    """JSON as RFC 8259 has it: NaN and Infinity are not numbers there."""

    def refuse(constant: str):
        raise AssertionError(f"{constant} in the output")

    return json.loads(text, parse_constant=refuse)


def output_of(printed: dict) -> np.ndarray:
    """The ``output`` tensor of ``gateway predict``'s JSON, checked against its own datatype and shape."""
    tensor = printed["outputs"]["output"]
    array = np.asarray(tensor["data"], dtype=np.float32)
    assert tensor["datatype"] == "FP32" and list(array.shape) == tensor["shape"]
    return array


# ------------------------------------------------------------------------------------------ client commands


def test_models_prints_the_models_as_json(gw):
    models = ok(run("models", env=client_env(gw)))
    assert {"name": "mlp", "versions": ["1", "2"], "default_version": "2"} in models
    assert sorted(m["name"] for m in models) == ["digits", "iris", "labels", "mlp"]


def test_models_shows_only_what_the_caller_may_list(gw):
    assert [m["name"] for m in ok(run("models", env=client_env(gw, "bob")))] == ["digits"]


def test_metadata_prints_the_signature(gw):
    meta = ok(run("metadata", "--model", "mlp", env=client_env(gw)))
    digest = meta.pop("model_digest")  # the bytes loaded (tests/e2e/test_model_signatures.py checks its value)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert meta == {
        "name": "mlp",
        "version": "2",
        "versions": ["1", "2"],
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}],
        "execution_provider": "CPU",
    }
    assert ok(run("metadata", "--model", "mlp", "--version", "1", env=client_env(gw)))["version"] == "1"


def test_predict_with_a_flat_list_matches_onnxruntime(gw, demo_models):
    printed = ok(run("predict", "--model", "mlp", "--input", json.dumps(X[0].tolist()), env=client_env(gw)))
    assert (printed["model"], printed["version"]) == ("mlp", "2")
    assert len(printed["request_id"]) == 32
    np.testing.assert_allclose(output_of(printed), reference(demo_models, 2, X[:1]), rtol=1e-5)


def test_predict_with_named_tensors_runs_the_requested_version(gw, demo_models):
    inputs = json.dumps({"input": X.tolist()})
    printed = ok(run("predict", "--model", "mlp", "--version", "1", "--input", inputs, env=client_env(gw)))
    assert printed["version"] == "1"
    np.testing.assert_allclose(output_of(printed), reference(demo_models, 1, X), rtol=1e-5)
    record = next(r for r in gw.audit_records() if r["request_id"] == printed["request_id"])
    assert record["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [2, 784]}]


def test_predict_with_a_typed_tensor_object(gw, demo_models):
    typed = {"input": {"datatype": "FP32", "shape": [2, 784], "data": X.ravel().tolist()}}
    printed = ok(run("predict", "--model", "mlp", "--input", json.dumps(typed), env=client_env(gw)))
    np.testing.assert_allclose(output_of(printed), reference(demo_models, 2, X), rtol=1e-5)


@pytest.mark.parametrize("suffix", [".json", ".npy"])
def test_predict_with_an_input_file(gw, demo_models, tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    if suffix == ".npy":
        np.save(path, X)
    else:
        path.write_text(json.dumps({"input": X.tolist()}))
    printed = ok(run("predict", "--model", "mlp", "--input-file", path, env=client_env(gw)))
    np.testing.assert_allclose(output_of(printed), reference(demo_models, 2, X), rtol=1e-5)


def test_predict_prints_strict_json_with_non_finite_numbers_as_strings(gw, tmp_path):
    x = X[:1].copy()
    x[0, 0] = np.nan
    path = tmp_path / "nan.npy"
    np.save(path, x)
    result = run("predict", "--model", "mlp", "--input-file", path, env=client_env(gw))
    assert result.returncode == 0, result.stderr
    tensor = strict_json(result.stdout)["outputs"]["output"]
    assert tensor["data"] == [["NaN"] * 10] and tensor["shape"] == [1, 10]


@pytest.mark.parametrize("dtype", ["complex64", "V4", "datetime64[s]"])
def test_predict_with_an_npy_of_an_unsupported_dtype_exits_2(gw, tmp_path, dtype):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((1, 3), dtype=dtype))
    usage_error(run("predict", "--model", "mlp", "--input-file", path, env=client_env(gw)), "unsupported dtype")
    assert gw.audit_records() == []  # refused before connecting


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY"], ids=["empty", "cut-short"])
def test_predict_with_a_broken_npy_is_one_line_exit_2(gw, tmp_path, content):
    path = tmp_path / "x.npy"
    path.write_bytes(content)
    result = run("predict", "--model", "mlp", "--input-file", path, env=client_env(gw))
    assert result.returncode == 2 and one_line(result).startswith(f"error: --input-file {path}: ")


def test_flags_override_the_environment(gw):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    env = {**client_env(gw, "bob"), "GATEWAY_TARGET": dead}
    alice = client_env(gw, "alice")
    flags = ["--target", gw.target, "--cert", alice["GATEWAY_CERT"], "--key", alice["GATEWAY_KEY"]]
    flags += ["--token", alice["GATEWAY_TOKEN"], "--timeout", "10"]
    models = ok(run("models", *flags, env=env))
    assert [m["name"] for m in models] == ["digits", "iris", "labels", "mlp"]  # alice's view, not bob's
    assert gw.audit_records()[-1]["sub"] == "alice"


def test_token_file_flag_overrides_a_token_in_the_environment(gw, tmp_path):
    token_file = tmp_path / "alice.jwt"
    token_file.write_text(gw.token() + "\n")
    env = {**client_env(gw), "GATEWAY_TOKEN": "garbage"}
    printed = ok(
        run("predict", "--model", "mlp", "--input", json.dumps(X[0].tolist()), "--token-file", token_file, env=env)
    )
    assert printed["version"] == "2"


def test_token_file_from_the_environment_is_used(gw, tmp_path):
    token_file = tmp_path / "alice.jwt"
    token_file.write_text(gw.token())
    env = client_env(gw)
    del env["GATEWAY_TOKEN"]
    env["GATEWAY_TOKEN_FILE"] = str(token_file)
    assert ok(run("metadata", "--model", "digits", env=env))["name"] == "digits"


def test_client_commands_ignore_the_servers_variables(gw):
    env = {**client_env(gw), "GATEWAY_WORKERS": "x", "GATEWAY_AUDIT__PATH": "/nowhere"}
    assert "mlp" in {m["name"] for m in ok(run("models", env=env))}


def test_client_commands_refuse_an_unknown_variable_with_the_closest_name(gw):
    env = {**client_env(gw), "GATEWAY_TOKN_FILE": "alice.jwt", "GATEWAY_NOT_A_SETTING": "1"}
    result = run("models", env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        "error: GATEWAY_NOT_A_SETTING, GATEWAY_TOKN_FILE (did you mean 'GATEWAY_TOKEN_FILE'?): unknown environment "
        "variables (gateway predict --help lists them)\n"
    )


def test_client_commands_refuse_to_send_without_a_token(gw):
    env = {k: v for k, v in client_env(gw).items() if k != "GATEWAY_TOKEN"}
    for command in (["models"], ["metadata", "--model", "mlp"], ["predict", "--model", "mlp", "--input", "[1]"]):
        result = run(*command, env=env)
        assert (result.returncode, result.stdout) == (2, "")
        assert result.stderr == (
            "error: no token: give --token-file FILE (GATEWAY_TOKEN_FILE), --token TOKEN (GATEWAY_TOKEN) or "
            "--token-url URL (GATEWAY_TOKEN_URL); `gateway token issue` makes one\n"
        )
    assert not [r for r in gw.audit_records() if r["code"] == "UNAUTHENTICATED"]  # nothing was sent


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "soon"])
def test_a_timeout_that_is_not_a_positive_number_is_a_usage_error(gw, timeout):
    result = run("models", "--timeout", timeout, env=client_env(gw))
    assert (result.returncode, result.stdout) == (2, "")
    assert f"argument --timeout: {timeout!r} is not a number of seconds over 0" in result.stderr


@pytest.mark.parametrize("scheme", ["https", "http", "grpc"])
def test_a_target_with_a_url_scheme_says_to_give_host_and_port(gw, scheme):
    env = {**client_env(gw), "GATEWAY_TARGET": f"{scheme}://{gw.target}/"}
    result = run("models", env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"error: target '{scheme}://{gw.target}/': give HOST:PORT without a scheme ('{gw.target}'): "
        "TLS is set by the client, not the target\n"
    )


def test_token_issue_reads_the_auth_settings_serve_reads_from_gateway_variables(pki):
    key = pki.path("jwt-signing.key")
    env = {"GATEWAY_AUTH__AUDIENCE": "billing", "GATEWAY_TARGET": "elsewhere:1"}
    result = run("token", "issue", "--key", key, "--sub", "a", env=env)
    assert result.returncode == 0, result.stderr
    assert jwt.decode(result.stdout.strip(), options={"verify_signature": False})["aud"] == "billing"
    result = run("token", "issue", "--key", key, "--sub", "a", env={"GATEWAY_AUTH__AUDIENS": "billing"})
    assert result.returncode == 2 and result.stderr.startswith(
        "error: GATEWAY_AUTH__AUDIENS (did you mean 'GATEWAY_AUTH__AUDIENCE'?): unknown environment variable"
    )


def test_permission_denied_exits_1_with_the_error_on_stderr(gw):
    result = run("predict", "--model", "mlp", "--input", "[0.5]", env=client_env(gw, "bob"))
    record = refused(gw, result, "PERMISSION_DENIED")
    assert record["sub"] == "bob"
    assert result.stderr == (
        "error: no rule lets you 'predict' on model 'mlp' (it may not exist) (code PERMISSION_DENIED, request id "
        f"{record['request_id']}; see call_refused in the gateway's log)\n"
    )


def test_garbage_token_exits_1_unauthenticated(gw):
    refused(gw, run("models", env=client_env(gw, token="garbage")), "UNAUTHENTICATED")


def test_unknown_model_exits_1_not_found(gw):
    refused(gw, run("metadata", "--model", "no-such-model", env=client_env(gw)), "NOT_FOUND")


def test_input_that_does_not_match_the_signature_exits_1_invalid_argument(gw):
    refused(gw, run("predict", "--model", "mlp", "--input", "[0.5, 0.25]", env=client_env(gw)), "INVALID_ARGUMENT")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["predict", "--input", "[1]"], "--model"),
        (["predict", "--model", "mlp"], "--input"),
        (["predict", "--model", "mlp", "--input", "{not json"], "not JSON"),
        (["predict", "--model", "mlp", "--input", '"a string"'], "input must be"),
        (["predict", "--model", "mlp", "--input", "[[0.5], [0.25]]"], "flat numbers"),
        (["predict", "--model", "mlp", "--input", '{"input": [[1], [2, 3]]}'], "input 'input'"),
        (["predict", "--model", "mlp", "--input", "[1]", "--input-file", "x.json"], "not allowed with"),
        (["predict", "--model", "mlp", "--input-file", "does-not-exist.json"], "does-not-exist.json"),
        (["metadata"], "--model"),
        (["no-such-command"], "invalid choice"),
    ],
    ids=[
        "missing-model",
        "missing-input",
        "bad-json",
        "not-a-tensor",
        "nested-list",
        "ragged",
        "input-and-file",
        "missing-file",
        "metadata-missing-model",
        "unknown-command",
    ],
)
def test_usage_errors_exit_2(gw, args, fragment):
    usage_error(run(*args, env=client_env(gw)), fragment)


def test_missing_target_without_environment_exits_2(gw):
    env = client_env(gw)
    del env["GATEWAY_TARGET"]
    usage_error(run("models", env=env), "missing --target")
    usage_error(
        run("predict", "--model", "mlp", "--input", "[1]"),
        "missing --target (GATEWAY_TARGET), --ca (GATEWAY_CA), --cert (GATEWAY_CERT), --key (GATEWAY_KEY)",
    )


def test_both_token_and_token_file_exit_2(gw, tmp_path):
    token_file = tmp_path / "t.jwt"
    token_file.write_text(gw.token())
    usage_error(run("models", "--token", gw.token(), "--token-file", token_file, env=client_env(gw)), "not both")
    env = {**client_env(gw), "GATEWAY_TOKEN_FILE": str(token_file)}
    usage_error(run("models", env=env), "not both")


def test_unreadable_certificate_exits_2(gw, tmp_path):
    usage_error(run("models", "--cert", tmp_path / "missing.crt", env=client_env(gw)), "missing.crt")


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed on stderr: no traceback, no grpc log before it."""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    return result.stderr.strip()


@pytest.mark.parametrize(
    ("flag", "name", "line"),
    [
        ("--key", "bob.key", "error: key {bob.key} does not match cert {alice.crt}: it is another key pair's"),
        ("--key", "alice.crt", "error: key {alice.crt}: not an unencrypted PEM private key"),
        ("--cert", "alice.key", "error: cert {alice.key}: not a PEM certificate"),
        ("--ca", "jwks.json", "error: ca {jwks.json}: not a PEM certificate"),
    ],
    ids=["key-of-another-certificate", "certificate-as-key", "key-as-certificate", "jwks-as-ca"],
)
def test_tls_material_mistakes_are_one_line_exit_2_before_connecting(gw, flag, name, line):
    result = run("models", flag, gw.pki.path(name), env=client_env(gw))
    for file in ("alice.crt", "alice.key", "bob.key", "jwks.json"):
        line = line.replace(f"{{{file}}}", str(gw.pki.path(file)))
    assert (result.returncode, one_line(result)) == (2, line)
    assert gw.audit_records() == []


def test_missing_or_empty_token_file_is_one_line_exit_2(gw, tmp_path):
    env = client_env(gw)
    del env["GATEWAY_TOKEN"]
    missing = run("models", "--token-file", tmp_path / "nope.jwt", env=env)
    assert (missing.returncode, one_line(missing)) == (
        2,
        f"error: --token-file {tmp_path}/nope.jwt: No such file or directory",
    )
    (tmp_path / "empty.jwt").write_text("\n")
    empty = run("models", env={**env, "GATEWAY_TOKEN_FILE": str(tmp_path / "empty.jwt")})
    assert (empty.returncode, one_line(empty)) == (2, f"error: --token-file {tmp_path}/empty.jwt: empty")
    assert gw.audit_records() == []


def test_unreachable_server_and_unknown_host_are_one_line_exit_1(gw):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    refused = run("models", "--target", dead, "--timeout", "5", env=client_env(gw))
    assert refused.returncode == 1 and "Connection refused" in one_line(refused)
    unknown = run("models", "--target", "no-such-host.invalid:50051", "--timeout", "5", env=client_env(gw))
    assert unknown.returncode == 1 and "no-such-host.invalid" in one_line(unknown)


def test_output_cut_off_by_its_reader_is_one_line_exit_1(gw):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as when `| head` has had enough
    try:
        result = run("metadata", "--model", "mlp", env=client_env(gw), stdout=write_end)
    finally:
        os.close(write_end)
    assert (result.returncode, one_line(result)) == (1, "error: output cut off: the program reading it closed the pipe")


def test_closed_stdout_is_one_line_exit_2_and_nothing_is_done(pki):
    command = [sys.executable, "-m", "gateway", "token", "issue", "--key", pki.path("jwt-signing.key"), "--sub", "a"]
    result = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *map(str, command)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=HERE,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert (result.returncode, one_line(result)) == (2, "error: standard output is closed: nowhere to print the result")


def test_ctrl_c_during_a_call_is_one_line_exit_130(gw):
    with socket.socket() as silent:  # accepts the connection, never answers the TLS handshake
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "GRPC_"))}
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "models", "--target", target, "--timeout", "60"],
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**base, "PYTHONPATH": str(ROOT), **client_env(gw), "GATEWAY_TARGET": target},
            cwd=HERE,
        )
        try:
            connection, _ = silent.accept()  # the command is inside its call now
            with connection:
                process.send_signal(signal.SIGINT)
                _, stderr = process.communicate(timeout=TIMEOUT_S)
        finally:
            process.kill()
    assert (process.returncode, stderr) == (130, "error: interrupted\n")


@pytest.mark.parametrize(
    ("inputs", "line"),
    [
        ('{"input": [1], "input": [2]}', "error: --input: duplicate member 'input'"),
        (
            '{"input": {"data": [1], "shap": [1, 1]}}',
            "error: input 'input': unknown key 'shap' (did you mean 'shape'?)",
        ),
        ('{"input": {"dta": [1]}}', "error: input 'input': unknown key 'dta' (did you mean 'data'?)"),
        ('{"input": {"datatype": "FP32"}}', "error: input 'input': missing key 'data'"),
        (
            '{"input": {"data": [1], "datatype": "FP33"}}',
            "error: input 'input': unknown datatype 'FP33' (did you mean 'FP32'?)",
        ),
    ],
    ids=["duplicate-name", "misspelt-shape", "misspelt-data", "no-data", "unknown-datatype"],
)
def test_input_json_mistakes_are_refused_not_ignored(gw, tmp_path, inputs, line):
    result = run("predict", "--model", "mlp", "--input", inputs, env=client_env(gw))
    assert (result.returncode, one_line(result)) == (2, line)
    path = tmp_path / "x.json"
    path.write_text(inputs)
    from_file = run("predict", "--model", "mlp", "--input-file", path, env=client_env(gw))
    assert from_file.returncode == 2 and line.removeprefix("error: ").removeprefix("--input: ") in from_file.stderr
    assert gw.audit_records() == []


def test_version_prints_the_installed_version():
    result = run("--version")
    assert (result.returncode, result.stdout) == (0, f"gateway {importlib.metadata.version('gateway')}\n")


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (
            ["serve"],
            ["--config FILE settings file (default: ./gateway.yaml when it exists)", "default: 127.0.0.1:50051"],
        ),
        (["serve"], ["--log-format {json,console}", "--log-level {debug,info,warning,error}", "default: info"]),
        (["token", "issue"], ["default: 3600, or auth.max_token_lifetime_s", "default: ./gateway.yaml"]),
        (["models"], ["--timeout TIMEOUT seconds the call may take (default: 30.0)"]),
        (["policy", "check"], ["(auth.groups_claim) (default: groups)"]),
    ],
    ids=["serve-config", "serve-logs", "token-issue", "client", "policy-check"],
)
def test_help_shows_the_defaults(command, shown):
    result = run(*command, "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0
    for text in shown:
        assert text in " ".join(result.stdout.split())


# --------------------------------------------------------------------------------------------- token issue


def issue(pki, *args: str | Path, cwd: Path = HERE) -> str:
    result = run("token", "issue", "--key", pki.path("jwt-signing.key"), *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    return token


def test_token_issue_with_keys_from_the_issuer_checks_against_the_key_set_beside_the_key(pki, tmp_path):
    # token issue signs with a local key and never fetches the remote set: auth.jwks_url is not its business.
    (tmp_path / "gateway.yaml").write_text("auth: {jwks_url: 'https://127.0.0.1:1/jwks.json'}\n")
    result = run("token", "issue", "--key", pki.path("jwt-signing.key"), "--sub", "alice", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert (
        jwt.get_unverified_header(result.stdout.strip())["kid"] == json.loads(pki.read("jwks.json"))["keys"][0]["kid"]
    )


def test_issued_bound_token_works_out_of_the_box(gw):
    token = issue(gw.pki, "--sub", "alice", "--bind-cert", gw.pki.path("alice.crt"))
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["sub"], claims["iss"], claims["aud"]) == ("alice", "https://gateway.local", "gateway")
    assert "x5t#S256" in claims["cnf"]
    printed = ok(
        run("predict", "--model", "mlp", "--input", json.dumps(X[0].tolist()), env=client_env(gw, token=token))
    )
    assert printed["version"] == "2"
    record = next(r for r in gw.audit_records() if r["request_id"] == printed["request_id"])
    assert (record["sub"], record["decision"], record["jti"]) == ("alice", "allow", claims["jti"])


def test_issued_token_is_bound_to_its_certificate_only(gw):
    token = issue(gw.pki, "--sub", "alice", "--bind-cert", gw.pki.path("alice.crt"))
    env = {**client_env(gw, "bob"), "GATEWAY_TOKEN": token}  # presented from bob's connection
    assert "bound" in refused(gw, run("models", env=env), "UNAUTHENTICATED")["reason"]


def test_issued_unbound_token_carries_its_subject_groups_and_ttl(gw):
    token = issue(gw.pki, "--sub", "carol", "--group", "ml", "--scope", "predict", "--ttl", "120")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "carol" and "cnf" not in claims
    assert claims["groups"] == ["ml"] and claims["scope"] == "predict"
    assert claims["exp"] - claims["iat"] == 120
    # Authenticated as carol from carol's certificate: the test policy lets carol list nothing.
    assert ok(run("models", env=client_env(gw, "carol", token=token))) == []
    assert gw.audit_records()[-1]["sub"] == "carol"


def test_issued_unbound_token_for_alice_is_served(gw):
    token = issue(gw.pki, "--sub", "alice")
    assert ok(run("metadata", "--model", "mlp", env=client_env(gw, token=token)))["name"] == "mlp"


def test_token_issue_refuses_a_signing_key_others_may_read_as_serve_refuses_its_keys(pki, tmp_path):
    key = tmp_path / "jwt-signing.key"
    key.write_bytes(pki.read("jwt-signing.key"))
    key.chmod(0o640)
    usage_error(run("token", "issue", "--key", key, "--sub", "alice"), f"--key: {key} is accessible to group or others")
    key.chmod(0o600)
    assert run("token", "issue", "--key", key, "--sub", "alice", "--jwks", pki.path("jwks.json")).returncode == 0


def test_token_issue_with_an_unreadable_key_exits_2(tmp_path):
    usage_error(run("token", "issue", "--key", tmp_path / "nope.key", "--sub", "alice"), "nope.key")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--key", "{sig}/jwt-signing.pub", "--sub", "alice"], "jwt-signing.pub: not an unencrypted PEM private key"),
        (["--key", "{sig}/ca.crt", "--sub", "alice"], "ca.crt: not an unencrypted PEM private key"),
        (["--key", "{sig}/jwt-signing.key", "--sub", ""], "sub must be a non-empty string"),
        (["--key", "{sig}/jwt-signing.key", "--sub", "alice", "--ttl", "0"], "argument --ttl: '0' is not a whole"),
        (["--key", "{sig}/jwt-signing.key", "--sub", "alice", "--ttl", "-5"], "argument --ttl: '-5' is not a whole"),
        (["--key", "{sig}/jwt-signing.key", "--sub", "alice", "--bind-cert", "{alice}/alice.key"], "not a PEM or DER"),
        (["--key", "{sig}/jwt-signing.key", "--sub", "alice", "--scope", "read write"], "without whitespace"),
        (["--key", "{sig}/jwt-signing.key", "--sub", "alice", "--group", ""], "non-empty string"),
    ],
    ids=[
        "public-key",
        "certificate",
        "empty-sub",
        "zero-ttl",
        "negative-ttl",
        "key-as-bind-cert",
        "scope-with-space",
        "empty-group",
    ],
)
def test_token_issue_with_bad_input_exits_2_without_a_traceback(pki, args, fragment):
    folders = {"sig": pki.path("jwt-signing.key").parent, "alice": pki.path("alice.key").parent}
    result = run("token", "issue", *(a.format(**folders) for a in args))
    usage_error(result, fragment)
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert "ttl_s" not in result.stderr  # flags by their names, never the issuer's parameters


def test_token_issue_with_a_broken_jwks_beside_the_key_exits_2(pki, tmp_path):
    (tmp_path / "jwt-signing.key").write_bytes(pki.read("jwt-signing.key"))
    (tmp_path / "jwt-signing.key").chmod(0o600)
    (tmp_path / "jwks.json").write_text('{"keys": [')
    issue_args = ["token", "issue", "--key", tmp_path / "jwt-signing.key", "--sub", "alice"]
    result = run(*issue_args)
    usage_error(result, "jwks.json: cannot read a JWKS")
    assert "--jwks" in result.stderr and "Traceback" not in result.stderr
    # It is the key set the token is checked against: another kid does not skip it, another key set does.
    usage_error(run(*issue_args, "--kid", "k1"), "jwks.json: cannot read a JWKS")
    assert run(*issue_args, "--jwks", pki.path("jwks.json")).returncode == 0


def config_dir(tmp_path: Path, text: str) -> Path:
    """A folder whose ./gateway.yaml holds ``text``: a command run there reads it, as ``serve`` there would."""
    folder = tmp_path / "here"
    folder.mkdir()
    (folder / "gateway.yaml").write_text(text)
    return folder


def lifetime(token: str) -> int:
    claims = jwt.decode(token, options={"verify_signature": False})
    return int(claims["exp"] - claims["iat"])


def test_token_issue_refuses_a_ttl_over_the_maximum_of_the_config_serve_reads(pki, tmp_path):
    here = config_dir(tmp_path, f"auth: {{jwks: {pki.path('jwks.json')}, max_token_lifetime_s: 600}}\n")
    issue_args = ["token", "issue", "--key", pki.path("jwt-signing.key"), "--sub", "alice"]
    result = run(*issue_args, "--ttl", "3600", cwd=here)
    usage_error(result, "with gateway.yaml, the gateway would refuse this token: token lifetime over the maximum")
    assert "--ttl 3600 is over auth.max_token_lifetime_s (600)" in result.stderr
    assert lifetime(issue(pki, "--sub", "alice", cwd=here)) == 600  # the default lifetime, cut to the maximum
    assert lifetime(issue(pki, "--sub", "alice", "--ttl", "600", cwd=here)) == 600
    # With no config file, serve's built-in maximum (one day) applies.
    usage_error(run(*issue_args, "--ttl", "86401"), "the default settings (no config file)")
    assert lifetime(issue(pki, "--sub", "alice")) == 3600


def test_token_issue_refuses_a_key_the_key_set_does_not_publish(pki, other_pki, tmp_path):
    here = config_dir(tmp_path, f"auth: {{jwks: {pki.path('jwks.json')}}}\n")
    stranger = ["token", "issue", "--key", other_pki.path("jwt-signing.key"), "--sub", "alice"]
    usage_error(run(*stranger, cwd=here), f"its public key is not in {pki.path('jwks.json')}")
    usage_error(run(*stranger, "--jwks", pki.path("jwks.json")), "its public key is not in")  # with no config
    usage_error(
        run("token", "issue", "--key", pki.path("jwt-signing.key"), "--sub", "a", "--kid", "k9", cwd=here), "--kid k9"
    )
    issue(other_pki, "--sub", "alice")  # beside its own key set, the other key is fine


def test_token_issue_without_a_key_set_to_check_says_so(pki, tmp_path):
    (tmp_path / "signing.key").write_bytes(pki.read("jwt-signing.key"))
    (tmp_path / "signing.key").chmod(0o600)
    result = run("token", "issue", "--key", tmp_path / "signing.key", "--sub", "alice")
    assert result.returncode == 0 and result.stdout.count(".") == 2
    assert "note: no key set to check the token against" in result.stderr


@pytest.mark.parametrize(
    ("auth", "flags", "fragment"),
    [
        (
            "issuer: https://idp.example",
            ["--iss", "https://gateway.local"],
            "wrong issuer: --iss https://gateway.local",
        ),
        ("audience: inference", ["--aud", "gateway"], "wrong audience: --aud gateway is not auth.audience (inference)"),
        ("required_claims: [exp, iss, aud, sub, groups]", [], "missing claim: groups: auth.required_claims"),
    ],
    ids=["issuer", "audience", "required-claim"],
)
def test_token_issue_refuses_what_the_configured_verifier_refuses(pki, tmp_path, auth, flags, fragment):
    here = config_dir(tmp_path, f"auth: {{jwks: {pki.path('jwks.json')}, {auth}}}\n")
    result = run("token", "issue", "--key", pki.path("jwt-signing.key"), "--sub", "alice", *flags, cwd=here)
    usage_error(result, fragment)
    assert result.stderr.count("\n") == 1


def test_token_issue_takes_issuer_and_audience_from_the_config_and_the_gateway_accepts_the_token(
    start_gateway, tmp_path
):
    gw = start_gateway(overrides={"auth.issuer": "https://idp.example", "auth.audience": "inference"})
    here = config_dir(
        tmp_path, f"auth: {{jwks: {gw.pki.path('jwks.json')}, issuer: https://idp.example, audience: inference}}\n"
    )
    token = issue(gw.pki, "--sub", "alice", "--bind-cert", gw.pki.path("alice.crt"), cwd=here)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["iss"], claims["aud"]) == ("https://idp.example", "inference")
    assert ok(run("metadata", "--model", "mlp", env=client_env(gw, token=token)))["name"] == "mlp"


# -------------------------------------------------------------------------------------------- policy check

CHECK_POLICY = f"""
rules:
  - id: alice-bound
    effect: allow
    principals: {{cert: ["{ALICE_ID}"], subjects: [alice], bound_token: true}}
    models: [mlp]
    actions: [predict, metadata]
  - id: deny-suspended
    effect: deny
    principals: {{groups: [suspended]}}
    models: ["*"]
    actions: "*"
"""


@pytest.fixture
def policy_dir(tmp_path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "check.yaml").write_text(CHECK_POLICY)
    return directory


def check(policy_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run("policy", "check", "--policies", policy_dir, "--model", "mlp", *args)


def test_policy_check_prints_the_allowing_rule(policy_dir):
    result = check(
        policy_dir, "--action", "predict", "--claims", '{"sub": "alice"}', "--cert-identity", ALICE_ID, "--bound"
    )
    assert (result.returncode, result.stdout.strip()) == (0, "allow by rule alice-bound")


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--action", "predict", "--claims", '{"sub": "alice"}', "--cert-identity", ALICE_ID],
            "deny (default deny: no rule allows)",
        ),
        (
            ["--action", "stream", "--claims", '{"sub": "alice"}', "--cert-identity", ALICE_ID, "--bound"],
            "deny (default deny: no rule allows)",
        ),
        (["--action", "predict", "--claims", '{"sub": "bob"}', "--bound"], "deny (default deny: no rule allows)"),
        (
            [
                "--action",
                "predict",
                "--claims",
                '{"sub": "alice", "groups": ["suspended"]}',
                "--cert-identity",
                ALICE_ID,
                "--bound",
            ],
            "deny by rule deny-suspended",
        ),
    ],
    ids=["unbound", "other-action", "other-subject", "deny-rule"],
)
def test_policy_check_prints_the_denial_and_exits_1(policy_dir, args, line):
    result = check(policy_dir, *args)
    assert (result.returncode, result.stdout.strip()) == (1, line)


def test_policy_check_reads_groups_at_a_dotted_path_as_the_gateway_does(policy_dir):
    alice = ["--action", "predict", "--cert-identity", ALICE_ID, "--bound", "--groups-claim", "realm_access.roles"]
    nested = check(policy_dir, *alice, "--claims", '{"sub": "alice", "realm_access": {"roles": ["suspended"]}}')
    assert (nested.returncode, nested.stdout.strip()) == (1, "deny by rule deny-suspended")
    usage_error(
        check(policy_dir, *alice, "--claims", '{"sub": "alice", "realm_access": ["suspended"]}'),
        "--claims: malformed claim: realm_access.roles: the gateway refuses such a token",
    )


def test_policy_check_takes_a_cert_identity_spelled_with_its_type(policy_dir):
    alice = ["--action", "predict", "--claims", '{"sub": "alice"}', "--bound"]
    as_cn = check(policy_dir, *alice, "--cert-identity", f"cn:{ALICE_ID}")  # a CN reading like alice's URI SAN
    assert (as_cn.returncode, as_cn.stdout.strip()) == (1, "deny (default deny: no rule allows)")
    usage_error(check(policy_dir, *alice, "--cert-identity", "alice"), "--cert-identity: must start with spiffe://")


def test_policy_check_agrees_with_the_running_gateway(gw):
    result = run(
        "policy",
        "check",
        "--policies",
        gw.policy_dir,
        "--model",
        "mlp",
        "--action",
        "predict",
        "--claims",
        '{"sub": "alice"}',
    )
    assert (result.returncode, result.stdout.strip()) == (0, "allow by rule alice-all")
    printed = ok(run("predict", "--model", "mlp", "--input", json.dumps(X[0].tolist()), env=client_env(gw)))
    assert next(r for r in gw.audit_records() if r["request_id"] == printed["request_id"])["rule"] == "alice-all"


@pytest.mark.parametrize(
    ("claims", "fragment"),
    [
        ('{"sub": "alice", "groups": "suspended"}', "malformed claim: groups"),
        ('{"sub": "alice", "groups": [1]}', "malformed claim: groups"),
        ('{"sub": "alice", "groups": [""]}', "malformed claim: groups"),
        ('{"sub": "alice", "scope": ["predict"]}', "malformed claim: scope"),
        ('{"sub": 7}', "malformed claim: sub"),
        ('{"sub": "bob", "sub": "alice"}', "duplicate member 'sub'"),
        ('{"sub": "alice", "cnf": {"x5t#S256": "a", "x5t#S256": "b"}}', "duplicate member 'x5t#S256'"),
    ],
    ids=["groups-string", "groups-number", "groups-empty-string", "scope-list", "sub-number", "sub-twice", "nested"],
)
def test_policy_check_refuses_claims_the_gateway_would_refuse(policy_dir, claims, fragment):
    result = check(policy_dir, "--action", "predict", "--claims", claims, "--cert-identity", ALICE_ID, "--bound")
    usage_error(result, fragment)
    assert "Traceback" not in result.stderr


def test_policy_check_reads_the_configured_claim_names(policy_dir):
    (policy_dir / "scopes.yaml").write_text(
        "rules:\n  - id: readers\n    effect: allow\n    principals: {scopes: [models.read]}\n"
        "    models: [mlp]\n    actions: [metadata]\n"
    )
    alice = ["--cert-identity", ALICE_ID, "--bound", "--action", "predict"]
    roles = '{"sub": "alice", "roles": ["suspended"], "groups": ["ml"]}'
    assert check(policy_dir, *alice, "--claims", roles).stdout.strip() == "allow by rule alice-bound"
    denied = check(policy_dir, *alice, "--claims", roles, "--groups-claim", "roles")
    assert (denied.returncode, denied.stdout.strip()) == (1, "deny by rule deny-suspended")
    reader = ["--action", "metadata", "--claims", '{"sub": "carol", "perms": "models.read"}']
    assert check(policy_dir, *reader).stdout.strip() == "deny (default deny: no rule allows)"
    allowed = check(policy_dir, *reader, "--scopes-claim", "perms")
    assert (allowed.returncode, allowed.stdout.strip()) == (0, "allow by rule readers")
    # As the verifier does, "scope" and then "scp" are read when the configured claim is absent.
    scp = ["--action", "metadata", "--claims", '{"sub": "carol", "scp": ["models.read"]}', "--scopes-claim", "perms"]
    assert check(policy_dir, *scp).stdout.strip() == "allow by rule readers"


VERSIONED_POLICY = """
rules:
  - id: alice-mlp-v2
    effect: allow
    principals: {subjects: [alice]}
    models: [mlp]
    versions: [2]
    actions: [predict]
"""


def test_policy_check_with_models_judges_the_default_version_as_the_gateway_does(start_gateway, demo_models):
    gw = start_gateway(policy=VERSIONED_POLICY)
    args = ["policy", "check", "--policies", gw.policy_dir, "--action", "predict", "--claims", '{"sub": "alice"}']
    judged = run(*args, "--model", "mlp", "--models", demo_models)
    assert (judged.returncode, judged.stdout.strip()) == (0, "allow by rule alice-mlp-v2")
    assert "judged version 2" in judged.stderr
    printed = ok(run("predict", "--model", "mlp", "--input", json.dumps(X[0].tolist()), env=client_env(gw)))
    assert (printed["version"], gw.audit_records()[-1]["rule"]) == ("2", "alice-mlp-v2")  # the gateway agrees

    unversioned = run(*args, "--model", "mlp")
    assert (unversioned.returncode, unversioned.stdout.strip()) == (1, "deny (default deny: no rule allows)")
    assert 'judged for "no version"' in unversioned.stderr and "--models" in unversioned.stderr
    explicit = run(*args, "--model", "mlp", "--version", "1", "--models", demo_models)
    assert (explicit.returncode, explicit.stdout.strip(), explicit.stderr) == (
        1,
        "deny (default deny: no rule allows)",
        "",
    )
    missing = run(*args, "--model", "no-such-model", "--models", demo_models)
    assert missing.returncode == 1 and "no model no-such-model" in missing.stderr
    usage_error(run(*args, "--model", "mlp", "--models", demo_models / "nope"), "is not a directory")


def test_policy_check_with_a_bad_policy_directory_exits_2(policy_dir, tmp_path):
    usage_error(
        run("policy", "check", "--policies", tmp_path / "missing", "--model", "mlp", "--action", "predict"), "missing"
    )
    usage_error(check(policy_dir, "--action", "predict", "--claims", "[1]"), "JSON object")
    usage_error(check(policy_dir, "--action", "predict", "--claims", "{not json"), "error:")
    (policy_dir / "broken.yaml").write_text("rules:\n  - id: x\n    effect: maybe\n")
    usage_error(check(policy_dir, "--action", "predict"), "broken.yaml")


def test_serve_refuses_dev_audit_fail_open_from_a_variable_on_a_public_address(pki, demo_models, tmp_path):
    env = {"GATEWAY_DEV_AUDIT_FAIL_OPEN": "true", "GATEWAY_LISTEN": "0.0.0.0:0"}
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "all.yaml").write_text(
        "rules:\n  - {id: all, effect: allow, principals: {subjects: ['*']}, models: ['*'], actions: ['*']}\n"
    )
    args = ["serve", "--certs", pki.server_dir, "--models", demo_models, "--policies", tmp_path / "policies"]
    result = run(*args, "--audit-log", tmp_path / "audit.log", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr == "error: GATEWAY_DEV_AUDIT_FAIL_OPEN: only allowed on a loopback address, not '0.0.0.0'\n"
    assert not (tmp_path / "audit.log").exists()  # refused before anything was opened


# -------------------------------------------------------------------------------------------- audit verify


def test_audit_verify_accepts_the_running_gateways_trail_and_names_an_altered_record(gw, tmp_path):
    env = client_env(gw)
    ok(run("models", env=env))
    ok(run("predict", "--model", "mlp", "--input", json.dumps(X[0].tolist()), env=env))
    run("metadata", "--model", "no-such-model", env=env)
    hmac_key = gw.pki.path("audit-hmac.key")
    records = gw.audit_records()
    assert len(records) >= 3

    intact = run("audit", "verify", gw.audit_path, "--hmac-key", hmac_key)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert intact.stdout.splitlines()[-1].startswith(f"OK: {len(records)} records")

    lines = gw.audit_path.read_text().splitlines()
    target = next(i for i, r in enumerate(records) if r.get("model") == "mlp" and r["event"] == "call")
    altered = json.loads(lines[target])
    altered["sub"] = "mallory"  # a plausible edit: still valid JSON, every other field untouched
    lines[target] = json.dumps(altered, separators=(",", ":"))
    copy = tmp_path / "audit-altered.log"
    copy.write_text("\n".join(lines) + "\n")

    tampered = run("audit", "verify", copy, "--hmac-key", hmac_key)
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    verdict = tampered.stdout.splitlines()[-1]
    assert verdict.startswith("FAILED: first bad record")
    assert f"seq {records[target]['seq']}" in verdict and str(copy) in verdict

    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text("not-the-key\n")
    assert run("audit", "verify", gw.audit_path, "--hmac-key", wrong_key).returncode == 1


def test_audit_verify_with_an_unreadable_key_exits_2(gw, tmp_path):
    usage_error(run("audit", "verify", gw.audit_path, "--hmac-key", tmp_path / "nope.key"), "nope.key")


def test_audit_verify_says_that_a_keyed_trail_needs_its_key(gw):
    ok(run("models", env=client_env(gw)))
    result = run("audit", "verify", gw.audit_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the trail is HMAC-keyed, pass its key (--hmac-key)" in result.stdout
    assert "record altered" not in result.stdout


def test_audit_verify_of_a_missing_path_exits_2(gw, tmp_path):
    usage_error(run("audit", "verify", gw.audit_path, tmp_path / "nope.log"), "nope.log: no such file or directory")


# ------------------------------------------------------------------------------- tokens from an identity provider


def provider_env(gw, oidc, client: str = "alice") -> dict[str, str]:
    """client_env with the client-credentials variables in place of GATEWAY_TOKEN (the secret client's needs
    GATEWAY_CLIENT_SECRET_FILE too)."""
    env = {k: v for k, v in client_env(gw, client).items() if k != "GATEWAY_TOKEN"}
    return {
        **env,
        "GATEWAY_TOKEN_URL": oidc.token_url,
        "GATEWAY_CLIENT_ID": client,
        "GATEWAY_TOKEN_CA": str(oidc.ca),
        "GATEWAY_TOKEN_RESOURCE": oidc.resource,
    }


def test_token_url_flags_get_a_certificate_bound_token_from_the_provider(gw, oidc_provider):
    env = {k: v for k, v in client_env(gw).items() if k != "GATEWAY_TOKEN"}
    flags = ["--token-url", oidc_provider.token_url, "--client-id", "alice", "--token-ca", oidc_provider.ca]
    result = run("models", *flags, "--token-resource", oidc_provider.resource, "--token-scope", "list", env=env)
    # The gateway does not trust this provider (yet): the point is the request the provider answered.
    refused(gw, result, "UNAUTHENTICATED")
    assert oidc_provider.token_requests() == [{"event": "grant.success", "client_id": "alice"}]


def test_token_url_variables_with_a_client_secret_file(gw, oidc_provider, tmp_path):
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(oidc_provider.client_secret + "\n")
    env = {**provider_env(gw, oidc_provider), "GATEWAY_CLIENT_ID": "service"}
    refused(gw, run("models", env={**env, "GATEWAY_CLIENT_SECRET_FILE": str(secret_file)}), "UNAUTHENTICATED")
    assert oidc_provider.token_requests() == [{"event": "grant.success", "client_id": "service"}]


def test_a_refused_client_secret_is_one_line_exit_1_without_the_secret(gw, oidc_provider, tmp_path):
    secret = "wrong-" + oidc_provider.client_secret
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(secret)
    env = {**provider_env(gw, oidc_provider), "GATEWAY_CLIENT_ID": "service"}
    result = run("models", "--client-secret-file", secret_file, env=env)
    assert result.returncode == 1 and "invalid_client" in one_line(result)
    assert secret not in result.stderr + result.stdout
    assert oidc_provider.token_requests() == [
        {"event": "grant.error", "client_id": "service", "error": "invalid_client"}
    ]
    assert gw.audit_records() == []  # nothing reached the gateway


@pytest.mark.parametrize(
    ("extra_args", "extra_env", "fragment"),
    [
        (["--token", "t", "--token-url", "{url}"], {}, "not both --token and --token-url"),
        (["--token-file", "t.jwt", "--token-url", "{url}"], {}, "not both --token-file and --token-url"),
        ([], {"GATEWAY_TOKEN": "t"}, "not both GATEWAY_TOKEN and GATEWAY_TOKEN_URL"),
        ([], {"GATEWAY_TOKEN_FILE": "t.jwt"}, "not both GATEWAY_TOKEN_FILE and GATEWAY_TOKEN_URL"),
        ([], {"GATEWAY_CLIENT_ID": ""}, "--token-url needs --client-id (GATEWAY_CLIENT_ID)"),
        ([], {"GATEWAY_TOKEN_URL": "http://127.0.0.1:1/token"}, "not an https:// URL"),
        (["--client-secret-file", "missing-secret"], {}, "--client-secret-file missing-secret: No such file"),
        (["--client-secret", "s3cret"], {}, "unrecognized arguments"),  # no such flag: a secret never goes on argv
    ],
    ids=[
        "token-flag-and-url",
        "token-file-flag-and-url",
        "token-and-url-variables",
        "token-file-and-url-variables",
        "no-client-id",
        "plain-http",
        "missing-secret-file",
        "secret-flag",
    ],
)
def test_token_url_mistakes_are_one_line_exit_2(gw, oidc_provider, extra_args, extra_env, fragment):
    env = {**provider_env(gw, oidc_provider), **extra_env}
    args = [arg.replace("{url}", oidc_provider.token_url) for arg in extra_args]
    result = run("models", *args, env={k: v for k, v in env.items() if v})
    assert result.returncode == 2 and fragment in one_line(result)
    assert oidc_provider.token_requests() == [] and gw.audit_records() == []


def test_a_token_flag_overrides_the_client_credentials_variables(gw, oidc_provider):
    env = provider_env(gw, oidc_provider)
    assert run("models", "--token", gw.token(), env=env).returncode == 0
    assert oidc_provider.token_requests() == []


def test_client_credentials_settings_without_a_token_url_are_refused(gw):
    result = run("models", "--client-id", "alice", env=client_env(gw))
    assert (result.returncode, one_line(result)) == (
        2,
        "error: --client-id (GATEWAY_CLIENT_ID) needs --token-url (GATEWAY_TOKEN_URL)",
    )
    result = run("models", env={**client_env(gw), "GATEWAY_TOKEN_SCOPE": "predict"})
    assert result.returncode == 2 and "--token-scope (GATEWAY_TOKEN_SCOPE) needs --token-url" in one_line(result)


def test_audit_verify_of_several_replicas_trails_summarizes_each_chain_and_exits_1_for_any_bad_one(tmp_path):
    from tests.unit.test_audit import KEY, PODS, replica_trails

    key = tmp_path / "audit-hmac.key"
    key.write_bytes(KEY)
    trails = replica_trails(tmp_path / "audit", PODS)
    folders = [trails[pod].parent for pod in PODS]

    intact = run("audit", "verify", *folders, "--hmac-key", key)
    assert intact.returncode == 0, intact.stdout + intact.stderr
    lines = intact.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == [f"chain {pod}" for pod in sorted(PODS)]
    assert all(": OK: seq 1..5, 5 records, " in line for line in lines[:3])
    assert lines[-1] == "OK: 15 records in 3 chain(s) verified"

    # A fourth trail claiming the first one's chain id (a pod given the same id), and the second one tampered.
    replica_trails(tmp_path / "audit", {"gateway-copy": "gateway-7d9f-a1"})
    active = trails["gateway-7d9f-b2"]
    active.write_bytes(active.read_bytes().replace(b'"sub":"alice"', b'"sub":"mallory"', 1))
    result = run("audit", "verify", tmp_path / "audit", "--hmac-key", key, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False and report["records"] == 19  # the tampered trail up to its bad record
    verdicts = [(chain["chain"], chain["trail"], chain["ok"]) for chain in report["chains"]]
    assert verdicts == [
        ("gateway-7d9f-a1", str(tmp_path / "audit" / "gateway-7d9f-a1" / "audit.log"), False),
        ("gateway-7d9f-a1", str(tmp_path / "audit" / "gateway-copy" / "audit.log"), False),
        ("gateway-7d9f-b2", str(active), False),
        ("gateway-7d9f-c3", str(tmp_path / "audit" / "gateway-7d9f-c3" / "audit.log"), True),
    ]
    assert "2 trails claim this chain id" in report["chains"][0]["error"]
    assert "hash mismatch" in report["chains"][2]["error"]
    assert len(report["errors"]) == 2


def test_several_addresses_without_a_server_name_is_one_line_naming_the_flag(gw):
    target = f"ipv4:127.0.0.1:{gw.port},127.0.0.1:{gw.port}"
    result = run("models", env={**client_env(gw), "GATEWAY_TARGET": target})
    assert (result.returncode, one_line(result)) == (
        2,
        f"error: --target {target} has several addresses: give --server-name (GATEWAY_SERVER_NAME), "
        "the name their certificate carries",
    )
    assert run("models", "--server-name", "localhost", env={**client_env(gw), "GATEWAY_TARGET": target}).returncode == 0
