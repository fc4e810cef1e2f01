"""gateway.auth.remote_keys against a real HTTPS key server on 127.0.0.1 (tests/key_server.py, with the session
PKI's server certificate): the fetch policy (https only, certificate checked, no redirects, bounded size and
time), the last good key set kept through failures, the unknown-kid refresh's rate limit, and OIDC Discovery."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from gateway.auth.issuer import issue_token
from gateway.auth.keys import TokenConfigError
from gateway.auth.remote_keys import MAX_DOCUMENT_BYTES, FetchError, KeyFetcher, RemoteKeyStore
from gateway.auth.verifier import TokenVerifier, UnknownKidError
from tests.conftest import Pki
from tests.key_server import JWKS_PATH, KeyServer, new_signing_key, send

ISSUER = "https://gateway.local"
WAIT_S = 10.0  # bound on every wait for a refresh; none takes near this long


class Clock:
    """The store's monotonic clock, moved by hand: the rate limit is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(pki: Pki) -> Iterator[KeyServer]:
    key_server = KeyServer(pki.path("server.crt"), pki.path("server.key"))
    key_server.serve(JWKS_PATH, pki.read("jwks.json"))
    yield key_server
    key_server.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(server: KeyServer, pki: Pki, clock: Clock) -> Iterator[RemoteKeyStore]:
    remote = make_store(server, pki, clock=clock)
    yield remote
    remote.stop()


def make_store(server: KeyServer, pki: Pki, **kwargs: Any) -> RemoteKeyStore:
    settings: dict[str, Any] = {
        "url": server.url(JWKS_PATH),
        "issuer": ISSUER,
        "ca": pki.path("ca.crt"),
        "refresh_interval_s": 3600.0,  # no scheduled refresh during a test, unless it asks for one
        "min_refresh_interval_s": 30.0,
        **kwargs,
    }
    return RemoteKeyStore(**settings)


def fetcher(pki: Pki, **kwargs: Any) -> KeyFetcher:
    return KeyFetcher(ca=pki.path("ca.crt"), **kwargs)


def failure_count(reason: str) -> float:
    return REGISTRY.get_sample_value("gateway_jwks_fetch_failures_total", {"reason": reason}) or 0.0


def signed(pki: Pki, *, kid: str) -> str:
    return issue_token(private_key_pem=pki.read("jwt-signing.key"), sub="alice", kid=kid, iss=ISSUER, aud="gateway")


def unsigned(*, kid: str) -> str:
    part = lambda value: base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{part({'alg': 'RS256', 'kid': kid})}.{part({'sub': 'alice'})}.c2ln"


def published_kid(pki: Pki) -> str:
    return json.loads(pki.read("jwks.json"))["keys"][0]["kid"]


# ------------------------------------------------------------------------------------------------- fetch and keep


def test_the_key_set_is_fetched_at_start_and_verifies_tokens(store: RemoteKeyStore, server: KeyServer, pki: Pki):
    verifier = TokenVerifier(keys=store, issuer=ISSUER, audience="gateway")
    assert verifier.verify(signed(pki, kid=published_kid(pki)), cert_x5t=None).subject == "alice"
    assert store.current.kids == [published_kid(pki)] and server.count(JWKS_PATH) == 1
    for metric, labels in (
        ("gateway_jwks_last_success_timestamp_seconds", {}),
        ("gateway_last_reload_timestamp_seconds", {"store": "jwks"}),
    ):
        assert (REGISTRY.get_sample_value(metric, labels) or 0) > 0


def test_a_rotated_key_set_is_taken_on_reload_and_counts_as_a_change(
    store: RemoteKeyStore, server: KeyServer, pki: Pki
):
    assert store.reload_now() is False  # the same document: no new version, the token cache stays
    version = store.version
    _, new_jwk = new_signing_key()
    old_jwk = json.loads(pki.read("jwks.json"))["keys"][0]
    server.serve(JWKS_PATH, json.dumps({"keys": [old_jwk, new_jwk]}).encode())
    with capture_logs() as logs:
        assert store.reload_now() is True
    assert store.version == version + 1 and set(store.current.kids) == {old_jwk["kid"], new_jwk["kid"]}
    (event,) = [entry for entry in logs if entry["event"] == "jwks_reloaded"]
    assert event["added"] == [new_jwk["kid"]] and event["url"] == server.url(JWKS_PATH)


def _jwk(pki: Pki, **changes: Any) -> dict[str, Any]:
    return {**json.loads(pki.read("jwks.json"))["keys"][0], **changes}


