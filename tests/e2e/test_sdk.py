"""The Python SDK end to end: every Client and AsyncClient method, each input form, typed errors, token
providers and retries, against a real gateway over mutual TLS on loopback, checked against ONNX Runtime."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import numpy as np
import onnxruntime as ort
import pytest
from structlog.testing import capture_logs

import gateway
from gateway.auth.issuer import issue_token
from gateway.auth.keys import kid_from_jwks
from gateway.models import signature
from tests.conftest import Pki, wait_until
from tests.e2e.test_audit_trail import _point_at_dev_full

TIMEOUT = 10.0
X = np.random.default_rng(7).random((3, 784), dtype=np.float32)


@pytest.fixture
def gw(start_gateway):
    return start_gateway()


def connect(gw_or_target, *, pki: Pki | None = None, client: str = "alice", token=None, **kwargs) -> gateway.Client:
    """A Client for ``client``'s certificate; ``token`` defaults to one bound to that certificate."""
    target, pki = _where(gw_or_target, pki)
    if token is None:
        token = make_token(pki, sub=client, bind=client)
    kwargs.setdefault("timeout", TIMEOUT)
    return gateway.Client(
        target,
        ca=kwargs.pop("ca", pki.path("ca.crt")),
        cert=pki.path(f"{client}.crt"),
        key=pki.path(f"{client}.key"),
        token=token,
        **kwargs,
    )


def connect_async(gw, *, client: str = "alice", token=None, target: str | None = None, **kwargs) -> gateway.AsyncClient:
    """The AsyncClient twin of ``connect``; ``target`` defaults to the gateway's."""
    kwargs.setdefault("timeout", TIMEOUT)
    return gateway.AsyncClient(
        target or gw.target,
        ca=gw.pki.path("ca.crt"),
        cert=gw.pki.path(f"{client}.crt"),
        key=gw.pki.path(f"{client}.key"),
        token=token or gw.token(client, bind=client),
        **kwargs,
    )


def _where(gw_or_target, pki: Pki | None) -> tuple[str, Pki]:
    if isinstance(gw_or_target, str):
        assert pki is not None
        return gw_or_target, pki
    return gw_or_target.target, pki or gw_or_target.pki


def make_token(pki: Pki, *, sub: str = "alice", bind: str | None = "alice", ttl_s: float = 3600) -> str:
    """A token from the project's issuer, with the defaults the gateway accepts (no running gateway needed)."""
    key = pki.read("jwt-signing.key")
    return issue_token(
        private_key_pem=key,
        sub=sub,
        iss="https://gateway.local",
        aud="gateway",
        kid=kid_from_jwks(pki.path("jwks.json"), key),
        ttl_s=ttl_s,
        bind_cert_pem=pki.read(f"{bind}.crt") if bind else None,
    )


