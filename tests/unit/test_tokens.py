"""gateway.auth.keys, .verifier and .issuer without a server: accepted tokens, each refusal with its reason (one
regression per known attack), strict JWKS loading, rotation through the KeyStore, the verified-token cache, binding
and the issuer."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from gateway.auth import reasons
from gateway.auth.issuer import issue_token
from gateway.auth.keys import KeyStore, TokenConfigError, cert_thumbprint, jwk_kid, kid_from_jwks, load_jwks
from gateway.auth.verifier import MAX_TOKEN_BYTES, TokenVerifier, UnknownKidError, VerifiedToken
from gateway.errors import AuthenticationError

ISSUER = "https://idp.example"
AUDIENCE = "inference-gateway"
T0 = 1_800_000_000.0  # the fake clock's start; nothing here reads the wall clock
LEEWAY = 30
OMIT = object()  # as a claim or header value: leave it out


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Key:
    """A signing key with the algorithm it implies and the kid its public JWK gets."""

    private: Any
    alg: str

    @property
    def kid(self) -> str:
        return jwk_kid(self.private.public_key())

    @property
    def pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self, **members: Any) -> dict[str, Any]:
        public = jwt.get_algorithm_by_name(self.alg).to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, **members}


@pytest.fixture(scope="module")
def rsa_key() -> Key:
    return Key(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="module")
def rsa_key_next() -> Key:
    return Key(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="module")
def foreign_key() -> Key:
    return Key(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="module")
def ec_key() -> Key:
    return Key(ec.generate_private_key(ec.SECP256R1()), "ES256")


@pytest.fixture(scope="module")
def ed_key() -> Key:
    return Key(ed25519.Ed25519PrivateKey.generate(), "EdDSA")


def write_json(path: Path, content: Any) -> Path:
    """Replace ``path`` atomically (new inode), as a deployment tool would."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(content if isinstance(content, str) else json.dumps(content))
    os.replace(staging, path)
    return path


@pytest.fixture
def jwks_file(tmp_path: Path, rsa_key: Key, ec_key: Key, ed_key: Key) -> Path:
    return write_json(tmp_path / "jwks.json", {"keys": [rsa_key.jwk(use="sig"), ec_key.jwk(), ed_key.jwk()]})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(jwks_file: Path, clock: Clock) -> Callable[..., TokenVerifier]:
    def build(*, jwks: Path = jwks_file, **settings: Any) -> TokenVerifier:
        store = KeyStore(jwks, interval_s=0, allowed_algorithms=("RS256", "PS256", "ES256", "EdDSA"))
        defaults: dict[str, Any] = {"issuer": ISSUER, "audience": AUDIENCE, "leeway_s": LEEWAY, "clock": clock}
        return TokenVerifier(keys=store, **{**defaults, **settings})

    return build


@pytest.fixture
def verifier(make: Callable[..., TokenVerifier]) -> TokenVerifier:
    return make()


WITH_HS256 = ("RS256", "ES256", "EdDSA", "HS256")


def shared_secret() -> bytes:
    """A random HMAC secret as an operator would store it: printable, so none of it is stripped as whitespace."""
    return secrets.token_hex(32).encode()


def payload(**changes: Any) -> dict[str, Any]:
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": T0, "nbf": T0, "exp": T0 + 600, "jti": "t-1"}
    return {name: value for name, value in {**base, **changes}.items() if value is not OMIT}


def token(key: Key, claims: dict[str, Any] | None = None, **header: Any) -> str:
    headers = {name: value for name, value in {"kid": key.kid, **header}.items() if value is not OMIT}
    return jwt.encode(payload() if claims is None else claims, key.private, algorithm=key.alg, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}.{b64url(signature)}"


def refused(verifier: TokenVerifier, jwt_text: str, *, cert_x5t: str | None = None) -> str:
    """The reason for a refusal; checks the caller sees only the reason's term and its hint (never the detail) and
    that no part of the token leaks."""
    with pytest.raises(AuthenticationError) as caught:
        verifier.verify(jwt_text, cert_x5t=cert_x5t)
    error = caught.value
    term = reasons.TERMS[reasons.term_of(error.reason)]
    assert term.term != reasons.INVALID or error.reason == reasons.INVALID, "a reason outside the vocabulary"
    assert (error.message, error.code) == (f"{term.term}: {term.hint}", "UNAUTHENTICATED")
    assert len(jwt_text) <= 8 or jwt_text not in error.reason
    assert not any(len(part) > 8 and part in error.reason for part in jwt_text.split("."))
    return error.reason


def make_cert(name: str = "alice") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every token that reaches pyjwt's ``jwt.decode`` (the signature check), recorded by a wrapper."""
    calls: list[str] = []
    real = jwt.decode

    def counting(jwt_text: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(jwt_text)
        return real(jwt_text, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    yield calls


# ------------------------------------------------------------------------------------------------- accepted tokens


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key", "ed_key"])
def test_valid_token_is_accepted_for_rs256_es256_and_eddsa(
    verifier: TokenVerifier, key_name: str, request: pytest.FixtureRequest
) -> None:
    key: Key = request.getfixturevalue(key_name)
    verified = verifier.verify(token(key), cert_x5t=None)
    assert verified == VerifiedToken(
        subject="alice",
        issuer=ISSUER,
        token_id="t-1",
        groups=frozenset(),
        scopes=frozenset(),
        expires_at=T0 + 600,
        bound=False,
    )


def test_verified_token_is_frozen(verifier: TokenVerifier, rsa_key: Key) -> None:
    verified = verifier.verify(token(rsa_key), cert_x5t=None)
    with pytest.raises(AttributeError):
        verified.subject = "mallory"  # type: ignore[misc]


def test_token_without_jti_has_no_token_id(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert verifier.verify(token(rsa_key, payload(jti=OMIT)), cert_x5t=None).token_id is None


def test_audience_list_containing_ours_is_accepted(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert verifier.verify(token(rsa_key, payload(aud=["other", AUDIENCE])), cert_x5t=None).subject == "alice"


@pytest.mark.parametrize("typ", ["JWT", "jwt", "at+jwt", "application/at+JWT"])
def test_access_token_types_are_accepted(verifier: TokenVerifier, rsa_key: Key, typ: str) -> None:
    assert verifier.verify(token(rsa_key, typ=typ), cert_x5t=None).subject == "alice"


# ---------------------------------------------------------------------------------------------- scopes and groups


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"scope": "predict  list metadata"}, {"predict", "list", "metadata"}),
        ({"scp": ["predict", "list"]}, {"predict", "list"}),
        ({"scp": "predict list"}, {"predict", "list"}),
        ({"scope": "predict", "scp": ["admin"]}, {"predict"}),  # the configured claim first
        ({}, set()),
    ],
    ids=["scope-string", "scp-list", "scp-string", "scope-before-scp", "none"],
)
def test_scopes_are_read_in_each_form(
    verifier: TokenVerifier, rsa_key: Key, claims: dict[str, Any], expected: set[str]
) -> None:
    assert verifier.verify(token(rsa_key, payload(**claims)), cert_x5t=None).scopes == expected