def _encryption_jwk(**changes: Any) -> dict[str, Any]:
    """An encryption key as Keycloak publishes it beside its signing key (RFC 7517 4.2 ``use: enc``)."""
    _, jwk = new_signing_key()
    jwk.pop("key_ops", None)  # pyjwt writes ["verify"]: Keycloak's encryption key has none
    return {**jwk, "kid": "enc-" + jwk["kid"][:8], "use": "enc", "alg": "RSA-OAEP", **changes}


def test_keys_not_meant_for_signatures_are_ignored_and_the_rest_is_taken(store: RemoteKeyStore, server: KeyServer, pki):
    encryption = _encryption_jwk()
    wrapping = _encryption_jwk(kid="wrap", use=None, key_ops=["wrapKey", "unwrapKey"])
    del wrapping["use"]
    unusable_type = {"kty": "oct-but-enc", "use": "enc", "kid": "opaque"}  # nothing else about it is read
    document = {"keys": [encryption, _jwk(pki), wrapping, unusable_type]}
    server.serve(JWKS_PATH, json.dumps(document).encode())
    with capture_logs() as logs:
        store.reload_now()
    assert store.current.kids == [published_kid(pki)]
    assert [entry["event"] for entry in logs if entry["event"].startswith("jwks_")] == ["jwks_reloaded"]
    (event,) = [entry for entry in logs if entry["event"] == "jwks_reloaded"]
    assert event["ignored"] == [encryption["kid"], "wrap", "opaque"]
    verifier = TokenVerifier(keys=store, issuer=ISSUER, audience="gateway")
    assert verifier.verify(signed(pki, kid=published_kid(pki)), cert_x5t=None).subject == "alice"
    with pytest.raises(UnknownKidError):  # an encryption key never verifies a token
        verifier.verify(signed(pki, kid=encryption["kid"]), cert_x5t=None)


def test_a_key_server_publishing_keycloaks_two_keys_starts_the_store(server: KeyServer, pki: Pki):
    server.serve(JWKS_PATH, json.dumps({"keys": [_jwk(pki), _encryption_jwk()]}).encode())
    remote = make_store(server, pki)
    try:
        assert remote.current.kids == [published_kid(pki)]
    finally:
        remote.stop()


BAD_DOCUMENTS: dict[str, Any] = {
    "not-json": lambda pki: b"<html>maintenance</html>",
    "duplicate-member": lambda pki: b'{"keys": [], "keys": ' + json.dumps([_jwk(pki)]).encode() + b"}",
    "private-member": lambda pki: json.dumps({"keys": [_jwk(pki, d="AAAA")]}).encode(),
    "empty-keys": lambda pki: b'{"keys": []}',
    "wrong-alg": lambda pki: json.dumps({"keys": [_jwk(pki, alg="ES256")]}).encode(),
    "duplicate-kid": lambda pki: json.dumps({"keys": [_jwk(pki), _jwk(pki)]}).encode(),
    # Ignored keys are still read for what makes a document malformed or dangerous.
    "only-encryption-keys": lambda pki: json.dumps({"keys": [_encryption_jwk()]}).encode(),
    "encryption-key-with-private-member": lambda pki: json.dumps(
        {"keys": [_jwk(pki), _encryption_jwk(d="AAAA")]}
    ).encode(),
    "use-not-a-string": lambda pki: json.dumps({"keys": [_jwk(pki), _encryption_jwk(use=["enc"])]}).encode(),
    "key-ops-not-a-list": lambda pki: json.dumps({"keys": [_jwk(pki), _encryption_jwk(key_ops="encrypt")]}).encode(),
    "use-and-key-ops-disagree": lambda pki: json.dumps({"keys": [_jwk(pki, key_ops=["encrypt"])]}).encode(),
    "encryption-key-not-an-object": lambda pki: json.dumps({"keys": [_jwk(pki), "enc"]}).encode(),
}


@pytest.mark.parametrize("name", BAD_DOCUMENTS)
def test_a_bad_document_keeps_the_last_good_keys_and_is_logged_and_counted(
    store: RemoteKeyStore, server: KeyServer, pki: Pki, name: str
):
    before, failures = store.current, failure_count("invalid")
    server.serve(JWKS_PATH, BAD_DOCUMENTS[name](pki))
    with capture_logs() as logs:
        assert store.reload_now() is False
    assert store.current is before
    assert failure_count("invalid") == failures + 1
    (event,) = [entry for entry in logs if entry["event"] == "jwks_fetch_failed"]
    assert event["url"] == server.url(JWKS_PATH) and event["log_level"] == "error"
    assert '"n"' not in event["reason"] and _jwk(pki)["n"] not in event["reason"]  # no key material


def test_a_key_server_gone_keeps_the_last_good_keys(store: RemoteKeyStore, server: KeyServer):
    before, failures = store.current, failure_count("connect")
    server.close()
    assert store.reload_now() is False
    assert store.current is before and failure_count("connect") == failures + 1