def reference(models: Path, version: int, x: np.ndarray, name: str = "mlp") -> np.ndarray:
    """The first output of ONNX Runtime run directly on the model file."""
    session = ort.InferenceSession(str(models / name / str(version) / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def free_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def audited(gw, request_id: str) -> dict:
    (record,) = records_of(gw, request_id)
    return record


def records_of(gw, request_id: str) -> list[dict]:
    return [r for r in gw.audit_records() if r["request_id"] == request_id]


class Relay:
    """A TCP relay in front of the gateway that can lose the connection after the gateway ran a call.

    TLS passes through it untouched. ``hold()`` stops delivering the server's bytes; ``drop()`` closes every
    connection and delivers again: to the client, the connection was lost once the call had run, as when the
    server crashes before its response leaves.
    """

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._holding = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self._holding.set()

    def drop(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets.clear()
        self._holding.clear()

    def close(self) -> None:
        self._listener.close()
        self.drop()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._upstream))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not (from_server and self._holding.is_set()):
                    sink.sendall(data)


@pytest.fixture
def relay(gw):
    relay = Relay(gw.port)
    yield relay
    relay.close()


# ------------------------------------------------------------------------------------------------ predict


def test_predict_with_named_arrays_matches_onnxruntime(gw, demo_models):
    with connect(gw) as client:
        result = client.predict("mlp", {"input": X}, timeout=TIMEOUT)
    assert isinstance(result, gateway.PredictResult)
    assert (result.model, result.version, result.error) == ("mlp", "2", None)
    assert list(result.outputs) == ["output"]
    np.testing.assert_allclose(result.outputs["output"], reference(demo_models, 2, X), rtol=1e-5)


def test_predict_with_a_single_array_feeds_the_only_input(gw, demo_models):
    with connect(gw) as client:
        result = client.predict("mlp", X[:2], timeout=TIMEOUT)
    assert result.outputs["output"].shape == (2, 10)
    np.testing.assert_allclose(result.outputs["output"], reference(demo_models, 2, X[:2]), rtol=1e-5)


def test_predict_with_a_list_of_floats_uses_the_tutorial_form(gw, demo_models):
    values = [float(v) for v in X[0]]
    with connect(gw) as client:
        result = client.predict("mlp", values, timeout=TIMEOUT)
    expected = reference(demo_models, 2, np.asarray(values, np.float32).reshape(1, 784))
    np.testing.assert_allclose(result.outputs["output"], expected, rtol=1e-5)


@pytest.mark.parametrize("version", [1, "1", "2"])
def test_predict_runs_the_requested_version(gw, demo_models, version):
    with connect(gw) as client:
        result = client.predict("mlp", {"input": X}, version=version, timeout=TIMEOUT)
    assert result.version == str(version)
    np.testing.assert_allclose(result.outputs["output"], reference(demo_models, int(version), X), rtol=1e-5)


def test_versions_give_different_results(gw):
    with connect(gw) as client:
        one = client.predict("mlp", {"input": X}, version=1, timeout=TIMEOUT).outputs["output"]
        two = client.predict("mlp", {"input": X}, version=2, timeout=TIMEOUT).outputs["output"]
    assert not np.allclose(one, two)


def test_caller_chosen_request_id_is_echoed_and_audited(gw):
    with connect(gw) as client:
        result = client.predict("mlp", {"input": X}, request_id="job-7", timeout=TIMEOUT)
    assert result.request_id == "job-7"
    assert audited(gw, "job-7")["code"] == "OK"


def test_request_id_is_generated_when_not_given(gw):
    with connect(gw) as client:
        first = client.predict("mlp", {"input": X}, timeout=TIMEOUT).request_id
        second = client.predict("mlp", {"input": X}, timeout=TIMEOUT).request_id
    assert first and second and first != second
    assert len(first) == 32 and set(first) <= set("0123456789abcdef")
    assert audited(gw, first)["model"] == "mlp"


# -------------------------------------------------------------------------------------------------- stream


def test_predict_stream_of_plain_inputs_for_a_model_yields_results_in_order(gw, demo_models):
    batches = [X[i : i + 1] for i in range(3)]
    with connect(gw) as client:
        results = list(client.predict_stream(batches, model="mlp", version=1, timeout=TIMEOUT))
    assert [r.id for r in results] == ["0", "1", "2"]
    assert {r.version for r in results} == {"1"}
    request_ids = {r.request_id for r in results}
    assert len(request_ids) == 1 and None not in request_ids
    for batch, result in zip(batches, results, strict=True):
        np.testing.assert_allclose(result.outputs["output"], reference(demo_models, 1, batch), rtol=1e-5)


def test_predict_stream_of_stream_requests_uses_each_model_version_and_id(gw, demo_models):
    requests = [
        gateway.StreamRequest("mlp", {"input": X[:1]}, version="1", id="a"),
        gateway.StreamRequest("mlp", X[1:2], id="b"),
        gateway.StreamRequest("mlp", [float(v) for v in X[2]], version=2, id="c"),
    ]
    with connect(gw) as client:
        results = list(client.predict_stream(requests, timeout=TIMEOUT, request_id="stream-1"))
    assert [(r.id, r.version, r.request_id) for r in results] == [
        ("a", "1", "stream-1"),
        ("b", "2", "stream-1"),
        ("c", "2", "stream-1"),
    ]
    np.testing.assert_allclose(results[0].outputs["output"], reference(demo_models, 1, X[:1]), rtol=1e-5)
    np.testing.assert_allclose(results[2].outputs["output"], reference(demo_models, 2, X[2:3]), rtol=1e-5)


def test_stream_error_is_yielded_in_band_and_the_stream_goes_on_without_raise_errors(gw):
    requests = [
        gateway.StreamRequest("mlp", X[:1], id="ok-1"),
        gateway.StreamRequest("no-such-model", X[:1], id="bad"),
        gateway.StreamRequest("mlp", {"input": np.zeros((1, 783), np.float32)}, id="wrong-shape"),
        gateway.StreamRequest("mlp", X[:1], id="ok-2"),
    ]
    with connect(gw) as client:
        results = list(client.predict_stream(requests, raise_errors=False, timeout=TIMEOUT, request_id="s-2"))
    assert [r.id for r in results] == ["ok-1", "bad", "wrong-shape", "ok-2"]
    assert results[0].error is None and results[3].error is None
    not_found, invalid = results[1].error, results[2].error
    assert isinstance(not_found, gateway.NotFoundError) and not_found.code == "NOT_FOUND"
    assert isinstance(invalid, gateway.InvalidArgumentError) and invalid.code == "INVALID_ARGUMENT"
    assert not_found.request_id == invalid.request_id == "s-2"
    codes = [r["code"] for r in gw.audit_records() if r["request_id"] == "s-2" and r["event"] == "stream_message"]
    assert codes == ["OK", "NOT_FOUND", "INVALID_ARGUMENT", "OK"]


def test_stream_error_raises_its_typed_error_by_default(gw):
    requests = [gateway.StreamRequest("mlp", X[:1], id="a"), gateway.StreamRequest("nope", X[:1], id="b")]
    seen = []
    with connect(gw) as client, pytest.raises(gateway.NotFoundError) as caught:
        for result in client.predict_stream(requests, timeout=TIMEOUT):
            seen.append(result.id)
    assert seen == ["a"]
    assert caught.value.code == "NOT_FOUND" and caught.value.request_id


def test_stream_of_plain_inputs_without_a_model_raises_value_error(gw):
    with connect(gw) as client, pytest.raises(ValueError, match="model="):
        list(client.predict_stream([X[:1]], timeout=TIMEOUT))


# ------------------------------------------------------------------------------------- list and metadata


def test_list_models_shows_every_model_with_versions_and_default(gw):
    with connect(gw) as client:
        models = {m.name: m for m in client.list_models(timeout=TIMEOUT)}
    assert models["mlp"] == gateway.ModelInfo("mlp", ("1", "2"), "2")
    assert set(models) == {"digits", "iris", "labels", "mlp"}


def test_list_models_shows_only_what_the_caller_may_list(gw):
    with connect(gw, client="bob") as client:
        assert [m.name for m in client.list_models(timeout=TIMEOUT)] == ["digits"]


def test_metadata_describes_the_signature_with_dynamic_dims(gw, demo_models):
    with connect(gw) as client:
        default = client.metadata("mlp", timeout=TIMEOUT)
        first = client.metadata("mlp", 1, timeout=TIMEOUT)
    assert default == gateway.ModelMetadata(
        name="mlp",
        version="2",
        versions=("1", "2"),
        inputs=(gateway.TensorSpec("input", "FP32", (-1, 784)),),
        outputs=(gateway.TensorSpec("output", "FP32", (-1, 10)),),
        model_digest=signature.digest(demo_models / "mlp" / "2"),  # the bytes that version 2 is
        execution_provider="CPU",
    )
    assert first.version == "1"
    assert first.model_digest == signature.digest(demo_models / "mlp" / "1") != default.model_digest


def test_metadata_reports_integer_outputs(gw):
    with connect(gw) as client:
        digits = client.metadata("digits", timeout=TIMEOUT)
    assert {s.name: s.datatype for s in digits.outputs} == {"label": "INT64", "probabilities": "FP32"}


# --------------------------------------------------------------------------------------------------- errors


def assert_refused(gw, error: gateway.GatewayError, code: str) -> None:
    """A typed error with its code and the server's request id, matching the call's audit record."""
    assert isinstance(error, gateway.GatewayError)
    assert error.code == code
    assert error.request_id and error.request_id in str(error)
    assert audited(gw, error.request_id)["code"] == code


def test_empty_token_raises_authentication_error(gw):
    with connect(gw, token=gateway.StaticToken("")) as client, pytest.raises(gateway.AuthenticationError) as caught:
        client.predict("mlp", {"input": X}, timeout=TIMEOUT)
    assert_refused(gw, caught.value, "UNAUTHENTICATED")
    assert audited(gw, caught.value.request_id)["reason"] in {"missing token", "malformed authorization header"}


def test_missing_token_raises_authentication_error(gw):
    client = gateway.Client(
        gw.target,
        ca=gw.pki.path("ca.crt"),
        cert=gw.pki.path("alice.crt"),
        key=gw.pki.path("alice.key"),
        timeout=TIMEOUT,
    )
    with client, pytest.raises(gateway.AuthenticationError) as caught:
        client.list_models(timeout=TIMEOUT)
    assert_refused(gw, caught.value, "UNAUTHENTICATED")
    assert audited(gw, caught.value.request_id)["reason"] == "missing token"


@pytest.mark.parametrize("kind", ["garbage", "other-key", "bound-to-bob"])
def test_bad_token_raises_authentication_error(gw, other_pki, kind):
    token = {
        "garbage": "not.a.jwt",
        "other-key": make_token(other_pki, bind=None),
        "bound-to-bob": gw.token("alice", bind="bob"),
    }[kind]
    with connect(gw, token=token) as client, pytest.raises(gateway.AuthenticationError) as caught:
        client.predict("mlp", {"input": X}, timeout=TIMEOUT)
    assert_refused(gw, caught.value, "UNAUTHENTICATED")


def test_permission_denied_raises_permission_denied_error(gw):
    with connect(gw, client="bob") as client, pytest.raises(gateway.PermissionDeniedError) as caught:
        client.predict("mlp", {"input": X}, timeout=TIMEOUT)
    assert_refused(gw, caught.value, "PERMISSION_DENIED")
    assert audited(gw, caught.value.request_id)["sub"] == "bob"


def test_metadata_without_the_metadata_action_raises_permission_denied_error(gw):
    with connect(gw, client="bob") as client:
        assert client.metadata("digits", timeout=TIMEOUT).name == "digits"
        with pytest.raises(gateway.PermissionDeniedError) as caught:
            client.metadata("mlp", timeout=TIMEOUT)
    assert_refused(gw, caught.value, "PERMISSION_DENIED")


@pytest.mark.parametrize(("model", "version"), [("no-such-model", None), ("mlp", 9)])
def test_unknown_model_or_version_raises_not_found_error(gw, model, version):
    with connect(gw) as client, pytest.raises(gateway.NotFoundError) as caught:
        client.predict(model, {"input": X}, version=version, timeout=TIMEOUT)
    assert_refused(gw, caught.value, "NOT_FOUND")


def test_metadata_of_an_unknown_model_raises_not_found_error(gw):
    with connect(gw) as client, pytest.raises(gateway.NotFoundError) as caught:
        client.metadata("no-such-model", timeout=TIMEOUT)
    assert_refused(gw, caught.value, "NOT_FOUND")


@pytest.mark.parametrize(
    "inputs",
    [{"input": np.zeros((1, 783), np.float32)}, {"input": X.astype(np.float64)}, {"bogus": X}, [0.5] * 10],
    ids=["wrong-shape", "wrong-dtype", "unknown-name", "short-list"],
)
def test_inputs_that_do_not_match_the_signature_raise_invalid_argument_error(gw, inputs):
    with connect(gw) as client, pytest.raises(gateway.InvalidArgumentError) as caught:
        client.predict("mlp", inputs, timeout=TIMEOUT)
    assert_refused(gw, caught.value, "INVALID_ARGUMENT")


def test_message_over_the_size_limit_raises_resource_exhausted_error(start_gateway):
    gw = start_gateway(overrides={"limits.max_message_bytes": 10000})
    with connect(gw) as client:
        assert client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT).version == "2"  # ~3 KiB fits
        with pytest.raises(gateway.ResourceExhaustedError) as caught:
            client.predict("mlp", {"input": np.zeros((4, 784), np.float32)}, timeout=TIMEOUT)  # ~12.5 KiB
        assert_refused(gw, caught.value, "RESOURCE_EXHAUSTED")
        # Past twice the limit grpc itself refuses the message, before the gateway sees it: same class.
        with pytest.raises(gateway.ResourceExhaustedError) as caught:
            client.predict("mlp", {"input": np.zeros((8, 784), np.float32)}, timeout=TIMEOUT)
        assert caught.value.code == "RESOURCE_EXHAUSTED"


