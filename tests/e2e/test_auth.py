"""Authentication and authorization end to end: every refusal with its status code and its audit record."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import grpc
import jwt
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gateway._pb.gateway.v1 import gateway_pb2 as pb
from gateway.auth import reasons
from tests.conftest import ROOT, Pki, run_script, wait_until
from tests.e2e.helpers import TIMEOUT, auth, predict_request, rpc_error, stub, trailer

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
X = np.zeros((1, 784), np.float32)


@pytest.fixture
def gw(start_gateway):
    return start_gateway()


def predict(gw, token, *, client="alice", model="mlp", metadata=None, pki=None):
    with gw.channel(client, pki=pki) as channel:
        md = metadata if metadata is not None else auth(token)
        return stub(channel).Predict(predict_request(model, {"input": X}), metadata=md, timeout=TIMEOUT)


def refused(gw, token, *, code=UNAUTHENTICATED, metadata=None, **kwargs):
    request_id = uuid.uuid4().hex
    md = (*(metadata if metadata is not None else auth(token)), ("x-request-id", request_id))
    exc = rpc_error(lambda: predict(gw, token, metadata=md, **kwargs))
    assert exc.code() == code, exc.details()
    (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id]
    assert record["code"] == code.name
    # The caller learns the reason's term and what to do (never its detail), or what it asked for; the rest is in
    # the audit record and the log line the message names.
    ending = f" (request id {request_id}; see call_refused in the gateway's log)"
    if code == UNAUTHENTICATED:
        term = reasons.TERMS[reasons.term_of(record["reason"])]
        assert exc.details() == f"{term.term}: {term.hint}{ending}"
        challenge = f'Bearer realm="gateway", error="{term.error}", error_description="{term.term}"'
        assert trailer(exc, "www-authenticate") == (challenge if term.error else None)
    else:
        model = kwargs.get("model", "mlp")
        assert exc.details() == f"no rule lets you 'predict' on model '{model}' (it may not exist){ending}"
    return record


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def kid(gw) -> str:
    return jwt.get_unverified_header(gw.token())["kid"]


def claims(gw, **overrides):
    now = int(time.time())
    base = {"sub": "alice", "iss": "https://gateway.local", "aud": "gateway", "iat": now, "exp": now + 600}
    return {**base, **overrides}


def test_bound_token_from_its_own_certificate_is_served_and_audited(gw):
    assert predict(gw, gw.token()).model_version == "2"
    record = gw.audit_records()[-1]
    assert record["code"] == "OK" and record["sub"] == "alice" and record["decision"] == "allow"
    assert record["cert_identity"] == "spiffe://gateway.local/client/alice"
    assert record["rule"] == "alice-all"


def test_no_token_is_unauthenticated(gw):
    assert refused(gw, None)["reason"] == "missing token"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Basic dXNlcjpwYXNz", "authorization scheme is not Bearer"),
        ("Bearer", "malformed authorization header"),
        ("Bearer ", "malformed authorization header"),
        ("Bearer a b", "malformed authorization header"),
        ("Bearer " + "a" * 9000, "authorization header too large"),
    ],
    ids=["basic", "no-token", "empty", "two-tokens", "oversized"],
)
def test_malformed_authorization_header_is_unauthenticated(gw, header, reason):
    record = refused(gw, None, metadata=(("authorization", header),))
    assert record["reason"] == reason


@pytest.mark.parametrize("spelling", ["Bearer  {}", "Bearer {} "], ids=["two-spaces", "trailing-space"])
def test_bearer_token_with_extra_spaces_is_unauthenticated(gw, spelling):
    # These reach the gateway as sent (tabs and newlines are refused by grpc itself); one spelling is accepted.
    record = refused(gw, None, metadata=(("authorization", spelling.format(gw.token())),))
    assert record["reason"] == "malformed authorization header"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(gw, scheme):
    assert predict(gw, None, metadata=(("authorization", f"{scheme} {gw.token()}"),)).model_version == "2"


def test_several_authorization_headers_are_unauthenticated(gw):
    token = gw.token()
    md = (("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}"))
    assert refused(gw, None, metadata=md)["reason"] == "several authorization headers"


def test_metadata_over_the_limit_is_refused_the_same_way_every_time(gw):
    codes = set()
    for _ in range(5):
        exc = rpc_error(lambda: predict(gw, None, metadata=(("x-padding", "p" * 70000), *auth(gw.token()))))
        codes.add(exc.code())
    assert len(codes) == 1 and codes != {grpc.StatusCode.OK}


def test_a_token_far_over_its_limit_is_still_refused_and_audited_by_the_gateway(gw):
    # 20 KB: over the 8 KiB token limit, under the metadata limit, so the gateway (not grpc core) refuses it.
    record = refused(gw, None, metadata=(("authorization", "Bearer " + "a" * 20000),))
    assert record["reason"] == "authorization header too large"


def test_alg_none_is_unauthenticated(gw):
    for alg in ("none", "None", "NONE"):
        header = b64(json.dumps({"alg": alg, "typ": "JWT", "kid": kid(gw)}).encode())
        token = f"{header}.{b64(json.dumps(claims(gw)).encode())}."
        refused(gw, token)


def test_hs256_signed_with_the_public_key_is_unauthenticated(gw):
    public_pem = gw.pki.read("jwt-signing.pub")
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid(gw)}).encode())
    payload = b64(json.dumps(claims(gw)).encode())
    import hashlib
    import hmac

    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    refused(gw, f"{header}.{payload}.{b64(signature)}")


@pytest.mark.parametrize(
    ("kwargs", "reason_fragment"),
    [
        ({"ttl_s": 600, "now": time.time() - 3600}, "token expired"),
        ({"iss": "https://evil.example"}, "issuer"),
        ({"aud": "someone-else"}, "audience"),
    ],
    ids=["token expired", "wrong-iss", "wrong-aud"],
)
def test_invalid_claims_are_unauthenticated(gw, kwargs, reason_fragment):
    record = refused(gw, gw.token(**kwargs))
    assert reason_fragment in record["reason"]


def test_not_yet_valid_token_is_unauthenticated(gw):
    record = refused(gw, gw.token(now=time.time() + 3600))
    assert "not yet valid" in record["reason"] or "iat" in record["reason"]


def test_unknown_kid_is_unauthenticated(gw):
    assert refused(gw, gw.token(kid="not-a-known-kid"))["reason"] == "unknown key id"


def test_token_signed_by_another_key_is_unauthenticated(gw, other_pki):
    from gateway.auth.issuer import issue_token

    forged = issue_token(
        private_key_pem=other_pki.read("jwt-signing.key"),
        sub="alice",
        kid=kid(gw),
        iss="https://gateway.local",
        aud="gateway",
        bind_cert_pem=gw.pki.read("alice.crt"),
    )
    refused(gw, forged)


def test_tampered_payload_is_unauthenticated(gw):
    header, payload, signature = gw.token().split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    decoded["sub"] = "root"
    refused(gw, f"{header}.{b64(json.dumps(decoded).encode())}.{signature}")


def signed_by_the_gateway_key(gw, header_json: str, claims_json: str) -> str:
    """A token signed with the PKI's JWT key over header and claims given as JSON text, which may repeat members."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    signing_input = f"{b64(header_json.encode())}.{b64(claims_json.encode())}"
    key = load_pem_private_key(gw.pki.read("jwt-signing.key"), password=None)
    return f"{signing_input}.{b64(jwt.get_algorithm_by_name('RS256').sign(signing_input.encode(), key))}"


