"""Access tokens from an identity provider's token endpoint: the OAuth 2.0 client-credentials grant (RFC 6749 4.4),
the client authenticated by a secret (HTTP Basic, RFC 6749 2.3.1) or by its own TLS certificate (RFC 8705 2,
tls_client_auth), in which case the provider binds the token to that certificate (RFC 8705 3)."""

from __future__ import annotations

import json
import os
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlsplit

import httpx

from gateway.client import PemSource, TokenProvider, ca_material, identity_material
from gateway.errors import AuthenticationError

MAX_RESPONSE_BYTES = 64 * 1024  # a token response is a few KiB; anything far larger is not one
MAX_ERROR_CODE_CHARS = 64
MAX_ERROR_DESCRIPTION_CHARS = 200


class ClientCredentialsTokenProvider(TokenProvider):
    """Access tokens for ``client_id`` from ``token_url``, cached and fetched again ``refresh_before_s`` before
    they expire (by the response's ``expires_in``; at most half their lifetime early). Concurrent callers share
    one request. Failures raise AuthenticationError, whose ``reason`` is the provider's OAuth ``error`` code.

    Without ``client_secret``, ``cert`` and ``key`` authenticate the client (RFC 8705 tls_client_auth): give the
    Client's own, and the provider binds the token to the certificate the gRPC channel presents. ``ca`` verifies
    the token endpoint (default: the system's trust store). ``resource`` (RFC 8707) names the API the token is
    for: the gateway's ``auth.audience``. Redirects are refused, and proxies are not read from the environment.
    """

    def __init__(
        self,
        token_url: str,
        client_id: str,
        *,
        client_secret: str | None = None,
        cert: PemSource | None = None,
        key: PemSource | None = None,
        ca: PemSource | None = None,
        scope: str | None = None,
        resource: str | None = None,
        refresh_before_s: float = 30.0,
        timeout_s: float = 10.0,
    ) -> None:
        if urlsplit(token_url).scheme != "https":
            raise ValueError(f"token_url {token_url!r}: not an https:// URL (the request carries credentials)")
        if (cert is None) != (key is None):
            raise ValueError("give cert and key together")
        if client_secret is None and cert is None:
            raise ValueError("give client_secret, or cert and key (RFC 8705 tls_client_auth)")
        self.token_url = token_url
        self.client_id = client_id
        self._form = _form(client_id, with_client_id=client_secret is None, scope=scope, resource=resource)
        # RFC 6749 2.3.1: id and secret are form-encoded before they are joined for Basic authentication.
        self._auth = None if client_secret is None else (quote_plus(client_id), quote_plus(client_secret))
        self._timeout_s = timeout_s
        self._refresh_before_s = refresh_before_s
        self._http = httpx.Client(
            verify=_ssl_context(ca=ca, cert=cert, key=key),
            timeout=timeout_s,
            follow_redirects=False,
            trust_env=False,  # no proxies or .netrc credentials picked up from the environment
        )
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def token(self) -> str:
        """A token that is not about to expire, fetched when the cached one is."""
        with self._lock:
            if self._token is None or time.monotonic() >= self._refresh_at:
                requested_at = time.monotonic()
                self._token, lifetime = self._fetch()
                # No expires_in: the lifetime is unknown, so the token is not reused.
                early = min(self._refresh_before_s, lifetime / 2) if lifetime else 0.0
                self._refresh_at = requested_at + (lifetime or 0.0) - early
            return self._token

    def close(self) -> None:
        """Close the HTTP connections to the token endpoint."""
        self._http.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.token_url!r}, client_id={self.client_id!r})"

    def _fetch(self) -> tuple[str, float | None]:
        """One token request: the access token and its lifetime in seconds (None when not given)."""
        try:
            with self._http.stream(
                "POST",
                self.token_url,
                data=self._form,
                auth=self._auth,
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
            ) as response:
                body = self._body(response)
        except httpx.TimeoutException:
            raise self._error(f"no answer within {self._timeout_s:g} s", reason="token_endpoint_timeout") from None
        except httpx.TransportError as exc:
            detail = _printable(str(exc) or type(exc).__name__, MAX_ERROR_DESCRIPTION_CHARS)
            raise self._error(f"unreachable: {detail}", reason="token_endpoint_unreachable") from None
        if response.is_redirect:
            raise self._error(f"redirected (HTTP {response.status_code}): refused", reason="token_endpoint_redirect")
        document = _json_object(body)
        if response.status_code != 200:
            raise self._refusal(response.status_code, document)
        if document is None:
            raise self._error("the response is not a JSON object", reason="invalid_token_response")
        return self._access_token(document)

    def _body(self, response: httpx.Response) -> bytes:
        """The response body, refused past MAX_RESPONSE_BYTES or past the timeout in all (a server that trickles
        bytes never trips httpx's per-read timeout)."""
        deadline = time.monotonic() + self._timeout_s
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                raise self._error(f"response over {MAX_RESPONSE_BYTES} bytes", reason="invalid_token_response")
            if time.monotonic() > deadline:
                raise httpx.ReadTimeout("the response took too long")
        return bytes(body)

    def _refusal(self, status: int, document: dict[str, Any] | None) -> AuthenticationError:
        """RFC 6749 5.2: the provider's ``error`` code (and description), else the HTTP status alone."""
        code = None if document is None else document.get("error")
        if not isinstance(code, str) or not code:
            return self._error(f"HTTP {status} without an OAuth error", reason=f"http_{status}")
        code = _printable(code, MAX_ERROR_CODE_CHARS)
        description = document.get("error_description") if document else None
        detail = f": {_printable(description, MAX_ERROR_DESCRIPTION_CHARS)}" if isinstance(description, str) else ""
        return self._error(f"refused: {code}{detail}", reason=code)

    def _access_token(self, document: dict[str, Any]) -> tuple[str, float | None]:
        """RFC 6749 5.1: a non-empty ``access_token`` of ``token_type`` Bearer, and ``expires_in`` if given."""
        token, token_type, lifetime = (document.get(k) for k in ("access_token", "token_type", "expires_in"))
        if not isinstance(token, str) or not token.strip():
            raise self._error("no access_token in the response", reason="invalid_token_response")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise self._error("token_type is not Bearer", reason="invalid_token_response")
        if lifetime is None:
            return token.strip(), None
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            raise self._error("expires_in is not a positive number", reason="invalid_token_response")
        return token.strip(), float(lifetime)

    def _error(self, problem: str, *, reason: str) -> AuthenticationError:
        return AuthenticationError(
            f"token endpoint {self.token_url} (client {self.client_id}): {problem}", reason=reason
        )


def _form(client_id: str, *, with_client_id: bool, scope: str | None, resource: str | None) -> dict[str, str]:
    """The token request's body; client_id in it only where no Basic authentication names the client."""
    form = {"grant_type": "client_credentials"}
    if with_client_id:
        form["client_id"] = client_id
    if scope:
        form["scope"] = scope
    if resource:
        form["resource"] = resource
    return form


def _ssl_context(*, ca: PemSource | None, cert: PemSource | None, key: PemSource | None) -> ssl.SSLContext:
    """Verification of the token endpoint against ``ca`` (else the system's trust store), presenting ``cert``."""
    if ca is None:
        context = ssl.create_default_context()
    else:
        context = ssl.create_default_context(cadata=ca_material(ca).decode())
    if cert is not None and key is not None:
        cert_pem, key_pem = identity_material(cert=cert, key=key)
        # ssl loads a certificate and its key from a file only: a private one in a private folder, gone at once.
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "identity.pem"
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
                file.write(cert_pem + b"\n" + key_pem)
            context.load_cert_chain(path)
    return context


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        return None
    return document if isinstance(document, dict) else None


def _printable(text: str, limit: int) -> str:
    """Provider text as quoted in an error: printable ASCII, bounded."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")