def test_server_certificate_from_another_ca_raises_tls_handshake_error_without_retry(gw, other_pki):
    before = len(gw.audit_records())
    slow = gateway.RetryPolicy(max_attempts=5, initial_backoff_s=5.0, max_backoff_s=5.0)
    started = time.monotonic()
    client = connect(gw, ca=other_pki.path("ca.crt"), retry=slow, timeout=20.0)
    with client, pytest.raises(gateway.TLSHandshakeError) as caught:
        client.list_models()
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"a handshake failure was retried ({elapsed:.1f} s)"
    error = caught.value
    assert isinstance(error, gateway.UnavailableError) and error.code == "UNAVAILABLE"
    assert error.request_id is None  # it never reached the gateway
    assert "handshake" in str(error).lower()
    assert len(gw.audit_records()) == before


def test_server_certificate_for_another_name_raises_tls_handshake_error_without_retry(gw):
    slow = gateway.RetryPolicy(max_attempts=5, initial_backoff_s=5.0, max_backoff_s=5.0)
    started = time.monotonic()
    client = connect(gw, server_name="not-the-gateway.example", retry=slow, timeout=20.0)
    with client, pytest.raises(gateway.TLSHandshakeError) as caught:
        client.list_models()
    assert time.monotonic() - started < 2.0
    assert caught.value.code == "UNAVAILABLE" and caught.value.request_id is None