def test_signed_token_repeating_a_claim_is_unauthenticated(gw):
    header = json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid(gw)})
    assert predict(gw, signed_by_the_gateway_key(gw, header, json.dumps(claims(gw)))).model_version == "2"
    # {"sub": "bob", ..., "sub": "alice"}: pyjwt alone reads alice, whom the policy lets predict.
    twice = json.dumps(claims(gw, sub="bob"))[:-1] + ', "sub": "alice"}'
    record = refused(gw, signed_by_the_gateway_key(gw, header, twice))
    assert (record["reason"], record["sub"]) == ("malformed token: duplicate member in its claims", None)
    twice_kid = header[:-1] + f', "kid": "{kid(gw)}"}}'
    record = refused(gw, signed_by_the_gateway_key(gw, twice_kid, json.dumps(claims(gw))))
    assert record["reason"] == "malformed token: duplicate member in its header"


def test_tampered_signature_is_unauthenticated(gw):
    header, payload, signature = gw.token().split(".")
    flipped = signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")
    refused(gw, f"{header}.{payload}.{flipped}")


def test_token_bound_to_another_clients_certificate_is_unauthenticated(gw):
    alice_token = gw.token(bind="alice")
    record = refused(gw, alice_token, client="bob")
    assert "bound" in record["reason"]
    assert record["cert_identity"] == "spiffe://gateway.local/client/bob"