def test_configured_scopes_claim_is_read_before_the_other_form(
    make: Callable[..., TokenVerifier], rsa_key: Key
) -> None:
    verifier = make(scopes_claim="scp")
    claims = payload(scope="from-scope", scp=["from-scp"])
    assert verifier.verify(token(rsa_key, claims), cert_x5t=None).scopes == {"from-scp"}
    assert verifier.verify(token(rsa_key, payload(scope="only")), cert_x5t=None).scopes == {"only"}


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"scope": ["predict"]}, "malformed claim: scope"),  # RFC 8693 4.2: scope is a string
        ({"scope": 7}, "malformed claim: scope"),
        ({"scp": ["predict", 3]}, "malformed claim: scp"),
        ({"scp": {"predict": True}}, "malformed claim: scp"),
    ],
    ids=["scope-list", "scope-number", "scp-mixed", "scp-object"],
)
def test_malformed_scopes_are_refused(
    verifier: TokenVerifier, rsa_key: Key, claims: dict[str, Any], reason: str
) -> None:
    assert refused(verifier, token(rsa_key, payload(**claims))) == reason


def test_groups_claim_gives_groups(verifier: TokenVerifier, rsa_key: Key) -> None:
    verified = verifier.verify(token(rsa_key, payload(groups=["ml-team", "readers"])), cert_x5t=None)
    assert verified.groups == {"ml-team", "readers"}


def test_custom_groups_claim_is_read(make: Callable[..., TokenVerifier], rsa_key: Key) -> None:
    verifier = make(groups_claim="roles")
    assert verifier.verify(token(rsa_key, payload(roles=["ops"], groups=["x"])), cert_x5t=None).groups == {"ops"}


@pytest.mark.parametrize("groups", ["ml-team readers", 3, ["ok", 1], [""], {"a": 1}])
def test_malformed_groups_are_refused(verifier: TokenVerifier, rsa_key: Key, groups: Any) -> None:
    assert refused(verifier, token(rsa_key, payload(groups=groups))) == "malformed claim: groups"


def test_groups_claim_may_be_a_dotted_path_into_nested_objects(
    make: Callable[..., TokenVerifier], rsa_key: Key
) -> None:
    verifier = make(groups_claim="realm_access.roles")
    claims = payload(realm_access={"roles": ["ml-team"]}, resource_access={"roles": ["x"]}, groups=["y"])
    assert verifier.verify(token(rsa_key, claims), cert_x5t=None).groups == {"ml-team"}


@pytest.mark.parametrize("claims", [{}, {"realm_access": {}}, {"realm_access": {"other": 1}}])
def test_an_absent_dotted_path_means_no_groups(make: Callable[..., TokenVerifier], rsa_key: Key, claims: Any) -> None:
    verifier = make(groups_claim="realm_access.roles")
    assert verifier.verify(token(rsa_key, payload(**claims)), cert_x5t=None).groups == frozenset()


@pytest.mark.parametrize(
    "realm_access",
    [["roles"], "roles", 3, {"roles": "ml-team"}, {"roles": ["ok", 1]}, {"roles": {"ml-team": True}}],
    ids=["list-midway", "string-midway", "number-midway", "string-at-end", "mixed-list", "object-at-end"],
)
def test_a_dotted_path_meeting_an_unexpected_shape_is_refused(
    make: Callable[..., TokenVerifier], rsa_key: Key, realm_access: Any
) -> None:
    # Refused rather than read as no groups: a deny rule on a group must not be skipped over a shape change.
    verifier = make(groups_claim="realm_access.roles")
    assert (
        refused(verifier, token(rsa_key, payload(realm_access=realm_access))) == "malformed claim: realm_access.roles"
    )


def test_a_claim_named_with_dots_is_read_before_a_dotted_path(make: Callable[..., TokenVerifier], rsa_key: Key) -> None:
    # Namespaced custom claims (Auth0 and others) are URLs, dots included.
    verifier = make(groups_claim="https://example.com/groups")
    claims = payload(**{"https://example.com/groups": ["ml-team"]})
    assert verifier.verify(token(rsa_key, claims), cert_x5t=None).groups == {"ml-team"}


def test_audience_list_without_ours_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert refused(verifier, token(rsa_key, payload(aud=["other", "another"]))) == "wrong audience"


def test_unknown_kid_is_an_unknown_kid_error_and_a_file_offers_no_refresh(verifier: TokenVerifier, rsa_key: Key):
    with pytest.raises(UnknownKidError) as raised:
        verifier.verify(token(rsa_key, kid="rotated-away"), cert_x5t=None)
    assert (raised.value.reason, raised.value.code) == ("unknown key id", "UNAUTHENTICATED")
    assert verifier.refresh_keys() is None


# ---------------------------------------------------------------------------------------- algorithm-level attacks


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused_in_any_case(verifier: TokenVerifier, rsa_key: Key, alg: str) -> None:
    assert refused(verifier, compact({"alg": alg, "kid": rsa_key.kid}, payload())) == "algorithm not allowed: none"


def test_alg_none_with_a_valid_signature_appended_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    signature = token(rsa_key).rsplit(".", 1)[1]
    assert (
        refused(verifier, compact({"alg": "none", "kid": rsa_key.kid}, payload()) + signature)
        == "algorithm not allowed: none"
    )


def test_alg_none_token_made_by_pyjwt_without_a_kid_is_refused_as_alg_none(verifier: TokenVerifier) -> None:
    # alg is checked before kid: pyjwt's own unsigned token (no kid header) is refused for its algorithm.
    assert refused(verifier, jwt.encode(payload(), None, algorithm="none")) == "algorithm not allowed: none"