def test_server_name_checks_the_certificate_for_that_name(gw):
    with connect(gw, server_name="localhost") as client:
        assert client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT).version == "2"


@pytest.mark.parametrize("cls", [gateway.Client, gateway.AsyncClient])
def test_a_key_that_is_not_the_certificates_is_one_clear_value_error(gw, cls):
    before = len(gw.audit_records())
    alice, bob_key = gw.pki.path("alice.crt"), gw.pki.path("bob.key")
    with pytest.raises(ValueError) as caught:
        cls(gw.target, ca=gw.pki.path("ca.crt"), cert=alice, key=bob_key, token=gw.token())
    assert str(caught.value) == f"key {bob_key} does not match cert {alice}: it is another key pair's"
    with pytest.raises(ValueError, match=r"^key \(PEM bytes\) does not match cert \(PEM bytes\)"):
        cls(gw.target, ca=gw.pki.read("ca.crt"), cert=alice.read_bytes(), key=bob_key.read_bytes())
    with pytest.raises(ValueError, match=r"ca .*alice\.key: not a PEM certificate"):
        cls(gw.target, ca=gw.pki.path("alice.key"), cert=alice, key=gw.pki.path("alice.key"))
    assert len(gw.audit_records()) == before  # refused before any connection


# --------------------------------------------------------------------------------------------------- tokens


def test_refreshing_token_is_fetched_again_before_it_expires_without_a_failed_call(gw):
    issued: list[str] = []

    def fetch() -> str:
        issued.append(gw.token(ttl_s=45))
        return issued[-1]

    # exp - 44 s is within a second of issue: the provider must fetch again long before the token expires.
    provider = gateway.RefreshingToken(fetch, refresh_before_s=44)
    calls, deadline = 0, time.monotonic() + 8.0
    with connect(gw, token=provider) as client:
        while len(issued) < 3:
            assert time.monotonic() < deadline, "the token was not refreshed"
            client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT)  # raises on any failed call
            calls += 1
            time.sleep(0.05)
    assert calls > len(issued)  # cached between refreshes, not fetched for every call
    records = [r for r in gw.audit_records() if r["event"] == "call"]
    assert len(records) == calls and {r["code"] for r in records} == {"OK"}
    assert {r["jti"] for r in records} == {jwt.decode(t, options={"verify_signature": False})["jti"] for t in issued}


def test_plain_callable_is_a_token_provider(gw):
    count = 0

    def fetch() -> str:
        nonlocal count
        count += 1
        return gw.token()

    with connect(gw, token=fetch) as client:
        for _ in range(3):
            client.list_models(timeout=TIMEOUT)
    assert count == 1  # an hour-long token is reused


def test_token_file_rotated_on_disk_changes_the_caller_on_the_next_call(gw, tmp_path):
    path = tmp_path / "token.jwt"
    path.write_text(gw.token("alice", bind="alice") + "\n")

    def rotate(token: str) -> None:  # as an agent does it: write beside, then rename over
        staged = tmp_path / "token.jwt.new"
        staged.write_text(token)
        staged.replace(path)

    with connect(gw, token=gateway.TokenFile(path)) as client:
        assert [m.name for m in client.list_models(timeout=TIMEOUT)] == ["digits", "iris", "labels", "mlp"]
        assert client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT).version == "2"
        rotate(gw.token("bob", bind="alice"))
        assert [m.name for m in client.list_models(timeout=TIMEOUT)] == ["digits"]
        with pytest.raises(gateway.PermissionDeniedError) as caught:
            client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT)
        assert audited(gw, caught.value.request_id)["sub"] == "bob"
        rotate(gw.token("alice", bind="alice"))
        assert client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT).version == "2"
    assert [r["sub"] for r in gw.audit_records()] == ["alice", "alice", "bob", "bob", "alice"]


