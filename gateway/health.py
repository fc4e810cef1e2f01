"""``grpc.health.v1.Health`` for the overall status only, computed from the gateway's one readiness definition at
every ``Check``, so that a probe sees the audit sink go down (or the last model go away) without anyone pushing
a status: the same answer on the mutual-TLS port and on the plaintext probe port (``health.listen``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
_WATCH_INTERVAL_S = 1.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Answers for service ``""`` only: a per-service or per-model status would tell anyone who may ask (no token
    is needed) which models exist, so every named service is unknown."""

    def __init__(self, ready: Callable[[], bool], *, max_watches: int) -> None:
        """``max_watches``: Watch streams open at once (each is held for as long as the caller likes); past it,
        RESOURCE_EXHAUSTED; 0: Watch is not served (UNIMPLEMENTED), as on the probe port, open to anyone."""
        self._ready = ready
        self._max_watches = max_watches
        self._watches = 0  # on the event loop only: no lock

    def _status(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        if service:
            return _UNKNOWN
        return _SERVING if self._ready() else _NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        """The overall status now; NOT_FOUND for a named service, as grpc's own servicer answers."""
        status = self._status(request.service)
        if status == _UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (polled: readiness is computed, not pushed)."""
        if self._max_watches == 0:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not served here; use Check")
        if self._watches >= self._max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many health watches")
        self._watches += 1
        try:
            last = None
            while True:
                status = self._status(request.service)
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                await asyncio.sleep(_WATCH_INTERVAL_S)
        finally:
            self._watches -= 1
