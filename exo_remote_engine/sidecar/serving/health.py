"""The standard ``grpc.health.v1.Health`` service: "" is liveness, the service name readiness.

Served from our own compiled copy of health.proto (:mod:`~exo_remote_engine.contract.health_stubs`
says why). A draining sidecar turns both NOT_SERVING before it stops accepting calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from exo_remote_engine.contract.health_stubs import health_pb2, health_pb2_grpc

SERVICE_NAME = "exo.remote.v1.RemoteInferenceService"  # the readiness name


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: "" is liveness, the service name is readiness."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Event()

    def set(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        self._status[service] = status.SERVING if serving else status.NOT_SERVING
        self._changed.set()
        self._changed = asyncio.Event()

    def set_all(self, serving: bool) -> None:
        """Liveness and readiness together."""
        self.set("", serving)
        self.set(SERVICE_NAME, serving)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self._status:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status[request.service])  # type: ignore[arg-type]

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        while True:
            changed = self._changed
            status = self._status.get(request.service, unknown)
            yield health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]
            await changed.wait()