def test_failing_token_provider_raises_authentication_error_at_once(gw, tmp_path):
    missing = tmp_path / "no-such-token.jwt"
    slow = gateway.RetryPolicy(max_attempts=5, initial_backoff_s=2.0, max_backoff_s=2.0)
    started = time.monotonic()
    with connect(gw, token=gateway.TokenFile(missing), retry=slow) as client:
        with pytest.raises(gateway.AuthenticationError) as caught:
            client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT)
        with pytest.raises(gateway.AuthenticationError):
            list(client.predict_stream([X[:1]], model="mlp", timeout=TIMEOUT))
    assert time.monotonic() - started < 1.5, "a token provider failure was retried"
    error = caught.value
    assert error.code == "UNAUTHENTICATED" and error.request_id is None  # nothing was sent
    assert "token provider" in str(error) and "FileNotFoundError" in str(error)
    assert gw.audit_records() == []


async def test_async_failing_token_provider_raises_authentication_error_at_once(gw):
    def fetch() -> str:
        raise RuntimeError("the identity service is down; last token was eyJ.secret.sig")

    slow = gateway.RetryPolicy(max_attempts=5, initial_backoff_s=2.0, max_backoff_s=2.0)
    started = time.monotonic()
    async with connect_async(gw, token=fetch, retry=slow) as client:
        with pytest.raises(gateway.AuthenticationError) as caught:
            await client.list_models(timeout=TIMEOUT)
    assert time.monotonic() - started < 1.5
    assert "RuntimeError" in str(caught.value) and "secret" not in str(caught.value)
    assert gw.audit_records() == []


async def test_tokens_never_appear_in_reprs_or_errors(gw, tmp_path):
    token = gw.token()
    invalid = gw.token("alice", bind="bob")  # well formed, refused: the exception must not echo it
    path = tmp_path / "token.jwt"
    path.write_text(token)
    providers = [
        gateway.StaticToken(token),
        gateway.TokenFile(path),
        gateway.RefreshingToken(lambda: token),
    ]
    for provider in providers:
        assert provider.token() == token
    texts = [repr(p) for p in providers] + [str(p) for p in providers]
    with connect(gw, token=token) as client:
        texts += [repr(client), str(client)]
    with connect(gw, token=invalid) as client, pytest.raises(gateway.AuthenticationError) as caught:
        client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT)
    error = caught.value
    texts += [repr(error), str(error), error.message, error.reason, *map(str, error.args)]
    async with connect_async(gw, token=token) as async_client:
        texts += [repr(async_client), str(async_client)]
    for text in texts:
        for secret in (token, invalid):
            assert secret not in text
            assert secret.split(".")[2] not in text  # nor its signature alone


# -------------------------------------------------------------------------------------------------- retries


def test_call_succeeds_when_the_server_comes_up_late(start_gateway, pki):
    port = free_port()
    retry = gateway.RetryPolicy(max_attempts=8, initial_backoff_s=0.2)
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            with connect(f"127.0.0.1:{port}", pki=pki, retry=retry, timeout=15.0) as client:
                outcome["result"] = client.predict("mlp", {"input": X[:1]}, request_id="late-1")
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)
    gw = start_gateway(overrides={"listen": f"127.0.0.1:{port}"})
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].version == "2"
    assert audited(gw, "late-1")["code"] == "OK"  # one attempt reached the gateway, and it ran once


@pytest.mark.parametrize(
    ("client", "model", "error"),
    [("bob", "mlp", gateway.PermissionDeniedError), ("alice", "no-such-model", gateway.NotFoundError)],
)
def test_refusals_are_not_retried(gw, client, model, error):
    before = len(gw.audit_records())
    retry = gateway.RetryPolicy(max_attempts=5, initial_backoff_s=2.0, max_backoff_s=2.0)
    started = time.monotonic()
    with connect(gw, client=client, retry=retry) as sdk, pytest.raises(error):
        sdk.predict(model, {"input": X[:1]}, timeout=TIMEOUT)
    assert time.monotonic() - started < 1.5
    assert len(gw.audit_records()) == before + 1


def test_call_lost_after_the_gateway_ran_it_is_not_retried(gw, relay):
    retry = gateway.RetryPolicy(max_attempts=5, initial_backoff_s=0.05)
    outcome: dict[str, object] = {}
    with connect(relay.target, pki=gw.pki, retry=retry) as client:
        client.list_models(timeout=TIMEOUT)  # the connection is up
        relay.hold()

        def call() -> None:
            try:
                outcome["result"] = client.predict("mlp", {"input": X[:1]}, request_id="lost-1", timeout=TIMEOUT)
            except gateway.GatewayError as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=call)
        thread.start()
        wait_until(lambda: bool(records_of(gw, "lost-1")))  # the gateway ran it and sent its response
        relay.drop()
        thread.join(timeout=TIMEOUT)
    assert isinstance(outcome.get("error"), gateway.UnavailableError), outcome
    assert [r["code"] for r in records_of(gw, "lost-1")] == ["OK"]  # it ran once: a retry would run it again


async def test_async_call_lost_after_the_gateway_ran_it_is_not_retried(gw, relay):
    retry = gateway.RetryPolicy(max_attempts=5, initial_backoff_s=0.05)
    async with connect_async(gw, target=relay.target, retry=retry) as client:
        await client.list_models()
        relay.hold()
        call = asyncio.ensure_future(client.predict("mlp", {"input": X[:1]}, request_id="lost-2"))
        while not records_of(gw, "lost-2"):
            await asyncio.sleep(0.02)
        relay.drop()
        with pytest.raises(gateway.UnavailableError):
            await asyncio.wait_for(call, TIMEOUT)
    assert [r["code"] for r in records_of(gw, "lost-2")] == ["OK"]