def hs256_by_hand(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """HS256 as an attacker computes it: pyjwt itself refuses a PEM as HMAC secret, attackers' code does not."""
    signing_input = compact(header, claims).rstrip(".")
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def test_hs256_signed_with_the_rsa_public_key_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    # Key confusion, pyjwt advisories CVE-2017-11424 and CVE-2022-29217 (GHSA-ffqj-6fqr-9h24).
    forged = hs256_by_hand({"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}, payload(sub="admin"), rsa_key.public_pem)
    assert refused(verifier, forged) == "algorithm not allowed: HS256"


def test_hs256_with_an_rsa_kid_uses_only_the_configured_secret(
    make: Callable[..., TokenVerifier], rsa_key: Key
) -> None:
    verifier = make(hmac_secret=shared_secret(), algorithms=WITH_HS256)
    for public_pem in (rsa_key.public_pem, rsa_key.public_pem.strip()):
        forged = hs256_by_hand({"alg": "HS256", "kid": rsa_key.kid}, payload(sub="admin"), public_pem)
        assert refused(verifier, forged) == "bad signature"


def test_algorithm_of_another_key_type_is_refused_for_a_kid(verifier: TokenVerifier, rsa_key: Key, ec_key: Key) -> None:
    assert refused(verifier, token(ec_key, kid=rsa_key.kid)) == "algorithm not allowed: ES256 for this key"


def test_algorithm_outside_the_allowlist_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    text = jwt.encode(payload(), rsa_key.private, algorithm="PS256", headers={"kid": rsa_key.kid})
    assert refused(verifier, text) == "algorithm not allowed: PS256"


def test_unknown_algorithm_name_stays_out_of_the_reason(verifier: TokenVerifier, rsa_key: Key) -> None:
    alg = "X" + secrets.token_hex(20)
    assert (
        refused(verifier, compact({"alg": alg, "kid": rsa_key.kid}, payload(), b"sig"))
        == "algorithm not allowed: unknown"
    )


def test_embedded_jwk_header_is_never_used(verifier: TokenVerifier, rsa_key: Key, foreign_key: Key) -> None:
    # The attacker signs with their own key and ships it in the header (CVE-2018-0114 class).
    forged = token(foreign_key, payload(sub="admin"), kid=rsa_key.kid, jwk=foreign_key.jwk(kid=rsa_key.kid))
    assert refused(verifier, forged) == "bad signature"


@pytest.mark.parametrize("header", ["jku", "x5u"])
def test_key_url_headers_are_never_fetched(verifier: TokenVerifier, foreign_key: Key, header: str) -> None:
    forged = token(foreign_key, **{header: "https://attacker.example/jwks.json"})
    assert refused(verifier, forged) == "unknown key id"


def test_crit_header_is_refused(verifier: TokenVerifier, rsa_key: Key, decode_calls: list[str]) -> None:
    # RFC 7515 4.1.11; pyjwt GHSA-752w-5fwx-jx9f. Known-to-pyjwt (b64) or not, the gateway understands none.
    known = compact({"alg": "RS256", "kid": rsa_key.kid, "crit": ["b64"], "b64": True}, payload(), b"s" * 256)
    assert refused(verifier, known) == "unsupported token header: crit"
    assert refused(verifier, token(rsa_key, crit=["exp"])) == "unsupported token header: crit"
    assert decode_calls == []


def test_unencoded_payload_token_is_refused_as_malformed(
    verifier: TokenVerifier, rsa_key: Key, decode_calls: list[str]
) -> None:
    # RFC 7797 b64=false: pyjwt detaches the payload ("header..signature"), which fails the shape check first.
    unencoded = jwt.api_jws.encode(
        json.dumps(payload()).encode(), rsa_key.private, algorithm="RS256", headers={"kid": rsa_key.kid, "b64": False}
    )
    assert jwt.get_unverified_header(unencoded)["crit"] == ["b64"]
    assert refused(verifier, unencoded) == "malformed token"
    assert decode_calls == []


def signed(key: Key, header_json: str, claims_json: str) -> str:
    """A token signed by ``key`` over a header and claims given as JSON text, which may repeat members."""
    signing_input = f"{b64url(header_json.encode())}.{b64url(claims_json.encode())}"
    signature = jwt.get_algorithm_by_name(key.alg).sign(signing_input.encode(), key.private)
    return f"{signing_input}.{b64url(signature)}"


def claims_json(*members: str) -> str:
    """The default claims as JSON text, with ``members`` (JSON text) appended."""
    return json.dumps(payload())[:-1] + "".join(f", {member}" for member in members) + "}"


def test_signed_token_with_its_members_once_is_accepted(verifier: TokenVerifier, rsa_key: Key) -> None:
    # The control for the refusals below: the same helper, no member repeated.
    text = signed(rsa_key, json.dumps({"alg": "RS256", "kid": rsa_key.kid}), claims_json('"tenant": "t1"'))
    assert verifier.verify(text, cert_x5t=None).subject == "alice"


@pytest.mark.parametrize(
    "members",
    [
        ('"sub": "bob"',),  # {"sub": "alice", ..., "sub": "bob"}: pyjwt alone reads the last one
        ('"iss": "https://evil.example"',),
        ('"groups": ["a"]', '"groups": ["admins"]'),
        ('"cnf": {"x5t#S256": "' + "A" * 43 + '", "x5t#S256": "' + "B" * 43 + '"}',),
        ('"extra": {"nested": {"k": 1, "k": 2}}',),
    ],
    ids=["sub", "iss", "groups", "cnf-member", "unread-claim-nested"],
)
def test_signed_token_repeating_a_claim_at_any_depth_is_refused(
    verifier: TokenVerifier, rsa_key: Key, members: tuple[str, ...], decode_calls: list[str]
) -> None:
    # RFC 7519 4: a parser must refuse repeated claim names or keep the last; refusing means no two readers of
    # the token (the gateway, pyjwt, an auditor) can disagree about who it names. Refused before any signature work.
    text = signed(rsa_key, json.dumps({"alg": "RS256", "kid": rsa_key.kid}), claims_json(*members))
    assert refused(verifier, text) == "malformed token: duplicate member in its claims"
    assert decode_calls == []


@pytest.mark.parametrize(
    "header_json",
    [
        '{"alg": "RS256", "kid": "%(kid)s", "kid": "%(kid)s"}',
        '{"alg": "none", "alg": "RS256", "kid": "%(kid)s"}',
        '{"alg": "RS256", "kid": "%(kid)s", "typ": "dpop+jwt", "typ": "JWT"}',
    ],
    ids=["kid", "alg", "typ"],
)
def test_signed_token_repeating_a_header_member_is_refused(
    verifier: TokenVerifier, rsa_key: Key, header_json: str, decode_calls: list[str]
) -> None:
    text = signed(rsa_key, header_json % {"kid": rsa_key.kid}, claims_json())
    assert refused(verifier, text) == "malformed token: duplicate member in its header"  # RFC 7515 4
    assert decode_calls == []


def test_unexpected_token_type_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    # RFC 8725 3.11: a DPoP proof or logout token signed by a trusted key is still not an access token.
    assert refused(verifier, token(rsa_key, typ="dpop+jwt")) == "unsupported token header: typ"


# ------------------------------------------------------------------------------------------- keys and signatures


def test_unknown_kid_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert refused(verifier, token(rsa_key, kid="retired-2019")) == "unknown key id"


def test_missing_kid_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert refused(verifier, token(rsa_key, kid=OMIT)) == "missing key id"


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key", "ed_key"])
def test_tampered_payload_is_refused(verifier: TokenVerifier, key_name: str, request: pytest.FixtureRequest) -> None:
    key: Key = request.getfixturevalue(key_name)
    header, _, signature = token(key).split(".")
    forged_claims = b64url(json.dumps(payload(sub="admin", groups=["admins"])).encode())
    assert refused(verifier, f"{header}.{forged_claims}.{signature}") == "bad signature"


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key", "ed_key"])
def test_tampered_signature_is_refused(verifier: TokenVerifier, key_name: str, request: pytest.FixtureRequest) -> None:
    key: Key = request.getfixturevalue(key_name)
    header, claims, signature = token(key).split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    assert refused(verifier, f"{header}.{claims}.{b64url(bytes(raw))}") == "bad signature"


def test_token_from_a_key_outside_the_jwks_with_a_known_kid_is_refused(
    verifier: TokenVerifier, rsa_key: Key, foreign_key: Key
) -> None:
    assert refused(verifier, token(foreign_key, kid=rsa_key.kid)) == "bad signature"


# ------------------------------------------------------------------------------------------------- size and shape


def test_oversized_token_is_refused_before_parsing(
    verifier: TokenVerifier, rsa_key: Key, decode_calls: list[str]
) -> None:
    big = token(rsa_key, payload(pad="p" * MAX_TOKEN_BYTES))
    assert refused(verifier, big) == "token too large"
    assert decode_calls == []


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "ab$.cd.ef",
        "..",
        "x.y.z",
        "é.é.é",
        "eyJhbGciOiJSUzI1NiJ9..sig",
        "W10.e30.c2ln",
        "bnVsbA.e30.e30",
        "e30.e30.",
    ],
    ids=[
        "empty",
        "word",
        "two",
        "four",
        "charset",
        "dots",
        "not-json",
        "non-ascii",
        "no-payload",
        "header-list",
        "header-null",
        "header-empty",
    ],
)
def test_garbage_is_refused_as_malformed(verifier: TokenVerifier, garbage: str, decode_calls: list[str]) -> None:
    assert refused(verifier, garbage) == "malformed token"
    assert decode_calls == []


def test_header_without_alg_is_refused_as_malformed(
    verifier: TokenVerifier, rsa_key: Key, decode_calls: list[str]
) -> None:
    assert refused(verifier, compact({"kid": rsa_key.kid}, payload(), b"sig")) == "malformed token"
    assert decode_calls == []


# --------------------------------------------------------------------------------------------------- time claims


def test_expired_token_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert refused(verifier, token(rsa_key, payload(iat=T0 - 900, nbf=T0 - 900, exp=T0 - LEEWAY))) == "token expired"


def test_expiry_within_the_leeway_is_accepted(verifier: TokenVerifier, rsa_key: Key) -> None:
    claims = payload(iat=T0 - 900, nbf=T0 - 900, exp=T0 - LEEWAY + 1)
    assert verifier.verify(token(rsa_key, claims), cert_x5t=None).subject == "alice"


def test_token_not_yet_valid_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert refused(verifier, token(rsa_key, payload(nbf=T0 + LEEWAY + 1))) == "token not yet valid"


def test_nbf_within_the_leeway_is_accepted(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert verifier.verify(token(rsa_key, payload(nbf=T0 + LEEWAY - 5)), cert_x5t=None).subject == "alice"


def test_token_issued_in_the_future_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert refused(verifier, token(rsa_key, payload(iat=T0 + LEEWAY + 1, nbf=OMIT))) == "token not yet valid"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["1800000600", True, None, [T0], 10**400], ids=repr)
def test_time_claim_that_is_not_a_number_is_refused(
    verifier: TokenVerifier, rsa_key: Key, claim: str, value: Any
) -> None:
    reason = refused(verifier, token(rsa_key, payload(**{claim: value})))
    assert reason == ("missing claim: exp" if (claim, value) == ("exp", None) else f"malformed claim: {claim}")


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=repr)
def test_claims_holding_nan_or_infinity_are_not_json(
    verifier: TokenVerifier, rsa_key: Key, claim: str, value: Any
) -> None:
    # Python's json writes NaN and Infinity, which RFC 8259 JSON does not have: the claims are not JSON at all.
    assert refused(verifier, token(rsa_key, payload(**{claim: value}))) == "malformed token"