def test_an_http_error_keeps_the_last_good_keys(store: RemoteKeyStore, server: KeyServer):
    before = store.current
    server.serve(JWKS_PATH, b"{}", status=503)
    assert store.reload_now() is False and store.current is before


def test_a_failed_first_fetch_stops_the_start_naming_the_setting_and_the_url(server: KeyServer, pki: Pki):
    server.serve(JWKS_PATH, b'{"keys": []}')
    with pytest.raises(TokenConfigError) as raised:
        make_store(server, pki)
    message = str(raised.value)
    assert message.startswith(f"auth.jwks_url: cannot fetch the key set: {server.url(JWKS_PATH)}: ")
    assert "non-empty 'keys' list" in message and "\n" not in message


# ------------------------------------------------------------------------------------------- the unknown-kid flood


def test_a_flood_of_unknown_kids_causes_one_fetch_per_interval(
    store: RemoteKeyStore, server: KeyServer, pki: Pki, clock: Clock
):
    store.start()
    verifier = TokenVerifier(keys=store, issuer=ISSUER, audience="gateway")

    def try_random_kid(_: int) -> None:
        # The kid is looked up before any signature work, so these need no real signature.
        token = unsigned(kid=secrets.token_urlsafe(16))
        with pytest.raises(UnknownKidError):
            verifier.verify(token, cert_x5t=None)
        refresh = verifier.refresh_keys()
        if refresh is not None:
            refresh.result(timeout=WAIT_S)
        with pytest.raises(UnknownKidError):  # still unknown after the refresh: refused
            verifier.verify(token, cert_x5t=None)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(try_random_kid, range(200)))
    assert server.count(JWKS_PATH) == 2  # the fetch at start, and one for the whole flood
    clock.now += 29.0
    assert store.refresh_unknown_kid() is None  # still within the interval
    clock.now += 2.0
    refresh = store.refresh_unknown_kid()
    assert refresh is not None and store.refresh_unknown_kid() is refresh  # in flight: shared
    refresh.result(timeout=WAIT_S)
    assert server.count(JWKS_PATH) == 3


def test_a_token_signed_by_a_new_key_is_accepted_after_the_unknown_kid_refresh(
    store: RemoteKeyStore, server: KeyServer, pki: Pki
):
    store.start()
    verifier = TokenVerifier(keys=store, issuer=ISSUER, audience="gateway")
    new_pem, new_jwk = new_signing_key()
    server.serve(JWKS_PATH, json.dumps({"keys": [new_jwk]}).encode())
    token = issue_token(private_key_pem=new_pem, sub="alice", kid=new_jwk["kid"], iss=ISSUER, aud="gateway")
    with pytest.raises(UnknownKidError):
        verifier.verify(token, cert_x5t=None)
    refresh = verifier.refresh_keys()
    assert refresh is not None
    refresh.result(timeout=WAIT_S)
    assert verifier.verify(token, cert_x5t=None).subject == "alice"


def test_stop_releases_a_waiting_refresh(server: KeyServer, pki: Pki):
    remote = make_store(server, pki)  # never started: nothing would ever serve the refresh
    refresh = remote.refresh_unknown_kid()
    assert refresh is not None
    remote.stop()
    assert refresh.done()


# ------------------------------------------------------------------------------------------------- fetch policy


def refused(pki: Pki, url: str, kind: str, **kwargs: Any) -> str:
    client = fetcher(pki, **kwargs)
    try:
        with pytest.raises(FetchError) as raised:
            client.get(url)
    finally:
        client.close()
    assert raised.value.kind == kind, str(raised.value)
    return str(raised.value)


@pytest.mark.parametrize(
    "location",
    ["https://example.invalid/jwks.json", "http://127.0.0.1:{port}/jwks.json", "https://127.0.0.1:{port}/jwks.json"],
    ids=["other-host", "plain-http", "same-host"],
)
def test_a_redirect_is_refused_and_not_followed(server: KeyServer, pki: Pki, location: str):
    server.responders["/moved"] = send(302, b"", {"Location": location.format(port=server.port)})
    message = refused(pki, server.url("/moved"), "redirect")
    assert "HTTP 302: redirects are not followed" in message
    assert server.count(JWKS_PATH) == 0


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/jwks.json", "ftp://x/jwks.json", "https://user@x/jwks.json"])
def test_only_https_urls_are_fetched(pki: Pki, url: str):
    refused(pki, url, "url")


