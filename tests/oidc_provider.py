"""node-oidc-provider (the npm package ``oidc-provider``, OpenID-certified) on loopback, for the identity-provider
tests: the client-credentials grant over HTTPS with the session PKI's server certificate, RFC 8705 mutual-TLS
client authentication and certificate-bound RFC 9068 JWT access tokens for one resource (the gateway's audience).

Clients: ``alice`` and ``bob`` authenticate with their gen_certs.sh certificates (tls_client_auth, matched on the
SAN URI spiffe://gateway.local/client/NAME), ``service`` with a client secret. Tokens carry ``sub`` = the client
id, ``groups`` and Keycloak's ``realm_access.roles`` (GROUPS). Signing keys are RSA keys made here, so a test can
rotate them: ``rotate_key()`` restarts the provider on the same port signing with a new key and publishing both,
``retire_old_keys()`` restarts it publishing the new one alone.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ROOT = Path(__file__).resolve().parent.parent
OIDC_DIR = ROOT / "tests/interop/oidc"
RESOURCE = "https://gateway.local/inference"  # RFC 8707 wants an absolute URI: the test gateway's auth.audience
SCOPES = ("predict", "stream", "metadata", "list")
SECRET_CLIENT = "service"
GROUPS = {"alice": ["ml"], "bob": ["ml"], SECRET_CLIENT: ["batch"]}
START_TIMEOUT_S = 30.0


def skip_without_node() -> None:
    """Skip the calling test where node is absent; fail it where node is here but the provider is not installed."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the OpenID provider (node-oidc-provider) cannot run")
    if not (OIDC_DIR / "node_modules/oidc-provider").is_dir():  # node is here: the setup is broken, not absent
        pytest.fail("tests/interop/oidc/node_modules is missing: run `make setup` (npm ci from the lock file)")


def new_signing_key(kid: str) -> dict[str, Any]:
    """A private RS256 JWK, as providers' own key tools make them: without pyjwt's ``key_ops: ["sign"]``, which the
    provider would publish with the public key, and which the gateway refuses there (a key set's keys verify)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(key))
    jwk.pop("key_ops", None)
    return {**jwk, "kid": kid, "alg": "RS256", "use": "sig"}


def _tls_client(name: str) -> dict[str, Any]:
    return {
        "client_id": name,
        "token_endpoint_auth_method": "tls_client_auth",
        "tls_client_auth_san_uri": f"spiffe://gateway.local/client/{name}",
        "tls_client_certificate_bound_access_tokens": True,
        **_CLIENT_CREDENTIALS_ONLY,
    }


_CLIENT_CREDENTIALS_ONLY = {
    "grant_types": ["client_credentials"],
    "response_types": [],
    "redirect_uris": [],
    "scope": " ".join(SCOPES),
}


@dataclass
class OidcProvider:
    """One provider process; ``start()`` binds port 0 the first time, then the same port on every restart.
    Clients: "alice" and "bob" (tls_client_auth), SECRET_CLIENT with ``client_secret``."""

    pki: Any  # tests.conftest.Pki
    dir: Path
    ttl_s: int = 300
    client_secret: str = field(default_factory=lambda: os.urandom(16).hex(), repr=False)
    port: int = 0
    keys: list[dict[str, Any]] = field(default_factory=lambda: [new_signing_key("key-1")], repr=False)
    _process: subprocess.Popen[str] | None = field(default=None, repr=False)

    @property
    def issuer(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def resource(self) -> str:
        """The resource (RFC 8707) tokens are for: their ``aud``, so the gateway's ``auth.audience``."""
        return RESOURCE

    @property
    def ca(self) -> Path:
        """The CA that signed the provider's certificate (and the clients')."""
        return self.pki.path("ca.crt")

    @property
    def events_path(self) -> Path:
        return self.dir / "events.jsonl"

    def start(self) -> OidcProvider:
        """Start the provider; returns once it listens."""
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = self.dir / "settings.json"
        _write_private(self.dir / "jwks.json", {"keys": self.keys})
        _write_private(settings, self._settings())
        # Its warnings (it wants Node 22; an in-memory store) go to a file, shown when it fails to start.
        with (self.dir / "stderr.log").open("a") as stderr:
            self._process = subprocess.Popen(
                ["node", str(OIDC_DIR / "provider.js"), str(settings)], stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        self.port = self._listening()["port"]
        return self

    def stop(self) -> None:
        """Stop the provider (the port stays this provider's for the next ``start()``)."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def rotate_key(self) -> str:
        """Sign with a new key from now on, publishing the old ones too; returns the new kid."""
        kid = f"key-{len(self.keys) + 1}"
        self.keys = [new_signing_key(kid), *self.keys]
        self.restart()
        return kid

    def retire_old_keys(self) -> None:
        """Publish only the key that signs."""
        self.keys = self.keys[:1]
        self.restart()

    def token_requests(self, client_id: str | None = None) -> list[dict[str, Any]]:
        """The token requests the provider answered (``event`` grant.success or grant.error), oldest first.
        Each is written before the response is sent, so a request that returned is already here."""
        if not self.events_path.exists():
            return []
        events = [json.loads(line) for line in self.events_path.read_text().splitlines()]
        return [e for e in events if client_id is None or e.get("client_id") == client_id]

    def _settings(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "cert": str(self.pki.path("server.crt")),
            "key": str(self.pki.path("server.key")),
            "ca": str(self.ca),
            "jwks": str(self.dir / "jwks.json"),
            "events": str(self.events_path),
            "resource": RESOURCE,
            "scopes": list(SCOPES),
            "ttl_s": self.ttl_s,
            "groups": GROUPS,
            "clients": [
                _tls_client("alice"),
                _tls_client("bob"),
                {
                    "client_id": SECRET_CLIENT,
                    "client_secret": self.client_secret,
                    "token_endpoint_auth_method": "client_secret_basic",
                    **_CLIENT_CREDENTIALS_ONLY,
                },
            ],
        }

    def _listening(self) -> dict[str, Any]:
        """The provider's first stdout line, {"event": "listening", ...}: it is ready."""
        assert self._process is not None and self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], START_TIMEOUT_S)
        line = self._process.stdout.readline() if ready else ""
        if not line:
            self.stop()
            log = (self.dir / "stderr.log").read_text()[-2000:]
            raise RuntimeError(f"the OpenID provider did not start; its stderr ends with:\n{log}")
        return dict(json.loads(line))


def _write_private(path: Path, document: dict[str, Any]) -> None:
    """Private keys and the client secret: readable by this user only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(document, file)