def test_lifetime_over_the_maximum_is_refused(make: Callable[..., TokenVerifier], rsa_key: Key) -> None:
    verifier = make(max_lifetime_s=3600)
    assert refused(verifier, token(rsa_key, payload(exp=T0 + 3601))) == "token lifetime over the maximum"
    assert verifier.verify(token(rsa_key, payload(exp=T0 + 3600)), cert_x5t=None).subject == "alice"


def test_lifetime_without_iat_is_counted_from_now(make: Callable[..., TokenVerifier], rsa_key: Key) -> None:
    verifier = make(max_lifetime_s=3600)
    claims = payload(iat=OMIT, nbf=OMIT, exp=T0 + 3601)
    assert refused(verifier, token(rsa_key, claims)) == "token lifetime over the maximum"


def test_old_iat_with_a_far_exp_is_over_the_maximum(verifier: TokenVerifier, rsa_key: Key) -> None:
    claims = payload(iat=T0 - 86400, nbf=T0 - 86400, exp=T0 + 60)
    assert refused(verifier, token(rsa_key, claims)) == "token lifetime over the maximum"


# ------------------------------------------------------------------------------------------------ other claims


def test_wrong_issuer_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert refused(verifier, token(rsa_key, payload(iss="https://idp.example.evil"))) == "wrong issuer"


def test_issuer_substring_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    # pyjwt 2.10.0 accepted a substring of the configured issuer (CVE-2024-53861).
    assert refused(verifier, token(rsa_key, payload(iss="https://idp"))) == "wrong issuer"


def test_wrong_audience_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert refused(verifier, token(rsa_key, payload(aud="billing"))) == "wrong audience"


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "sub"])
def test_missing_required_claim_is_refused(verifier: TokenVerifier, rsa_key: Key, claim: str) -> None:
    assert refused(verifier, token(rsa_key, payload(**{claim: OMIT}))) == f"missing claim: {claim}"


def test_exp_is_required_even_when_not_configured(make: Callable[..., TokenVerifier], rsa_key: Key) -> None:
    verifier = make(required_claims=("iss", "aud", "sub"))
    assert refused(verifier, token(rsa_key, payload(exp=OMIT))) == "missing claim: exp"


@pytest.mark.parametrize(("claim", "value"), [("sub", 42), ("sub", ""), ("jti", 7), ("jti", "")])
def test_malformed_sub_or_jti_is_refused(verifier: TokenVerifier, rsa_key: Key, claim: str, value: Any) -> None:
    assert refused(verifier, token(rsa_key, payload(**{claim: value}))) == f"malformed claim: {claim}"


# ---------------------------------------------------------------------------------------- RFC 8705 binding


