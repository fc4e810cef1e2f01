"""JWT verification keys from the issuer over HTTPS (``auth.jwks_url``, or ``auth.discovery``: OpenID Connect
Discovery), kept in force and refreshed in a daemon thread as KeyStore does for a file. The fetch policy is strict
(docs/tokens.md): https only, the key server's certificate verified, no redirect followed, bounded time and size,
and the key set checked exactly as the file is (``keys.parse_jwks``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path

import httpx
import structlog

from gateway import metrics
from gateway.auth import DEFAULT_ALGORITHMS, https_url_problem
from gateway.auth.keys import MAX_JWKS_BYTES, KeySet, TokenConfigError, parse_jwks
from gateway.document import loads_json

__all__ = ["FETCH_TIMEOUT_S", "FetchError", "KeyFetcher", "RemoteKeyStore", "discover_jwks_uri"]

log = structlog.get_logger(__name__)

FETCH_TIMEOUT_S = 5.0
MAX_DOCUMENT_BYTES = MAX_JWKS_BYTES
_DISCOVERY_SUFFIX = "/.well-known/openid-configuration"


# FetchError.kind: the reason label of gateway_jwks_fetch_failures_total, each at 0 from the start.
FETCH_FAILURE_KINDS = ("connect", "tls", "timeout", "redirect", "status", "too_large", "invalid", "url")


class FetchError(Exception):
    """A fetch that gave no usable document: ``kind`` is a fixed label (the metric's), the message says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _transport_kind(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return "tls"
        cause = cause.__cause__ or cause.__context__
    return "connect"


class KeyFetcher:
    """GETs small JSON documents over verified HTTPS: no redirects, no proxies from the environment, bounded in
    time (``timeout_s`` per step and in all) and in size (counted as the body arrives, whatever its headers say)."""

    def __init__(self, *, ca: Path | None, timeout_s: float = FETCH_TIMEOUT_S) -> None:
        # The system trust store unless auth.jwks_ca names a bundle; hostname checking stays on either way.
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        self._timeout_s = timeout_s
        self._client = httpx.Client(
            verify=context,
            timeout=timeout_s,
            follow_redirects=False,  # a redirect could lead to another host or to http: none is followed
            trust_env=False,
            # identity: a compressed body could expand far past the size bound before it is counted
            headers={"accept": "application/json", "accept-encoding": "identity"},
        )

    def get(self, url: str) -> bytes:
        """The body of a 200 response to GET ``url``; FetchError otherwise."""
        problem = https_url_problem(url)
        if problem is not None:
            raise FetchError("url", f"{url}: {problem}")
        deadline = time.monotonic() + self._timeout_s
        try:
            with self._client.stream("GET", url) as response:
                if response.is_redirect or 300 <= response.status_code < 400:
                    raise FetchError("redirect", f"{url}: HTTP {response.status_code}: redirects are not followed")
                if response.status_code != 200:
                    raise FetchError("status", f"{url}: HTTP {response.status_code}")
                return self._body(url, response, deadline)
        except httpx.TransportError as exc:
            kind = _transport_kind(exc)
            raise FetchError(kind, f"{url}: {kind} error: {exc or type(exc).__name__}") from None

    @staticmethod
    def _body(url: str, response: httpx.Response, deadline: float) -> bytes:
        body = bytearray()
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > MAX_DOCUMENT_BYTES:
                raise FetchError("too_large", f"{url}: response larger than {MAX_DOCUMENT_BYTES} bytes")
            if time.monotonic() > deadline:  # a server dripping bytes stays within each read's timeout
                raise FetchError("timeout", f"{url}: response not complete in time")
        return bytes(body)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


def discover_jwks_uri(issuer: str, fetcher: KeyFetcher) -> str:
    """The ``jwks_uri`` of the issuer's OpenID Provider metadata (OpenID Connect Discovery 1.0 sections 4 and 4.3:
    the document must name exactly this issuer, or it is not this issuer's)."""
    url = issuer.rstrip("/") + _DISCOVERY_SUFFIX
    try:
        document = loads_json(fetcher.get(url))
    except ValueError as exc:
        raise FetchError("invalid", f"{url}: not a discovery document: {exc}") from None
    if not isinstance(document, dict):
        raise FetchError("invalid", f"{url}: not a discovery document: not a JSON object")
    if document.get("issuer") != issuer:
        raise FetchError("invalid", f"{url}: its issuer is not auth.issuer {issuer!r} (OpenID Connect Discovery 4.3)")
    jwks_uri = document.get("jwks_uri")
    problem = https_url_problem(jwks_uri) if isinstance(jwks_uri, str) else "missing"
    if problem is not None:
        raise FetchError("invalid", f"{url}: jwks_uri {problem}")
    return str(jwks_uri)


class RemoteKeyStore:
    """The issuer's JWKS in force. Fetched at start (a failure stops the start: fail closed), then every
    ``refresh_interval_s``, on ``reload_now`` (SIGHUP), and when a token names an unknown kid, at most once per
    ``min_refresh_interval_s`` however many such tokens come. A failed fetch or a bad document keeps the last good
    key set, logged as ``jwks_fetch_failed`` and counted in ``gateway_jwks_fetch_failures``."""

    def __init__(
        self,
        *,
        url: str | None,
        issuer: str,
        ca: Path | None,
        refresh_interval_s: float,
        min_refresh_interval_s: float,
        allowed_algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        timeout_s: float = FETCH_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetcher = KeyFetcher(ca=ca, timeout_s=timeout_s)
        self._discovery_issuer = issuer if url is None else None
        self._allowed = tuple(allowed_algorithms)
        self._refresh_interval_s = refresh_interval_s
        self._min_refresh_interval_s = min_refresh_interval_s
        self._clock = clock
        self._fetching = threading.Lock()  # one fetch at a time: the refresher thread, SIGHUP
        self._state = threading.Lock()  # the pending unknown-kid refresh and when the last one was asked for
        self._pending: Future[None] | None = None
        self._last_kid_refresh: float | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._digest = b""
        setting = "auth.discovery" if url is None else "auth.jwks_url"
        for kind in FETCH_FAILURE_KINDS:
            metrics.JWKS_FETCH_FAILURES.labels(reason=kind)
        metrics.RELOAD_FAILURES.labels(store="jwks")
        try:
            self.url = url if url is not None else discover_jwks_uri(issuer, self._fetcher)
            self._current = self._load(self._fetcher.get(self.url), version=0)
        except (FetchError, TokenConfigError) as exc:
            self._fetcher.close()
            raise TokenConfigError(f"{setting}: cannot fetch the key set: {exc}") from None
        self._succeeded()
        metrics.LAST_RELOAD.labels(store="jwks").set_to_current_time()

    @property
    def current(self) -> KeySet:
        """The key set in force (read it once per use: a refresh swaps the whole set)."""
        return self._current

    @property
    def version(self) -> int:
        """Grows by one whenever a fetch brings a different key set."""
        return self._current.version

    def start(self) -> None:
        """Refresh in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jwks-refresh", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop refreshing, release anyone waiting on a refresh, close the connections."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * FETCH_TIMEOUT_S)
        self._resolve(self._take_pending())
        self._fetcher.close()

    def reload_now(self) -> bool:
        """Fetch now (and, with discovery, read the provider's metadata again first); whether the keys changed."""
        if self._discovery_issuer is not None:
            try:
                self.url = discover_jwks_uri(self._discovery_issuer, self._fetcher)
            except FetchError as exc:
                self._failed(exc.kind, str(exc))
                return False
        return self._refresh()

    def refresh_unknown_kid(self) -> Future[None] | None:
        """A refresh for a token whose kid is not in the set: the one in flight if any, else a new one unless one
        was asked for less than ``min_refresh_interval_s`` ago (None then). Done when the fetch has ended."""
        with self._state:
            if self._pending is not None:
                return self._pending
            now = self._clock()
            if self._last_kid_refresh is not None and now - self._last_kid_refresh < self._min_refresh_interval_s:
                return None
            self._last_kid_refresh = now
            pending = self._pending = Future()
        self._wake.set()
        return pending

    def _run(self) -> None:
        while True:
            woken = self._wake.wait(self._refresh_interval_s)
            self._wake.clear()
            if self._stopping:
                return
            pending = self._take_pending()
            if woken and pending is None:
                continue  # a wake-up whose request an earlier fetch already served
            try:
                self._refresh()
            except Exception:
                log.exception("jwks_refresh_crashed", url=self.url)
            finally:
                self._resolve(pending)

    def _take_pending(self) -> Future[None] | None:
        with self._state:
            pending, self._pending = self._pending, None
        return pending

    @staticmethod
    def _resolve(pending: Future[None] | None) -> None:
        if pending is not None and not pending.done():
            pending.set_result(None)

    def _refresh(self) -> bool:
        with self._fetching:
            try:
                raw = self._fetcher.get(self.url)
                if hashlib.sha256(raw).digest() == self._digest:
                    self._succeeded()
                    return False
                new = self._load(raw, version=self._current.version + 1)
            except FetchError as exc:
                self._failed(exc.kind, str(exc))
                return False
            except TokenConfigError as exc:
                self._failed("invalid", str(exc))
                return False
            old, self._current = self._current, new  # one attribute store: readers see old or new, never a mix
        self._succeeded()
        metrics.LAST_RELOAD.labels(store="jwks").set_to_current_time()
        log.info(
            "jwks_reloaded",
            url=self.url,
            kids=new.kids,
            added=sorted(new.keys.keys() - old.keys.keys()),
            removed=sorted(old.keys.keys() - new.keys.keys()),
            ignored=list(new.ignored),  # keys not meant for signatures (RFC 7517 use/key_ops): never used
            version=new.version,
        )
        return True

    def _load(self, raw: bytes, *, version: int) -> KeySet:
        new = dataclasses.replace(parse_jwks(raw, source=self.url, allowed_algorithms=self._allowed), version=version)
        self._digest = hashlib.sha256(raw).digest()
        return new

    @staticmethod
    def _succeeded() -> None:
        metrics.jwks_last_success().set_to_current_time()

    def _failed(self, kind: str, reason: str) -> None:
        # The reason names the URL and what was wrong (a kid at most): never key material.
        metrics.JWKS_FETCH_FAILURES.labels(reason=kind).inc()
        metrics.RELOAD_FAILURES.labels(store="jwks").inc()
        log.error("jwks_fetch_failed", url=self.url, reason=reason)
