"""The HTTPS listener of the Open Inference Protocol's REST binding (``http.listen``): aiohttp's server on the
gateway's own event loop, mutual TLS with the gRPC port's rotating credentials, every call through the same call
boundary and pipeline as gRPC.

Why aiohttp's low-level server: it runs on the loop the gRPC server and the boundary already use (no second loop,
no thread hop per call), parses HTTP/1.1 with a well-kept C parser (llhttp) with bounded request lines and headers,
and its handler reaches the connection's ``ssl.SSLObject``, hence the client certificate (docs/rest.md compares the
alternatives). The listener accepts connections itself so that it can cap them, handshakes included, and give each
new connection the newest validated certificate set (rotation without restart); aiohttp then serves each accepted
connection. Every endpoint but the two health ones needs a token; health needs only the certificate, as gRPC
health does, and is not audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.api import rest as codec
from gateway.api.rest import Answer, RestEndpoints, RestRequest
from gateway.auth.reasons import www_authenticate
from gateway.boundary import CallBoundary
from gateway.config import HttpSettings, listen_error
from gateway.context import Answered, Call
from gateway.errors import GatewayError, ResourceExhaustedError, UnimplementedError, sent_message

log = structlog.get_logger(__name__)

JSON = "application/json"
SERVER = "gateway"  # instead of aiohttp's default, which names its version and Python's
_ACCEPT_BACKLOG = 512
_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: the name it is audited and counted under (the path's template, never the caller's names),
    and the handler that answers it."""

    name: str
    handler: str  # the Endpoints method that answers it
    audited: bool = True


_SEGMENT = r"(?P<{}>[^/]+)"
_MODEL = "/v2/models/" + _SEGMENT.format("model") + "(?:/versions/" + _SEGMENT.format("version") + ")?"


def _routes() -> list[tuple[str, re.Pattern[str], Route, Route]]:
    """(HTTP method, path pattern, route without a version, route with one)."""
    table = [
        ("GET", "/v2", "server_metadata"),
        ("GET", "/v2/health/live", "live"),
        ("GET", "/v2/health/ready", "ready"),
        ("POST", "/v2/repository/index", "repository_index"),
        ("GET", _MODEL, "model_metadata"),
        ("GET", _MODEL + "/ready", "model_ready"),
        ("GET", _MODEL + "/config", "model_config"),
        ("POST", _MODEL + "/infer", "infer"),
    ]
    routes = []
    for method, pattern, handler in table:
        template = pattern.replace(_MODEL, "/v2/models/{model}")
        audited = handler not in ("live", "ready")
        plain = Route(f"{method} {template}", handler, audited)
        versioned = Route(f"{method} {template.replace('{model}', '{model}/versions/{version}')}", handler, audited)
        routes.append((method, re.compile(pattern), plain, versioned))
    return routes


ROUTES = _routes()
UNKNOWN_PATH = "HTTP (unknown path)"
METHOD_NAMES = frozenset(
    [UNKNOWN_PATH, *(route.name for _, _, plain, versioned in ROUTES for route in (plain, versioned) if route.audited)]
)