def test_bound_token_from_its_certificate_is_accepted_and_marked_bound(verifier: TokenVerifier, rsa_key: Key) -> None:
    x5t = cert_thumbprint(make_cert())
    assert verifier.verify(token(rsa_key, payload(cnf={"x5t#S256": x5t})), cert_x5t=x5t).bound is True


def test_bound_token_from_another_certificate_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    bound = token(rsa_key, payload(cnf={"x5t#S256": cert_thumbprint(make_cert())}))
    assert refused(verifier, bound, cert_x5t=cert_thumbprint(make_cert())) == "token bound to another certificate"


def test_bound_token_without_a_certificate_is_refused(verifier: TokenVerifier, rsa_key: Key) -> None:
    bound = token(rsa_key, payload(cnf={"x5t#S256": cert_thumbprint(make_cert())}))
    assert refused(verifier, bound, cert_x5t=None) == "token bound to another certificate"


def test_unbound_token_from_a_certificate_is_not_marked_bound(verifier: TokenVerifier, rsa_key: Key) -> None:
    assert verifier.verify(token(rsa_key), cert_x5t=cert_thumbprint(make_cert())).bound is False


@pytest.mark.parametrize(
    "cnf",
    [{"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}, {}, {"x5t#S256": "A" * 43, "jkt": "B" * 43}],
    ids=["jkt-only", "empty", "x5t-and-jkt"],
)
def test_confirmation_we_cannot_check_is_refused(verifier: TokenVerifier, rsa_key: Key, cnf: dict[str, Any]) -> None:
    assert refused(verifier, token(rsa_key, payload(cnf=cnf)), cert_x5t="A" * 43) == "unsupported confirmation method"


@pytest.mark.parametrize(
    "cnf", ["x5t", None, ["x5t#S256"], {"x5t#S256": 1}, {"x5t#S256": "short"}, {"x5t#S256": "é" * 43}]
)
def test_malformed_cnf_is_refused(verifier: TokenVerifier, rsa_key: Key, cnf: Any) -> None:
    # The non-ASCII case used to reach hmac.compare_digest, which raises TypeError on such strings.
    assert refused(verifier, token(rsa_key, payload(cnf=cnf)), cert_x5t="A" * 43) == "malformed claim: cnf"


# ---------------------------------------------------------------------------------------------------- HMAC opt-in


def test_hs256_is_refused_when_no_secret_is_configured(verifier: TokenVerifier) -> None:
    assert refused(verifier, jwt.encode(payload(), shared_secret(), algorithm="HS256")) == (
        "algorithm not allowed: HS256"
    )


def test_hs256_with_the_configured_secret_is_accepted(make: Callable[..., TokenVerifier], ec_key: Key) -> None:
    secret = shared_secret()
    verifier = make(hmac_secret=secret, algorithms=WITH_HS256)
    assert verifier.verify(jwt.encode(payload(sub="svc"), secret, algorithm="HS256"), cert_x5t=None).subject == "svc"
    assert refused(verifier, jwt.encode(payload(), shared_secret(), algorithm="HS256")) == "bad signature"
    assert verifier.verify(token(ec_key), cert_x5t=None).subject == "alice"  # asymmetric keys keep working


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # the short key is the point
def test_hmac_algorithm_needs_a_secret_at_least_its_hash_size(make: Callable[..., TokenVerifier]) -> None:
    secret = shared_secret()[:32]
    with pytest.raises(TokenConfigError, match=r"too short for \['HS512'\]"):
        make(hmac_secret=secret, algorithms=("RS256", "HS256", "HS512"))
    assert make(hmac_secret=shared_secret(), algorithms=("RS256", "HS512")) is not None  # 64 bytes: enough


def test_only_the_listed_hmac_algorithms_are_accepted(make: Callable[..., TokenVerifier]) -> None:
    secret = shared_secret()  # long enough for HS512, which is not listed
    verifier = make(hmac_secret=secret, algorithms=WITH_HS256)
    for algorithm in ("HS384", "HS512"):
        assert refused(verifier, jwt.encode(payload(), secret, algorithm=algorithm)) == (
            f"algorithm not allowed: {algorithm}"
        )


def test_hmac_secret_without_an_hmac_algorithm_is_a_config_error(make: Callable[..., TokenVerifier]) -> None:
    with pytest.raises(TokenConfigError, match="lists no HS256"):
        make(hmac_secret=shared_secret())


def test_hmac_algorithm_without_a_secret_is_a_config_error(make: Callable[..., TokenVerifier]) -> None:
    with pytest.raises(TokenConfigError, match="shared secret"):
        make(algorithms=("RS256", "HS256"))


def test_short_hmac_secret_is_a_config_error(make: Callable[..., TokenVerifier]) -> None:
    for secret in (b"", b"s" * 31, b"  " + b"s" * 30 + b"\n"):
        with pytest.raises(TokenConfigError, match="at least 32 bytes"):
            make(hmac_secret=secret)


def test_public_key_as_hmac_secret_is_a_config_error(make: Callable[..., TokenVerifier], rsa_key: Key) -> None:
    public = rsa_key.private.public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    for secret in (rsa_key.public_pem, b"\n" + rsa_key.public_pem, ssh, der, json.dumps(rsa_key.jwk()).encode()):
        with pytest.raises(TokenConfigError, match="looks like a key"):
            make(hmac_secret=secret)


@pytest.mark.parametrize("algorithms", [("RS256", "none"), ("RS256", "RS1")])
def test_unknown_or_none_algorithm_is_a_config_error(make: Callable[..., TokenVerifier], algorithms: Any) -> None:
    with pytest.raises(TokenConfigError, match="unsupported"):
        make(algorithms=algorithms)


# ---------------------------------------------------------------------------------------------------- load_jwks


def test_jwks_keys_get_their_pinned_algorithms(tmp_path: Path, rsa_key: Key, ec_key: Key, ed_key: Key) -> None:
    p384 = Key(ec.generate_private_key(ec.SECP384R1()), "ES384")
    path = write_json(tmp_path / "jwks.json", {"keys": [rsa_key.jwk(), ec_key.jwk(), ed_key.jwk(), p384.jwk()]})
    keys = load_jwks(path, allowed_algorithms=("RS256", "PS256", "ES256", "ES384", "EdDSA")).keys
    assert {kid: key.algorithms for kid, key in keys.items()} == {
        rsa_key.kid: {"RS256", "PS256"},
        ec_key.kid: {"ES256"},
        ed_key.kid: {"EdDSA"},
        p384.kid: {"ES384"},
    }


def test_jwk_alg_member_pins_one_algorithm(tmp_path: Path, make: Callable[..., TokenVerifier], rsa_key: Key) -> None:
    path = write_json(tmp_path / "pinned.json", {"keys": [rsa_key.jwk(alg="RS256")]})
    assert load_jwks(path, allowed_algorithms=("RS256", "PS256")).keys[rsa_key.kid].algorithms == {"RS256"}
    verifier = make(jwks=path, algorithms=("RS256", "PS256"))
    ps256 = jwt.encode(payload(), rsa_key.private, algorithm="PS256", headers={"kid": rsa_key.kid})
    assert refused(verifier, ps256) == "algorithm not allowed: PS256 for this key"
    assert verifier.verify(token(rsa_key), cert_x5t=None).subject == "alice"


def test_load_jwks_defaults_to_the_default_algorithms(jwks_file: Path, rsa_key: Key) -> None:
    assert load_jwks(jwks_file).keys[rsa_key.kid].algorithms == {"RS256"}


def jwks_refusal(tmp_path: Path, content: Any, *, algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")) -> str:
    path = write_json(tmp_path / "candidate.json", content)
    with pytest.raises(TokenConfigError) as caught:
        load_jwks(path, allowed_algorithms=algorithms)
    assert str(path) in str(caught.value)
    return str(caught.value)


def test_jwks_key_without_kid_is_refused_by_index(tmp_path: Path, rsa_key: Key, ec_key: Key) -> None:
    anonymous = ec_key.jwk()
    del anonymous["kid"]
    assert "key #1: needs a 'kid'" in jwks_refusal(tmp_path, {"keys": [rsa_key.jwk(), anonymous]})


def test_jwks_duplicate_kid_is_refused(tmp_path: Path, rsa_key: Key, ec_key: Key) -> None:
    assert "key 'k': duplicate kid" in jwks_refusal(tmp_path, {"keys": [rsa_key.jwk(kid="k"), ec_key.jwk(kid="k")]})


def test_jwks_duplicate_json_member_is_refused(tmp_path: Path, rsa_key: Key) -> None:
    text = '{"keys": [' + json.dumps(rsa_key.jwk())[:-1] + ', "kid": "other"}]}'
    assert "duplicate member 'kid'" in jwks_refusal(tmp_path, text)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"key_ops": ["sign"]}, "'key_ops' must include 'verify'"),
        ({"use": "sig", "key_ops": ["encrypt"]}, "disagree (RFC 7517 4.3)"),
        ({"use": "enc", "key_ops": ["verify"]}, "disagree (RFC 7517 4.3)"),
        ({"use": 1}, "'use' must be a string"),
        ({"key_ops": ["verify", "verify"]}, "'key_ops' must be a list of distinct strings"),
        ({"d": "AQAB"}, "private key material"),
        ({"alg": "ES256"}, "not allowed for this key"),
        ({"alg": "PS256"}, "not allowed for this key"),
        ({"alg": "HS256"}, "not allowed for this key"),
        ({"alg": "none"}, "not allowed for this key"),
        ({"kty": "oct"}, "unsupported key type"),
    ],
    ids=[
        "key-ops-sign-only",
        "use-sig-key-ops-encrypt",
        "use-enc-key-ops-verify",
        "use-number",
        "key-ops-duplicate",
        "private",
        "alg-other-type",
        "alg-not-allowed",
        "alg-hmac",
        "alg-none",
        "oct",
    ],
)
def test_jwks_key_that_is_unfit_is_refused_naming_its_kid(
    tmp_path: Path, rsa_key: Key, members: dict[str, Any], message: str
) -> None:
    refusal = jwks_refusal(tmp_path, {"keys": [rsa_key.jwk(kid="candidate", **members)]})
    assert "key 'candidate'" in refusal
    assert message in refusal