def test_unavailable_marked_retry_safe_is_retried(gw):
    retry = gateway.RetryPolicy(max_attempts=4, initial_backoff_s=0.05)
    with connect(gw, retry=retry) as client:
        _point_at_dev_full(gw.gateway.audit)
        # The model ran but its record could not be written: no x-retry-safe, so not retried.
        with pytest.raises(gateway.UnavailableError):
            client.predict("mlp", {"input": X[:1]}, request_id="unrecorded", timeout=TIMEOUT)
        # Now the gateway refuses before running the model, says it is safe to retry, and recovers meanwhile.
        result = client.predict("mlp", {"input": X[:1]}, request_id="retried", timeout=TIMEOUT)
    assert result.version == "2"
    assert records_of(gw, "unrecorded") == []
    assert [(r["code"], r["version"]) for r in records_of(gw, "retried")] == [("UNAVAILABLE", "2"), ("OK", "2")]


async def test_async_unavailable_marked_retry_safe_is_retried(gw):
    async with connect_async(gw, retry=gateway.RetryPolicy(max_attempts=4, initial_backoff_s=0.05)) as client:
        _point_at_dev_full(gw.gateway.audit)
        with pytest.raises(gateway.UnavailableError):
            await client.predict("mlp", {"input": X[:1]}, request_id="unrecorded", timeout=TIMEOUT)
        result = await client.predict("mlp", {"input": X[:1]}, request_id="retried", timeout=TIMEOUT)
    assert result.request_id == "retried"
    assert [r["code"] for r in records_of(gw, "retried")] == ["UNAVAILABLE", "OK"]


async def test_async_call_succeeds_when_the_server_comes_up_late(start_gateway, pki):
    port = free_port()
    client = gateway.AsyncClient(
        f"127.0.0.1:{port}",
        ca=pki.path("ca.crt"),
        cert=pki.path("alice.crt"),
        key=pki.path("alice.key"),
        token=make_token(pki),
        retry=gateway.RetryPolicy(max_attempts=8, initial_backoff_s=0.2),
        timeout=15.0,
    )
    async with client:
        call = asyncio.ensure_future(client.predict("mlp", {"input": X[:1]}, request_id="late-2"))
        await asyncio.sleep(0.5)
        assert not call.done()
        gw = start_gateway(overrides={"listen": f"127.0.0.1:{port}"})
        result = await asyncio.wait_for(call, 20)
    assert result.version == "2"
    assert audited(gw, "late-2")["code"] == "OK"


def test_every_attempt_of_a_predict_carries_the_same_request_id(gw):
    retry = gateway.RetryPolicy(max_attempts=4, initial_backoff_s=0.05)
    with connect(gw, retry=retry) as client:
        _point_at_dev_full(gw.gateway.audit)
        with pytest.raises(gateway.UnavailableError):
            client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT)  # ran, unrecorded: not retried
        result = client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT)  # no request id given
    assert [r["code"] for r in records_of(gw, result.request_id)] == ["UNAVAILABLE", "OK"]
    assert result.attempts == 2


@pytest.mark.parametrize("method", ["ListModels", "GetModelMetadata"])
def test_every_attempt_of_a_retried_read_carries_the_same_request_id(gw, method):
    retry = gateway.RetryPolicy(max_attempts=4, initial_backoff_s=0.05)
    with connect(gw, retry=retry) as client, capture_logs() as logs:
        _point_at_dev_full(gw.gateway.audit)  # the first attempt's record fails: refused as retry-safe (nothing ran)
        client.list_models(timeout=TIMEOUT) if method == "ListModels" else client.metadata("mlp", timeout=TIMEOUT)
    unrecorded = {log["request_id"] for log in logs if log["event"] == "call_refused_audit_unavailable"}
    recorded = [(r["request_id"], r["code"]) for r in gw.audit_records() if r["method"].endswith(f"/{method}")]
    assert recorded[-1][1] == "OK"
    assert {request_id for request_id, _ in recorded} == unrecorded  # one id: the failed attempt's and the retry's