def _stream(*, chunked: bool, header_length: int | None) -> Any:
    """A body larger than the bound, sent without a length, with a (lying) one, or in chunks."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.protocol_version = "HTTP/1.1" if chunked else "HTTP/1.0"
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        if header_length is not None:
            handler.send_header("Content-Length", str(header_length))
        handler.end_headers()
        piece = b"[" * 65536
        for _ in range(MAX_DOCUMENT_BYTES // len(piece) + 2):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")

    return respond


@pytest.mark.parametrize(
    ("chunked", "header_length"),
    [(False, None), (True, None), (False, 2 * MAX_DOCUMENT_BYTES)],
    ids=["no-length", "chunked", "honest-length"],
)
def test_an_oversized_response_is_refused_as_it_arrives(server: KeyServer, pki: Pki, chunked, header_length):
    server.responders["/big"] = _stream(chunked=chunked, header_length=header_length)
    assert f"larger than {MAX_DOCUMENT_BYTES} bytes" in refused(pki, server.url("/big"), "too_large")


def test_an_oversized_response_under_a_lying_small_content_length_is_refused(store: RemoteKeyStore, server: KeyServer):
    # The client reads what the header announces and no more: the document is cut short, and refused.
    before = store.current
    server.responders[JWKS_PATH] = _stream(chunked=False, header_length=100)
    assert store.reload_now() is False and store.current is before


def test_a_certificate_not_signed_by_jwks_ca_is_refused(server: KeyServer, pki: Pki, other_pki: Pki):
    client = KeyFetcher(ca=other_pki.path("ca.crt"))
    with pytest.raises(FetchError) as raised:
        client.get(server.url(JWKS_PATH))
    client.close()
    assert raised.value.kind == "tls" and server.count(JWKS_PATH) == 0


def test_without_jwks_ca_the_system_store_is_used_and_a_private_ca_is_refused(server: KeyServer):
    client = KeyFetcher(ca=None)
    with pytest.raises(FetchError) as raised:
        client.get(server.url(JWKS_PATH))
    client.close()
    assert raised.value.kind == "tls"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_a_server_that_never_answers_is_a_timeout_not_a_hang(pki: Pki, silent_port: int):
    refused(pki, f"https://127.0.0.1:{silent_port}/jwks.json", "timeout", timeout_s=0.5)


def test_a_response_dripping_forever_is_a_timeout_not_a_hang(server: KeyServer, pki: Pki):
    stop = threading.Event()

    def drip(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.write(b"{")
        while not stop.wait(0.05):
            handler.wfile.write(b" ")
            handler.wfile.flush()

    server.responders["/drip"] = drip
    try:
        refused(pki, server.url("/drip"), "timeout", timeout_s=0.5)
    finally:
        stop.set()


# --------------------------------------------------------------------------------------------------- discovery

DISCOVERY_PATH = "/.well-known/openid-configuration"


def discovery_server(server: KeyServer, **document: Any) -> str:
    """The issuer whose metadata ``server`` publishes (``document`` over the defaults)."""
    issuer = server.url("")
    metadata = {"issuer": issuer, "jwks_uri": server.url(JWKS_PATH), **document}
    server.serve(DISCOVERY_PATH, json.dumps(metadata).encode())
    return issuer


def test_discovery_takes_the_jwks_uri_of_the_issuers_metadata(server: KeyServer, pki: Pki):
    issuer = discovery_server(server)
    remote = make_store(server, pki, url=None, issuer=issuer)
    try:
        assert remote.url == server.url(JWKS_PATH) and remote.current.kids == [published_kid(pki)]
        assert remote.reload_now() is False and server.count(DISCOVERY_PATH) == 2  # SIGHUP reads it again
    finally:
        remote.stop()


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"issuer": "https://127.0.0.1/other"}, "its issuer is not auth.issuer"),
        ({"jwks_uri": "http://127.0.0.1/jwks.json"}, "jwks_uri must be an https:// URL"),
        ({"jwks_uri": None}, "jwks_uri missing"),
    ],
    ids=["issuer-mismatch", "http-jwks-uri", "no-jwks-uri"],
)
def test_discovery_refuses_metadata_of_another_issuer_or_without_an_https_jwks_uri(
    server: KeyServer, pki: Pki, document: dict[str, Any], message: str
):
    issuer = discovery_server(server, **document)
    with pytest.raises(TokenConfigError, match=rf"^auth\.discovery: cannot fetch the key set: .*{message}"):
        make_store(server, pki, url=None, issuer=issuer)
    assert server.count(JWKS_PATH) == 0


def test_discovery_of_an_issuer_with_a_trailing_slash_removes_it_before_the_path(server: KeyServer, pki: Pki):
    discovery_server(server, issuer=server.url("/"))
    remote = make_store(server, pki, url=None, issuer=server.url("/"))
    remote.stop()
    assert server.count(DISCOVERY_PATH) == 1