@pytest.mark.parametrize(
    "members", [{"use": "enc"}, {"key_ops": ["encrypt"]}, {"use": "enc", "key_ops": ["wrapKey"]}], ids=str
)
def test_jwks_keys_not_meant_for_signatures_are_ignored_and_a_set_of_only_those_is_refused(
    tmp_path: Path, rsa_key: Key, ec_key: Key, members: dict[str, Any]
) -> None:
    # RFC 7517 4.2 and 4.3: an encryption key beside the signing keys (Keycloak's default) is not an error.
    other = {k: v for k, v in ec_key.jwk(kid="enc").items() if k != "key_ops"}  # pyjwt writes ["verify"]
    other.update(members)
    path = write_json(tmp_path / "jwks.json", {"keys": [rsa_key.jwk(), other]})
    loaded = load_jwks(path)
    assert loaded.kids == [rsa_key.kid] and loaded.ignored == ("enc",)
    assert "no key meant for signatures" in jwks_refusal(tmp_path, {"keys": [other]})


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"kty": ["RSA"]}, "unsupported key type"),
        ({"crv": {"name": "P-256"}}, "unsupported key type"),
        ({"alg": ["RS256"]}, "not allowed for this key"),
        ({"n": 12345}, "invalid key"),
    ],
    ids=["kty-list", "crv-object", "alg-list", "n-number"],
)
def test_jwks_key_with_wrongly_typed_members_is_refused_naming_its_kid(
    tmp_path: Path, rsa_key: Key, members: dict[str, Any], message: str
) -> None:
    # Untrusted JSON: a list or object where a string belongs is a config error, never a TypeError.
    refusal = jwks_refusal(tmp_path, {"keys": [rsa_key.jwk(kid="odd", **members)]})
    assert "key 'odd'" in refusal
    assert message in refusal


def test_jwks_with_a_symmetric_key_is_refused(tmp_path: Path) -> None:
    shared = {"kty": "oct", "k": b64url(b"s" * 32), "kid": "shared"}
    assert "key 'shared': private key material" in jwks_refusal(tmp_path, {"keys": [shared]})


def test_jwks_key_type_with_no_allowed_algorithm_is_refused(tmp_path: Path, ed_key: Key) -> None:
    refusal = jwks_refusal(tmp_path, {"keys": [ed_key.jwk(kid="okp")]}, algorithms=("RS256",))
    assert "key 'okp': no allowed algorithm" in refusal


def test_jwks_with_a_private_key_is_refused(tmp_path: Path, ed_key: Key) -> None:
    private = jwt.algorithms.OKPAlgorithm.to_jwk(ed_key.private, as_dict=True)
    assert "private key material" in jwks_refusal(tmp_path, {"keys": [{**private, "kid": "leak"}]})


def test_jwks_with_a_1024_bit_rsa_key_is_refused(tmp_path: Path) -> None:
    weak = Key(rsa.generate_private_key(public_exponent=65537, key_size=1024), "RS256")  # noqa: S505 (under test)
    assert "2048 bits" in jwks_refusal(tmp_path, {"keys": [weak.jwk()]})


def test_jwks_with_an_unsupported_curve_is_refused(tmp_path: Path) -> None:
    p521 = Key(ec.generate_private_key(ec.SECP521R1()), "ES512")
    assert "unsupported key type" in jwks_refusal(tmp_path, {"keys": [p521.jwk()]})


