"""ClientCredentialsTokenProvider against a real local HTTPS server (http.server with ssl) that misbehaves on
purpose: what the SDK sends, and each way a token endpoint's answer is refused. The provider's refusals from a
real OpenID provider are in tests/e2e/test_identity_provider.py."""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest

import gateway
from tests.conftest import Pki

SECRET = "s3cret+with/odd=chars"
GOOD = {"access_token": "header.payload.sig", "token_type": "Bearer", "expires_in": 300}

Reply = Callable[[BaseHTTPRequestHandler], None]


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
    handler.send_response(status)
    for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def json_reply(status: int, document: Any) -> Reply:
    return lambda handler: send(handler, status, json.dumps(document).encode())


class TokenEndpoint:
    """A token endpoint on 127.0.0.1 over TLS with the session PKI's server certificate; ``reply`` answers the
    next requests, ``requests`` keeps what each one sent, ``release`` ends replies that hang."""

    def __init__(self, pki: Pki) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.path("ca.crt"))
        context.load_cert_chain(pki.path("server.crt"), pki.path("server.key"))
        context.verify_mode = ssl.CERT_OPTIONAL
        endpoint = self
        self.reply: Reply = json_reply(200, GOOD)
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                peer = self.connection.getpeercert()  # type: ignore[attr-defined]
                endpoint.requests.append(
                    {"form": parse_qs(body.decode()), "headers": dict(self.headers), "peer": peer or None}
                )
                endpoint.reply(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint(pki: Pki) -> Iterator[TokenEndpoint]:
    server = TokenEndpoint(pki)
    yield server
    server.close()


def secret_provider(endpoint: TokenEndpoint, pki: Pki, **kwargs: Any) -> gateway.ClientCredentialsTokenProvider:
    return gateway.ClientCredentialsTokenProvider(
        endpoint.url, "svc", client_secret=SECRET, ca=pki.path("ca.crt"), **kwargs
    )


def refusal(provider: gateway.ClientCredentialsTokenProvider) -> gateway.AuthenticationError:
    with pytest.raises(gateway.AuthenticationError) as caught:
        provider.token()
    assert SECRET not in str(caught.value)
    return caught.value


def test_a_secret_goes_in_basic_authentication_form_encoded_never_in_the_body(endpoint, pki):
    assert secret_provider(endpoint, pki, scope="predict list", resource="https://gateway.local/x").token() == (
        "header.payload.sig"
    )
    (request,) = endpoint.requests
    assert request["form"] == {
        "grant_type": ["client_credentials"],
        "scope": ["predict list"],
        "resource": ["https://gateway.local/x"],
    }
    basic = base64.b64decode(request["headers"]["Authorization"].removeprefix("Basic ")).decode()
    assert basic == "svc:s3cret%2Bwith%2Fodd%3Dchars"  # RFC 6749 2.3.1
    assert request["peer"] is None


def test_tls_client_auth_sends_the_client_id_and_presents_the_certificate(endpoint, pki):
    provider = gateway.ClientCredentialsTokenProvider(
        endpoint.url, "alice", cert=pki.path("alice.crt"), key=pki.read("alice.key"), ca=pki.path("ca.crt")
    )
    provider.token()
    (request,) = endpoint.requests
    assert request["form"] == {"grant_type": ["client_credentials"], "client_id": ["alice"]}
    assert "Authorization" not in request["headers"]
    assert dict(name for rdn in request["peer"]["subject"] for name in rdn)["commonName"] == "alice"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (lambda h: send(h, 200, b"<html>sign in</html>", **{"Content-Type": "text/html"}), "invalid_token_response"),
        (json_reply(200, ["not", "an", "object"]), "invalid_token_response"),
        (json_reply(200, {"token_type": "Bearer", "expires_in": 60}), "invalid_token_response"),
        (json_reply(200, {**GOOD, "access_token": ""}), "invalid_token_response"),
        (json_reply(200, {**GOOD, "token_type": "DPoP"}), "invalid_token_response"),
        (json_reply(200, {**GOOD, "expires_in": "soon"}), "invalid_token_response"),
        (json_reply(200, {**GOOD, "expires_in": -1}), "invalid_token_response"),
        (lambda h: send(h, 200, b"[" * 60000), "invalid_token_response"),
        (lambda h: send(h, 502, b"Bad Gateway"), "http_502"),
        (json_reply(400, {"error_description": "no code"}), "http_400"),
    ],
    ids=[
        "non-json",
        "json-array",
        "no-access-token",
        "empty-access-token",
        "not-bearer",
        "expires-in-text",
        "expires-in-negative",
        "deeply-nested",
        "http-502-text",
        "error-without-code",
    ],
)
def test_an_answer_that_is_not_a_token_is_refused(endpoint, pki, reply, reason):
    endpoint.reply = reply
    assert refusal(secret_provider(endpoint, pki)).reason == reason