def match(method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
    """The route for a request, the names in its path, and whether the path is known for another method."""
    other = False
    for route_method, pattern, plain, versioned in ROUTES:
        found = pattern.fullmatch(path)
        if found is None:
            continue
        if route_method != method:
            other = True
            continue
        names = {key: value for key, value in found.groupdict().items() if value is not None}
        return (versioned if "version" in names else plain), names, False
    return None, {}, other


class _Server(web.Server):
    """aiohttp's low-level server, telling when each connection it served has ended (for the connection cap)."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.ended: dict[RequestHandler, asyncio.Future[None]] = {}

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.ended[handler] = asyncio.get_running_loop().create_future()

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        ended = self.ended.get(handler)
        if ended is not None and not ended.done():
            ended.set_result(None)


class RestListener:
    """Accepts HTTPS connections on ``http.listen`` (at most ``http.max_connections`` at once, handshakes
    included), each with the newest server certificate set, and serves them with ``handle``."""

    def __init__(
        self,
        settings: HttpSettings,
        *,
        context: Callable[[], ssl.SSLContext],
        handle: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        handshake_timeout_s: float,
        reuse_port: bool,
    ) -> None:
        self._settings = settings
        self._context = context
        self._handshake_timeout_s = handshake_timeout_s
        self._reuse_port = reuse_port
        self._handle = handle
        self._server: _Server | None = None  # made on the loop, by start
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.port: int | None = None
        self.refused_connections = 0  # closed at accept for the cap: for tests and logs

    def bind(self) -> int:
        """Bind the listen address (not accepting yet); its port. A port in use is a ConfigError naming the key."""
        listen = self._settings.listen or ""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        try:
            family = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, int(port)))
            sock.listen(_ACCEPT_BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            raise listen_error(listen, exc.strerror or str(exc), key="http.listen") from None
        self._socket = sock
        self.port = sock.getsockname()[1]
        return self.port

    def start(self) -> None:
        """Start accepting (on the running loop)."""
        settings = self._settings
        self._server = _Server(
            self._handle,
            # Request line and each header field bounded (431/400 from aiohttp's parser past them); a connection
            # must send a full request head within idle_timeout_s of its start or its last answer.
            max_line_size=settings.max_header_bytes,
            max_field_size=settings.max_header_bytes,
            keepalive_timeout=settings.idle_timeout_s,
            access_log=None,
        )
        self._accepting = asyncio.get_running_loop().create_task(self._accept(), name="rest-accept")

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        listening = self._socket
        if listening is None:
            raise RuntimeError("the REST listener is not bound")
        while True:
            connection, _ = await loop.sock_accept(listening)
            if len(self._connections) >= self._settings.max_connections:
                self.refused_connections += 1
                log.debug("rest_connection_refused", reason="http.max_connections")
                connection.close()
                continue
            task = loop.create_task(self._serve(connection))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, connection: socket.socket) -> None:
        """One connection, from its handshake (bounded) to its end; its slot is held all that time."""
        loop = asyncio.get_running_loop()
        server = self._server
        if server is None:
            raise RuntimeError("the REST listener is not started")
        try:
            _, handler = await loop.connect_accepted_socket(
                server,
                connection,
                ssl=self._context(),
                ssl_handshake_timeout=self._handshake_timeout_s,
            )
        except Exception as exc:  # no certificate, a wrong one, plaintext, too slow: the handshake failed
            log.debug("rest_handshake_failed", error=type(exc).__name__)
            connection.close()
            return
        ended = server.ended.get(handler)  # type: ignore[call-overload]
        if ended is not None:
            try:
                await ended
            finally:
                server.ended.pop(handler, None)  # type: ignore[call-overload]

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting, then close the connections (an answer in progress gets ``timeout_s`` to finish)."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._socket is not None:
            self._socket.close()
        if self._server is not None:
            await self._server.shutdown(timeout_s)
        for task in list(self._connections):
            task.cancel()


# HTTP status per gRPC status code name (the gateway's errors carry the gRPC name): the same refusal, the same
# record, whichever transport it came by.
_STATUS = {
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "INVALID_ARGUMENT": 400,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "UNIMPLEMENTED": 404,
    "INTERNAL": 500,
}
# Finer statuses for some reasons (the reason is the gateway's own text, never the caller's).
_STATUS_BY_REASON = {
    "message too large": 413,  # the body, over limits.max_message_bytes
    "response too large": 500,  # the answer would be over it: no fault of the request's syntax, nor a rate
    "request body not received in time": 408,
    "method not allowed": 405,
}


def http_status(error: GatewayError) -> int:
    """The HTTP status that answers ``error``."""
    return _STATUS_BY_REASON.get(error.reason, _STATUS.get(error.code, 500))


def refusal(error: GatewayError, *, request_id: str, retry_safe: bool) -> web.Response:
    """The answer to a refused call: ``{"error": message}`` (what the caller may know, its request id, never an
    internal detail: the gRPC status message), its status, and the headers a client acts on: ``WWW-Authenticate``
    for 401 (RFC 6750 section 3, the same challenge gRPC sends in its trailer), ``Retry-After`` for 429 and for 503
    when the call is safe to retry."""
    status = http_status(error)
    headers = {"x-request-id": request_id, "Server": SERVER}
    if status == 401:
        # A refused certificate has no token error to tell; RFC 7235 still wants a challenge with every 401.
        headers["WWW-Authenticate"] = www_authenticate(error.reason) or 'Bearer realm="gateway"'
    elif status == 429 or (status == 503 and retry_safe):
        headers["Retry-After"] = "1"
    if status == 503 and retry_safe:
        headers["x-retry-safe"] = "true"
    body = codec.dumps({"error": sent_message(error, request_id)})
    return web.Response(status=status, text=body, content_type=JSON, headers=headers)


class RestService:
    """Answers each request: health at once (mutual TLS alone, not audited, as gRPC health), every other endpoint
    through the call boundary, which authenticates, admits, reads the body (bounded), runs the endpoint, records."""

    def __init__(
        self,
        *,
        boundary: CallBoundary,
        endpoints: RestEndpoints,
        ready: Callable[[], bool],
        max_body_bytes: int,
    ) -> None:
        self._boundary = boundary
        self._endpoints = endpoints
        self._ready = ready
        self._max_body_bytes = max_body_bytes

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """One HTTP request, start to answer."""
        route, names, other_method = match(request.method, request.path)
        if route is not None and not route.audited:
            state = route.handler == "live" or self._ready()
            return web.Response(
                status=200 if state else 503,
                text=codec.dumps({route.handler: state}),
                content_type=JSON,
                headers={"Server": SERVER},
            )
        endpoint: Callable[..., Awaitable[Answered]]
        if route is None:
            name, endpoint = UNKNOWN_PATH, functools.partial(_no_such_endpoint, other_method)
        else:
            name, endpoint = route.name, getattr(self._endpoints, route.handler)
        header_length = request.headers.get("Inference-Header-Content-Length")

        async def answer(call: Call, body: bytes) -> Answered:
            return await endpoint(call, names, RestRequest(body, header_length))

        served = await self._boundary.serve_request(
            name,
            peer=_peer(request),
            peer_pem=_peer_pem(request),
            metadata=[(key.lower(), value) for key, value in request.headers.items()],
            read=functools.partial(self._read_body, request),
            answer=answer,
            size=_answer_size,
        )
        request_id = served.call.request_id
        if served.error is not None:
            response = refusal(served.error, request_id=request_id, retry_safe=served.retry_safe)
            if not served.body_read and request.can_read_body:  # the rest would be read as the next request
                response.force_close()
            return response
        reply: Answer = served.reply
        headers = {"x-request-id": request_id, "Server": SERVER}
        if reply.header_length is not None:
            headers["Inference-Header-Content-Length"] = str(reply.header_length)
        return web.Response(body=reply.body, content_type=reply.content_type, headers=headers)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        """The whole body, refused past ``limits.max_message_bytes`` (at once when Content-Length says so)."""
        limit = self._max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _too_large(declared, limit)
        if request.headers.get("Expect", "").lower() == "100-continue":
            # RFC 9110 10.1.1: the client waits for this before its body (curl does past 1 MiB); sent only to an
            # admitted caller, whose body is within the limit. aiohttp's low-level server leaves it to handlers.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)


def _too_large(size: int, limit: int) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"request body of {size} bytes is over the limit of {limit} (limits.max_message_bytes)",
        reason="message too large",
    )


async def _no_such_endpoint(other_method: bool, call: Call, names: Mapping[str, str], request: RestRequest) -> Answered:
    """Any other path (or another method on a known one): refused after authentication, as gRPC's unknown methods."""
    if other_method:
        raise UnimplementedError("method not allowed on this path", reason="method not allowed")
    raise UnimplementedError("no such endpoint", reason="unknown path")


def _answer_size(reply: Answer) -> int:
    return len(reply.body)


def _peer(request: web.BaseRequest) -> str:
    """The client's address as grpc writes it (``ipv4:HOST:PORT``), so records of both transports read alike."""
    address = request.transport.get_extra_info("peername") if request.transport else None
    if not address:
        return "unknown"
    host, port = address[0], address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _peer_pem(request: web.BaseRequest) -> bytes | None:
    """The client certificate the handshake verified, as PEM (what the authenticator inspects, cached by it)."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii") if der else None