def test_jwks_ec_point_off_the_curve_is_refused(tmp_path: Path, ec_key: Key) -> None:
    assert "invalid key" in jwks_refusal(tmp_path, {"keys": [ec_key.jwk(y=ec_key.jwk()["x"])]})


@pytest.mark.parametrize(
    "content",
    ["", "{", "[]", '{"keys": []}', '{"keys": {}}', '{"other": []}', '{"keys": [1]}', '{"keys": [{"kid": NaN}]}'],
)
def test_jwks_file_that_is_not_a_key_set_is_refused(tmp_path: Path, content: str) -> None:
    jwks_refusal(tmp_path, content)


def test_missing_jwks_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(TokenConfigError, match=r"nowhere\.json"):
        KeyStore(tmp_path / "nowhere.json", interval_s=0)


# ----------------------------------------------------------------------------------------- rotation through the file


@pytest.fixture
def rotating(tmp_path: Path, rsa_key: Key, clock: Clock) -> tuple[Path, KeyStore, TokenVerifier]:
    path = write_json(tmp_path / "rotating.json", {"keys": [rsa_key.jwk()]})
    store = KeyStore(path, interval_s=0)
    return path, store, TokenVerifier(keys=store, issuer=ISSUER, audience=AUDIENCE, clock=clock)


def test_rotation_refuses_tokens_of_the_removed_key_at_once(
    rotating: tuple[Path, KeyStore, TokenVerifier], rsa_key: Key, rsa_key_next: Key
) -> None:
    path, store, verifier = rotating
    cached_old, fresh_old, new = token(rsa_key), token(rsa_key, payload(jti="t-2")), token(rsa_key_next)
    verifier.verify(cached_old, cert_x5t=None)
    assert refused(verifier, new) == "unknown key id"

    write_json(path, {"keys": [rsa_key_next.jwk()]})
    with capture_logs() as logs:
        assert store.reload_now() is True
    [event] = [entry for entry in logs if entry["event"] == "jwks_reloaded"]
    assert (event["kids"], event["removed"], event["added"]) == ([rsa_key_next.kid], [rsa_key.kid], [rsa_key_next.kid])
    assert store.version == 1
    assert refused(verifier, cached_old) == "unknown key id"  # was cached: the reload dropped it
    assert refused(verifier, fresh_old) == "unknown key id"
    assert verifier.verify(new, cert_x5t=None).subject == "alice"


def test_broken_new_jwks_is_refused_and_the_old_keys_keep_working(
    rotating: tuple[Path, KeyStore, TokenVerifier], rsa_key: Key
) -> None:
    path, store, verifier = rotating
    before = store.current
    for broken in ("{half", {"keys": []}, {"keys": [rsa_key.jwk(d="AQAB")]}, {"keys": [rsa_key.jwk(kid="")]}):
        write_json(path, broken)
        with capture_logs() as logs:
            store.reload_now()
        [event] = [entry for entry in logs if entry["event"] == "jwks_reload_failed"]
        assert event["log_level"] == "error"
        assert str(path) in event["error"]
        assert store.current is before
        assert verifier.verify(token(rsa_key, payload(jti=secrets.token_hex(4))), cert_x5t=None).subject == "alice"


def test_unchanged_jwks_is_not_reloaded(rotating: tuple[Path, KeyStore, TokenVerifier]) -> None:
    _, store, _ = rotating
    before = store.current
    assert store.reload_now() is False
    assert store.current is before


# ---------------------------------------------------------------------------------------------------------- cache


def test_second_verify_of_a_token_skips_pyjwt_decode(
    verifier: TokenVerifier, rsa_key: Key, decode_calls: list[str]
) -> None:
    text = token(rsa_key)
    assert verifier.verify(text, cert_x5t=None) == verifier.verify(text, cert_x5t=None)
    assert decode_calls == [text]
    assert verifier.signature_checks == 1


def test_refusals_are_not_cached(verifier: TokenVerifier, rsa_key: Key, decode_calls: list[str]) -> None:
    text = token(rsa_key, payload(aud="billing"))
    refused(verifier, text)
    refused(verifier, text)
    assert len(decode_calls) == 2


def test_cache_entry_is_never_used_past_exp(
    verifier: TokenVerifier, rsa_key: Key, clock: Clock, decode_calls: list[str]
) -> None:
    text = token(rsa_key, payload(exp=T0 + 60))
    verifier.verify(text, cert_x5t=None)
    clock.now = T0 + 59
    verifier.verify(text, cert_x5t=None)
    assert len(decode_calls) == 1
    clock.now = T0 + 60  # exp: the cache stops here; a fresh check still grants the leeway
    assert verifier.verify(text, cert_x5t=None).subject == "alice"
    assert len(decode_calls) == 2
    assert verifier.cached_tokens == 0  # past exp: not cached again
    clock.now = T0 + 60 + LEEWAY
    assert refused(verifier, text) == "token expired"


def test_cache_is_bounded_least_recently_used_first(
    make: Callable[..., TokenVerifier], rsa_key: Key, decode_calls: list[str]
) -> None:
    verifier = make(cache_size=2)
    first, second, third = (token(rsa_key, payload(jti=f"t-{n}")) for n in range(3))
    for text in (first, second, first, third):  # third evicts second, the least recently used
        verifier.verify(text, cert_x5t=None)
    assert verifier.cached_tokens == 2
    decode_calls.clear()
    verifier.verify(first, cert_x5t=None)
    verifier.verify(third, cert_x5t=None)
    assert decode_calls == []
    verifier.verify(second, cert_x5t=None)
    assert decode_calls == [second]


def test_cache_size_zero_disables_the_cache(make: Callable[..., TokenVerifier], rsa_key: Key) -> None:
    verifier = make(cache_size=0)
    text = token(rsa_key)
    verifier.verify(text, cert_x5t=None)
    verifier.verify(text, cert_x5t=None)
    assert (verifier.signature_checks, verifier.cached_tokens) == (2, 0)


def test_binding_is_checked_on_every_cache_hit(verifier: TokenVerifier, rsa_key: Key) -> None:
    x5t = cert_thumbprint(make_cert())
    text = token(rsa_key, payload(cnf={"x5t#S256": x5t}))
    assert verifier.verify(text, cert_x5t=x5t).bound is True
    assert refused(verifier, text, cert_x5t=cert_thumbprint(make_cert())) == "token bound to another certificate"
    assert refused(verifier, text, cert_x5t=None) == "token bound to another certificate"
    assert verifier.verify(text, cert_x5t=x5t).bound is True
    assert verifier.signature_checks == 1


def test_cache_holds_digests_not_tokens(verifier: TokenVerifier, rsa_key: Key) -> None:
    text = token(rsa_key)
    verifier.verify(text, cert_x5t=None)
    assert list(verifier._cache) == [hashlib.sha256(text.encode()).digest()]