def test_policy_deny_is_permission_denied_with_the_rule_audited(gw):
    record = refused(gw, gw.token("bob", bind="bob"), client="bob", code=PERMISSION_DENIED)
    assert record["decision"] == "deny" and record["rule"] is None and record["reason"] == "default deny"


def test_deny_rule_overrides_allow(gw):
    record = refused(gw, gw.token(groups=["suspended"]), code=PERMISSION_DENIED)
    assert record["rule"] == "deny-suspended"


def test_caller_who_may_not_see_a_model_learns_nothing_about_its_existence(gw):
    bob = gw.token("bob", bind="bob")
    existing = refused(gw, bob, client="bob", model="mlp", code=PERMISSION_DENIED)
    missing = refused(gw, bob, client="bob", model="no-such-model", code=PERMISSION_DENIED)
    assert existing["code"] == missing["code"] == "PERMISSION_DENIED"


def test_list_models_shows_only_what_the_caller_may_list(gw):
    with gw.channel("bob") as channel:
        response = stub(channel).ListModels(
            pb.ListModelsRequest(), metadata=auth(gw.token("bob", bind="bob")), timeout=TIMEOUT
        )
    assert [m.name for m in response.models] == ["digits"]


def test_metadata_needs_the_metadata_action(gw):
    with gw.channel("bob") as channel:
        client, md = stub(channel), auth(gw.token("bob", bind="bob"))
        assert client.GetModelMetadata(pb.GetModelMetadataRequest(model_name="digits"), metadata=md, timeout=TIMEOUT)
        exc = rpc_error(
            lambda: client.GetModelMetadata(pb.GetModelMetadataRequest(model_name="mlp"), metadata=md, timeout=TIMEOUT)
        )
    assert exc.code() == PERMISSION_DENIED


def test_revoked_client_certificate_is_unauthenticated(start_gateway, tmp_path):
    pki = Pki(tmp_path / "pki")
    run_script(ROOT / "scripts/gen_certs.sh", pki.dir, "alice", "dave")
    gw = start_gateway(use_pki=pki, overrides={"tls.reload_interval_s": 0.05})
    assert predict(gw, gw.token("alice", bind="alice"))
    run_script(ROOT / "scripts/gen_certs.sh", "--revoke", "alice", pki.dir)
    wait_until(lambda: _is_refused(gw))
    assert "revoked" in gw.audit_records()[-1]["reason"]
    dave = gw.token("alice", bind="dave")  # another, unrevoked certificate still works (policy: sub alice)
    assert predict(gw, dave, client="dave")


def _is_refused(gw) -> bool:
    try:
        predict(gw, gw.token("alice", bind="alice"))
    except grpc.RpcError as exc:
        return exc.code() == UNAUTHENTICATED
    return False


def test_health_needs_no_token_but_reflection_does(gw):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with gw.channel() as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        exc = rpc_error(lambda: list(reflect.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)))
        assert exc.code() == UNAUTHENTICATED
        replies = list(reflect.ServerReflectionInfo(iter([request]), metadata=auth(gw.token()), timeout=TIMEOUT))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "gateway.v1.InferenceService" in names


class Load:
    """Predicts in a loop from several threads with fresh tokens from ``token()``; records failures."""

    def __init__(self, gw, token=None, threads: int = 3) -> None:
        self.gw, self.token = gw, token or gw.token
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        with self.gw.channel() as channel:
            client = stub(channel)
            while not self._stop.is_set():
                try:
                    client.Predict(predict_request("mlp", {"input": X}), metadata=auth(self.token()), timeout=TIMEOUT)
                    self.ok += 1
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code()}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_policy_reload_while_clients_run(gw):
    carol = gw.token("carol", bind="carol")
    with Load(gw) as load:
        wait_until(lambda: load.ok > 20)
        refused(gw, carol, client="carol", code=PERMISSION_DENIED)
        (gw.policy_dir / "carol.yaml").write_text(
            "rules:\n  - id: carol-mlp\n    effect: allow\n    principals: {subjects: [carol]}\n"
            "    models: [mlp]\n    actions: [predict]\n"
        )
        gw.gateway.policies.reload_now()
        assert predict(gw, carol, client="carol")
        (gw.policy_dir / "broken.yaml").write_text("rules:\n  - id: x\n    effect: maybe\n")
        gw.gateway.policies.reload_now()  # refused; the previous set stays in force
        assert predict(gw, carol, client="carol")
    assert load.failures == []


