"""A real HTTPS key server on 127.0.0.1 for the tests of keys fetched from an issuer: Python's http.server with
ssl, in threads, serving with the server certificate of scripts/gen_certs.sh; it counts the requests it sees."""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.auth.keys import jwk_kid

Responder = Callable[[BaseHTTPRequestHandler], None]
JWKS_PATH = "/jwks.json"


def send(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None) -> Responder:
    """A response with a Content-Length (unless ``headers`` gives one) and no keep-alive."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        given = headers or {}
        for name, value in given.items():
            handler.send_header(name, value)
        if "Content-Length" not in given:
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


class KeyServer:
    """Serves ``responders[path]`` (404 for any other path) until ``close``; ``hits[path]`` counts requests."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.responders: dict[str, Responder] = {}
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.hits[self.path] += 1
                    responder = server.responders.get(self.path, send(404, b"not found"))
                # The client may give up on a response it refuses: that is the point.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    responder(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, body: bytes, **kwargs: object) -> None:
        """Answer ``path`` with ``body`` (``send``'s keywords) from now on."""
        self.responders[path] = send(body=body, **kwargs)  # type: ignore[arg-type]

    def count(self, path: str) -> int:
        with self._lock:
            return self.hits[path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def new_signing_key() -> tuple[bytes, dict[str, Any]]:
    """A fresh RSA signing key (PEM) and its public JWK, as an issuer rotating its keys publishes it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, {**jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": jwk_kid(key)}