def test_concurrent_verification_keeps_the_cache_bounded(make: Callable[..., TokenVerifier], rsa_key: Key) -> None:
    verifier = make(cache_size=4)
    texts = [token(rsa_key, payload(jti=f"t-{n}")) for n in range(12)]
    failures: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for n in range(36):
                assert verifier.verify(texts[(n + offset) % len(texts)], cert_x5t=None).subject == "alice"
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert failures == []
    assert verifier.cached_tokens <= 4


# ------------------------------------------------------------------------------------------- issuing and thumbprints


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key", "ed_key"])
def test_issued_token_round_trips_through_verify(
    verifier: TokenVerifier, key_name: str, request: pytest.FixtureRequest
) -> None:
    key: Key = request.getfixturevalue(key_name)
    text = issue_token(
        private_key_pem=key.pem,
        sub="alice",
        iss=ISSUER,
        aud=AUDIENCE,
        scopes=["predict", "list"],
        groups=["ml-team"],
        ttl_s=900,
        now=T0,
    )
    header, claims = jwt.get_unverified_header(text), jwt.decode(text, options={"verify_signature": False})
    assert (header["alg"], header["kid"], header["typ"]) == (key.alg, key.kid, "JWT")
    assert (claims["iat"], claims["nbf"], claims["exp"], claims["scope"]) == (T0, T0, T0 + 900, "predict list")
    verified = verifier.verify(text, cert_x5t=None)
    assert (verified.subject, verified.expires_at, verified.bound) == ("alice", T0 + 900, False)
    assert (verified.scopes, verified.groups) == ({"predict", "list"}, {"ml-team"})
    assert verified.token_id == claims["jti"]


def test_issued_token_with_a_ttl_over_the_default_maximum_lifetime_is_refused(
    verifier: TokenVerifier, rsa_key: Key
) -> None:
    def issued(ttl_s: float) -> str:
        return issue_token(private_key_pem=rsa_key.pem, sub="alice", iss=ISSUER, aud=AUDIENCE, ttl_s=ttl_s, now=T0)

    assert refused(verifier, issued(86401)) == "token lifetime over the maximum"
    assert verifier.verify(issued(86400), cert_x5t=None).subject == "alice"


def test_issued_tokens_have_distinct_jtis(rsa_key: Key) -> None:
    ids = {
        jwt.decode(
            issue_token(private_key_pem=rsa_key.pem, sub="a", iss=ISSUER, aud=AUDIENCE, now=T0),
            options={"verify_signature": False},
        )["jti"]
        for _ in range(5)
    }
    assert len(ids) == 5


def test_issued_bound_token_verifies_only_from_that_certificate(verifier: TokenVerifier, ec_key: Key) -> None:
    cert = make_cert()
    text = issue_token(private_key_pem=ec_key.pem, sub="alice", iss=ISSUER, aud=AUDIENCE, bind_cert_pem=cert, now=T0)
    der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    x5t = b64url(hashlib.sha256(der).digest())
    assert cert_thumbprint(cert) == cert_thumbprint(der) == cert_thumbprint(cert.decode()) == x5t
    assert jwt.decode(text, options={"verify_signature": False})["cnf"] == {"x5t#S256": x5t}
    assert verifier.verify(text, cert_x5t=x5t).bound is True
    assert refused(verifier, text, cert_x5t=cert_thumbprint(make_cert())) == "token bound to another certificate"


def test_issued_token_with_explicit_kid_and_extra_claims(verifier: TokenVerifier, rsa_key: Key) -> None:
    text = issue_token(
        private_key_pem=rsa_key.pem, sub="a", iss=ISSUER, aud=AUDIENCE, kid="named", extra_claims={"tenant": "t1"}
    )
    assert jwt.get_unverified_header(text)["kid"] == "named"
    assert jwt.decode(text, options={"verify_signature": False})["tenant"] == "t1"
    assert refused(verifier, text) == "unknown key id"


@pytest.mark.parametrize(
    "changes",
    [{"sub": ""}, {"ttl_s": 0}, {"scopes": ["two words"]}, {"groups": [""]}, {"extra_claims": {"exp": 1}}],
    ids=["empty-sub", "zero-ttl", "scope-with-space", "empty-group", "override-exp"],
)
def test_issue_token_refuses_bad_arguments(rsa_key: Key, changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        issue_token(**{"private_key_pem": rsa_key.pem, "sub": "a", "iss": ISSUER, "aud": AUDIENCE, **changes})


def test_issue_token_refuses_unusable_signing_keys() -> None:
    p521 = Key(ec.generate_private_key(ec.SECP521R1()), "ES512")
    with pytest.raises(TokenConfigError, match="unsupported curve"):
        issue_token(private_key_pem=p521.pem, sub="a", iss=ISSUER, aud=AUDIENCE)
    with pytest.raises(TokenConfigError, match="cannot load"):
        issue_token(private_key_pem=b"not a key", sub="a", iss=ISSUER, aud=AUDIENCE)


def test_jwk_kid_is_the_rfc7638_thumbprint() -> None:
    # RFC 7638 3.1: the example RSA key and its thumbprint.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknj"
        "hMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6"
        "qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8aw"
        "apJzKnqDKgw"
    )
    modulus = int.from_bytes(base64.urlsafe_b64decode(n + "=" * (-len(n) % 4)), "big")
    assert (
        jwk_kid(rsa.RSAPublicNumbers(e=65537, n=modulus).public_key()) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    )


def test_jwk_kid_is_the_same_for_a_private_key_and_its_public_half(ed_key: Key) -> None:
    assert jwk_kid(ed_key.private) == jwk_kid(ed_key.private.public_key())


def test_kid_from_jwks_finds_the_published_kid(
    tmp_path: Path, rsa_key: Key, ec_key: Key, ed_key: Key, foreign_key: Key
) -> None:
    jwks = {"keys": [rsa_key.jwk(kid="signing-2026"), ec_key.jwk(), ed_key.jwk(kid="edge-2026")]}
    path = write_json(tmp_path / "jwks.json", jwks)
    assert kid_from_jwks(path, rsa_key.private.public_key()) == "signing-2026"
    assert kid_from_jwks(path, rsa_key.pem) == "signing-2026"
    assert kid_from_jwks(path, rsa_key.public_pem) == "signing-2026"
    assert kid_from_jwks(path, ec_key.private) == ec_key.kid
    assert kid_from_jwks(path, ed_key.pem) == "edge-2026"  # an OKP key, matched by thumbprint, not by kid
    assert kid_from_jwks(path, foreign_key.pem) is None


def test_kid_from_jwks_names_a_broken_file(tmp_path: Path, rsa_key: Key) -> None:
    path = write_json(tmp_path / "jwks.json", "{broken")
    with pytest.raises(TokenConfigError, match=r"jwks\.json"):
        kid_from_jwks(path, rsa_key.pem)