def _lose_after_run(relay, call, recorded) -> dict[str, object]:
    """Run ``call`` in a thread through ``relay``; lose its connection once ``recorded()`` says the gateway ran it."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except gateway.GatewayError as exc:
            outcome["error"] = exc

    relay.hold()
    thread = threading.Thread(target=run)
    thread.start()
    wait_until(recorded)
    relay.drop()
    thread.join(timeout=TIMEOUT)
    assert not thread.is_alive()
    return outcome


def test_lost_predict_is_retried_when_opted_in_under_the_same_request_id(gw, relay):
    retry = gateway.RetryPolicy(max_attempts=5, initial_backoff_s=0.05, retry_lost_predictions=True)
    with connect(relay.target, pki=gw.pki, retry=retry) as client:
        client.list_models(timeout=TIMEOUT)
        outcome = _lose_after_run(
            relay,
            lambda: client.predict("mlp", {"input": X[:1]}, request_id="rerun-1", timeout=TIMEOUT),
            lambda: bool(records_of(gw, "rerun-1")),
        )
    assert "error" not in outcome, outcome
    assert outcome["result"].attempts == 2
    assert [r["code"] for r in records_of(gw, "rerun-1")] == ["OK", "OK"]  # it ran twice, both under one id


async def test_async_lost_predict_is_retried_when_opted_in(gw, relay):
    retry = gateway.RetryPolicy(max_attempts=5, initial_backoff_s=0.05, retry_lost_predictions=True)
    async with connect_async(gw, target=relay.target, retry=retry) as client:
        await client.list_models()
        relay.hold()
        call = asyncio.ensure_future(client.predict("mlp", {"input": X[:1]}, request_id="rerun-2"))
        while not records_of(gw, "rerun-2"):
            await asyncio.sleep(0.02)
        relay.drop()
        result = await asyncio.wait_for(call, TIMEOUT)
    assert result.attempts == 2
    assert [r["code"] for r in records_of(gw, "rerun-2")] == ["OK", "OK"]


def test_lost_calls_other_than_predict_are_not_retried_even_when_opted_in(gw, relay):
    retry = gateway.RetryPolicy(max_attempts=5, initial_backoff_s=0.05, retry_lost_predictions=True)

    def listed() -> int:
        return sum(r["method"].endswith("/ListModels") for r in gw.audit_records())

    with connect(relay.target, pki=gw.pki, retry=retry) as client:
        client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT)  # the connection is up
        outcome = _lose_after_run(relay, lambda: client.list_models(timeout=TIMEOUT), lambda: listed() == 1)
    assert isinstance(outcome.get("error"), gateway.UnavailableError), outcome
    assert listed() == 1  # it ran once


def test_retries_never_outlast_the_deadline(pki):
    retry = gateway.RetryPolicy(max_attempts=100, initial_backoff_s=0.2, max_backoff_s=0.5)
    started = time.monotonic()
    client = connect(f"127.0.0.1:{free_port()}", pki=pki, retry=retry)
    with client, pytest.raises((gateway.UnavailableError, gateway.DeadlineExceededError)) as caught:
        client.predict("mlp", {"input": X[:1]}, timeout=1.0)
    # Uncapped, 100 attempts with these pauses take about 35 s; the 1 s deadline must end them far sooner (the bound
    # is loose so that a loaded machine cannot fail it: it was 1.5 s, and took 1.7 s at load average 9).
    assert time.monotonic() - started < 8.0
    assert not isinstance(caught.value, gateway.TLSHandshakeError)


# ---------------------------------------------------------------------------------------------------- async


async def test_async_predict_matches_onnxruntime(gw, demo_models):
    async with connect_async(gw) as client:
        named = await client.predict("mlp", {"input": X}, version=1, request_id="async-1", timeout=TIMEOUT)
        single = await client.predict("mlp", X[:1], timeout=TIMEOUT)
        flat = await client.predict("mlp", [float(v) for v in X[0]], timeout=TIMEOUT)
    assert (named.version, named.request_id) == ("1", "async-1")
    np.testing.assert_allclose(named.outputs["output"], reference(demo_models, 1, X), rtol=1e-5)
    np.testing.assert_allclose(single.outputs["output"], reference(demo_models, 2, X[:1]), rtol=1e-5)
    np.testing.assert_allclose(flat.outputs["output"], reference(demo_models, 2, X[:1]), rtol=1e-5)
    assert single.request_id and single.request_id != flat.request_id


async def test_async_predict_stream_yields_results_and_in_band_errors(gw, demo_models):
    requests = [
        gateway.StreamRequest("mlp", X[:1], id="a"),
        gateway.StreamRequest("nope", X[:1], id="b"),
        gateway.StreamRequest("mlp", X[1:2], version="1", id="c"),
    ]
    async with connect_async(gw) as client:
        plain = [r async for r in client.predict_stream([X[:1], X[1:2]], model="mlp", timeout=TIMEOUT)]
        mixed = [r async for r in client.predict_stream(requests, raise_errors=False, timeout=TIMEOUT)]
        with pytest.raises(gateway.NotFoundError) as caught:
            async for _ in client.predict_stream(requests, timeout=TIMEOUT):
                pass
    assert [r.id for r in plain] == ["0", "1"]
    np.testing.assert_allclose(plain[1].outputs["output"], reference(demo_models, 2, X[1:2]), rtol=1e-5)
    assert [(r.id, r.version) for r in mixed] == [("a", "2"), ("b", ""), ("c", "1")]
    assert isinstance(mixed[1].error, gateway.NotFoundError) and mixed[1].error.request_id
    assert caught.value.code == "NOT_FOUND" and caught.value.request_id


async def test_async_predict_stream_reads_an_async_generator_lazily(gw, demo_models):
    received: list[str] = []
    first_result = asyncio.Event()

    async def inputs() -> AsyncIterator[gateway.StreamRequest]:
        yield gateway.StreamRequest("mlp", X[:1], id="a")
        # The second request exists only once the first result is back: a reader that drained the
        # iterable before sending would wait here forever.
        await asyncio.wait_for(first_result.wait(), TIMEOUT)
        yield gateway.StreamRequest("mlp", X[1:2], version="1", id="b")

    async with connect_async(gw) as client:
        async for result in client.predict_stream(inputs(), timeout=TIMEOUT):
            received.append(result.id)
            first_result.set()
            last = result
    assert received == ["a", "b"]
    np.testing.assert_allclose(last.outputs["output"], reference(demo_models, 1, X[1:2]), rtol=1e-5)


async def test_async_stream_raises_the_error_of_the_callers_iterable(gw):
    async def inputs() -> AsyncIterator[np.ndarray]:
        yield X[:1]
        raise KeyError("no more input")

    async with connect_async(gw) as client:
        with pytest.raises(ValueError, match="model="):
            async for _ in client.predict_stream([X[:1]], timeout=TIMEOUT):
                pass
        with pytest.raises(KeyError, match="no more input"):
            async for _ in client.predict_stream(inputs(), model="mlp", timeout=TIMEOUT):
                pass


async def test_async_list_models_and_metadata(gw):
    async with connect_async(gw) as client:
        models = await client.list_models(timeout=TIMEOUT)
        meta = await client.metadata("mlp", "1", timeout=TIMEOUT)
    assert gateway.ModelInfo("mlp", ("1", "2"), "2") in models
    assert (meta.name, meta.version, meta.inputs) == ("mlp", "1", (gateway.TensorSpec("input", "FP32", (-1, 784)),))


async def test_async_permission_denied_raises_permission_denied_error(gw):
    async with connect_async(gw, client="bob") as client:
        with pytest.raises(gateway.PermissionDeniedError) as caught:
            await client.predict("mlp", {"input": X[:1]}, timeout=TIMEOUT)
        with pytest.raises(gateway.PermissionDeniedError):
            await client.metadata("mlp", timeout=TIMEOUT)
    assert_refused(gw, caught.value, "PERMISSION_DENIED")


async def test_async_bad_token_raises_authentication_error(gw):
    async with connect_async(gw, token="not.a.jwt") as client:
        with pytest.raises(gateway.AuthenticationError) as caught:
            await client.list_models(timeout=TIMEOUT)
    assert_refused(gw, caught.value, "UNAUTHENTICATED")


# ------------------------------------------------------------------------------------------------- surface

PUBLIC_SURFACE = {
    # clients and their values
    "Client",
    "AsyncClient",
    "PredictResult",
    "StreamRequest",
    "ModelInfo",
    "ModelMetadata",
    "TensorSpec",
    "RetryPolicy",
    # token providers
    "TokenProvider",
    "StaticToken",
    "TokenFile",
    "RefreshingToken",
    "ClientCredentialsTokenProvider",
    # errors
    "GatewayError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "UnavailableError",
    "TLSHandshakeError",
    "DeadlineExceededError",
    "CancelledError",
    "UnimplementedError",
    "InternalError",
}


def test_public_surface_is_exactly_the_documented_names_and_each_resolves():
    assert set(gateway.__all__) == PUBLIC_SURFACE
    assert len(gateway.__all__) == len(PUBLIC_SURFACE)
    for name in gateway.__all__:
        assert getattr(gateway, name) is not None, name
    errors = [getattr(gateway, n) for n in PUBLIC_SURFACE if n.endswith("Error")]
    assert all(issubclass(cls, gateway.GatewayError) for cls in errors)
    assert issubclass(gateway.TLSHandshakeError, gateway.UnavailableError)
    assert all(
        issubclass(getattr(gateway, n), gateway.TokenProvider)
        for n in ("StaticToken", "TokenFile", "ClientCredentialsTokenProvider")
    )
    with pytest.raises(AttributeError):
        _ = gateway.NoSuchThing


# ------------------------------------------------------------------------------------------- load balancing


def _fleet_target(*gws) -> str:
    return "ipv4:" + ",".join(gw.target for gw in gws)


def _predicts_by_gateway(gws, request_ids: list[str]) -> list[list[str]]:
    """Per gateway, the request ids among ``request_ids`` that its trail recorded as answered."""
    wanted = set(request_ids)
    return [
        [r["request_id"] for r in gw.audit_records() if r["request_id"] in wanted and r["code"] == "OK"] for gw in gws
    ]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_round_robin_spreads_calls_over_every_address(start_gateway, asynchronous):
    gws = [start_gateway(), start_gateway()]
    ids: list[str] = []

    def next_id() -> str | None:
        """The next call's request id, until both trails got calls (bounded: a connection may come up late)."""
        if all(_predicts_by_gateway(gws, ids)) or len(ids) == 200:
            return None
        ids.append(f"rr-{len(ids)}")
        return ids[-1]

    options = {"target": _fleet_target(*gws), "server_name": "localhost", "load_balancing": "round_robin"}
    if asynchronous:
        async with connect_async(gws[0], **options) as client:
            while request_id := next_id():
                await client.predict("mlp", {"input": X[:1]}, request_id=request_id)
    else:
        with connect(options.pop("target"), pki=gws[0].pki, **options) as client:
            while request_id := next_id():
                client.predict("mlp", {"input": X[:1]}, request_id=request_id)
    answered = _predicts_by_gateway(gws, ids)
    assert all(answered), answered  # both trails got calls
    assert sorted(answered[0] + answered[1]) == sorted(ids)  # each call once


def test_pick_first_keeps_every_call_on_one_address(start_gateway):
    gws = [start_gateway(), start_gateway()]
    ids = [f"pf-{i}" for i in range(6)]
    target = _fleet_target(*gws)
    with connect(target, pki=gws[0].pki, server_name="localhost", load_balancing="pick_first") as client:
        for request_id in ids:
            client.predict("mlp", {"input": X[:1]}, request_id=request_id)
    assert sorted(len(answered) for answered in _predicts_by_gateway(gws, ids)) == [0, len(ids)]


def test_several_addresses_need_a_server_name(pki):
    with pytest.raises(ValueError, match="several addresses: pass server_name"):
        connect("ipv4:127.0.0.1:1,127.0.0.1:2", pki=pki)


def test_an_unknown_load_balancing_policy_is_refused(pki):
    with pytest.raises(ValueError, match="load_balancing 'random': expected one of pick_first, round_robin"):
        connect("127.0.0.1:1", pki=pki, load_balancing="random")