def test_a_caller_allowed_many_times_is_refused_at_once_when_a_reload_denies_it(gw):
    """The pipeline remembers what it allowed (pipeline._Allowed) only for the policies it decided with."""
    alice = gw.token()
    for _ in range(3):
        assert predict(gw, alice)
    (gw.policy_dir / "suspend-alice.yaml").write_text(
        "rules:\n  - id: suspend-alice\n    effect: deny\n    principals: {subjects: [alice]}\n"
        "    models: [mlp]\n    actions: [predict]\n"
    )
    gw.gateway.policies.reload_now()
    record = refused(gw, alice, code=PERMISSION_DENIED)
    assert record["decision"] == "deny" and record["rule"] == "suspend-alice"
    (gw.policy_dir / "suspend-alice.yaml").unlink()
    gw.gateway.policies.reload_now()
    assert predict(gw, alice)


def test_jwks_key_rotation_while_clients_run(start_gateway, pki_copy):
    from gateway.auth.issuer import issue_token
    from gateway.auth.keys import jwk_kid

    gw = start_gateway(use_pki=pki_copy)
    new_key = ec.generate_private_key(ec.SECP256R1())
    new_pem = new_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    new_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(new_key.public_key()))
    new_jwk.update(kid=jwk_kid(new_key.public_key()), use="sig", alg="ES256")
    jwks_path = gw.pki.path("jwks.json")
    old_jwks = json.loads(jwks_path.read_text())

    def new_token() -> str:
        return issue_token(
            private_key_pem=new_pem,
            sub="alice",
            iss="https://gateway.local",
            aud="gateway",
            bind_cert_pem=gw.pki.read("alice.crt"),
        )

    old_token = gw.token()
    with Load(gw, token=lambda: old_token) as load:
        wait_until(lambda: load.ok > 20)
        refused(gw, new_token())  # not yet published
        _write_json(jwks_path, {"keys": [*old_jwks["keys"], new_jwk]})  # publish the new key beside the old
        gw.gateway.keys.reload_now()
        assert predict(gw, new_token())
        assert predict(gw, old_token)
        jwks_path.write_text("{not json")  # a broken file is refused; the keys in force stay
        gw.gateway.keys.reload_now()
        assert predict(gw, new_token())
    assert load.failures == []
    _write_json(jwks_path, {"keys": [new_jwk]})  # retire the old key: its tokens stop at once
    gw.gateway.keys.reload_now()
    refused(gw, old_token)
    assert predict(gw, new_token())


def _write_json(path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


BOUND_ONLY_POLICY = """
rules:
  - id: bound-alice
    effect: allow
    principals: {subjects: [alice], bound_token: true}
    models: ["*"]
    actions: "*"
"""


def test_a_rule_that_requires_bound_tokens_refuses_an_unbound_one(start_gateway):
    gw = start_gateway(policy=BOUND_ONLY_POLICY)
    assert predict(gw, gw.token(bind="alice")).model_version == "2"
    record = refused(gw, gw.token(bind=None), code=PERMISSION_DENIED)
    assert (record["decision"], record["rule"], record["sub"]) == ("deny", None, "alice")


def test_a_connection_that_outlives_its_client_certificate_is_refused_on_the_next_call(gw):
    authn = gw.gateway.boundary._authenticator
    not_after = x509.load_pem_x509_certificate(gw.pki.read("alice.crt")).not_valid_after_utc.timestamp()
    token = gw.token()
    request_id = uuid.uuid4().hex
    with gw.channel("alice") as channel:
        call = stub(channel).Predict
        assert call(predict_request("mlp", {"input": X}), metadata=auth(token), timeout=TIMEOUT).model_version == "2"
        authn._clock = lambda: not_after + 1  # the same connection, one second past the certificate's expiry
        exc = rpc_error(
            lambda: call(
                predict_request("mlp", {"input": X}),
                metadata=(*auth(token), ("x-request-id", request_id)),
                timeout=TIMEOUT,
            )
        )
    assert exc.code() == UNAUTHENTICATED
    (record,) = [r for r in gw.audit_records() if r["request_id"] == request_id]
    assert record["reason"] == "client certificate expired"