def test_the_providers_error_code_and_a_bounded_description_are_carried(endpoint, pki):
    endpoint.reply = json_reply(401, {"error": "invalid_client", "error_description": "bad\nsecret " + "x" * 5000})
    error = refusal(secret_provider(endpoint, pki))
    assert error.reason == "invalid_client"
    assert "invalid_client: bad?secret xxx" in error.message and len(error.message) < 400


def test_an_oversized_body_is_refused(endpoint, pki):
    body = json.dumps({**GOOD, "padding": "x" * 200_000}).encode()
    endpoint.reply = lambda handler: send(handler, 200, body)
    error = refusal(secret_provider(endpoint, pki))
    assert error.reason == "invalid_token_response" and "over 65536 bytes" in error.message


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_not_followed(endpoint, pki, status):
    endpoint.reply = lambda handler: send(handler, status, b"", Location="http://127.0.0.1:1/steal")
    assert refusal(secret_provider(endpoint, pki)).reason == "token_endpoint_redirect"
    assert len(endpoint.requests) == 1


def test_an_endpoint_that_never_answers_times_out(endpoint, pki):
    endpoint.reply = lambda handler: endpoint.release.wait(30)
    assert refusal(secret_provider(endpoint, pki, timeout_s=0.5)).reason == "token_endpoint_timeout"


def test_an_endpoint_that_trickles_its_answer_times_out(endpoint, pki):
    """A byte at a time, each within the per-read timeout: the whole answer has a deadline too."""

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        while not endpoint.release.wait(0.1):
            handler.wfile.write(b" ")
            handler.wfile.flush()

    endpoint.reply = trickle
    assert refusal(secret_provider(endpoint, pki, timeout_s=0.5)).reason == "token_endpoint_timeout"


def test_an_endpoint_with_a_certificate_from_another_ca_is_unreachable(endpoint, other_pki):
    error = refusal(secret_provider(endpoint, other_pki))
    assert error.reason == "token_endpoint_unreachable" and "CERTIFICATE_VERIFY_FAILED" in error.message
    assert endpoint.requests == []


def test_a_token_without_expires_in_is_not_reused(endpoint, pki):
    endpoint.reply = json_reply(200, {"access_token": "a.b.c", "token_type": "bearer"})
    provider = secret_provider(endpoint, pki)
    provider.token(), provider.token()
    assert len(endpoint.requests) == 2


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"client_secret": SECRET, "url": "http://127.0.0.1/token"}, "not an https:// URL"),
        ({}, "give client_secret, or cert and key"),
        ({"cert": "alice.crt"}, "give cert and key together"),
    ],
)
def test_settings_that_cannot_work_are_refused_at_construction(kwargs, problem):
    url = kwargs.pop("url", "https://127.0.0.1/token")
    with pytest.raises(ValueError, match=problem) as caught:
        gateway.ClientCredentialsTokenProvider(url, "svc", **kwargs)
    assert SECRET not in str(caught.value)


def test_a_key_that_is_not_the_certificates_is_refused_at_construction(pki):
    with pytest.raises(ValueError, match="does not match cert"):
        gateway.ClientCredentialsTokenProvider(
            "https://127.0.0.1/token", "alice", cert=pki.path("alice.crt"), key=pki.path("bob.key")
        )


def test_the_repr_names_the_endpoint_and_client_never_the_secret(pki):
    provider = gateway.ClientCredentialsTokenProvider(
        "https://idp.example/token", "svc", client_secret=SECRET, ca=pki.path("ca.crt")
    )
    assert repr(provider) == "ClientCredentialsTokenProvider('https://idp.example/token', client_id='svc')"
