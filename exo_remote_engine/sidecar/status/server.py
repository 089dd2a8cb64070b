"""The ``--metrics-listen`` port: ``/`` the status page, ``/status.json`` its data,
``/metrics`` the Prometheus exposition (its scrape-time gauges refreshed first). An
aiohttp server on the sidecar's own event loop, where the objects it reads live; it
replaces prometheus_client's thread server, which could neither read them nor check who
asks.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

try:
    import prometheus_client as prom
except ImportError:  # pragma: no cover - the sidecar extra ships it
    prom = None  # type: ignore[assignment]

from exo_remote_engine.sidecar.status.access import StatusAccess
from exo_remote_engine.sidecar.status.gauges import StatusGauges
from exo_remote_engine.sidecar.status.page import render
from exo_remote_engine.sidecar.status.snapshot import StatusSources, collect
from exo_remote_engine.sidecar.telemetry.safe_logging import safe_logger

log = safe_logger("exo_remote_engine.sidecar")

_ROUTES = ("/", "/status.json", "/metrics")
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
# The page runs no script and loads nothing: say so to the browser too.
_PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'none'; frame-ancestors 'none'"


class StatusServer:
    def __init__(self, sources: StatusSources, access: StatusAccess) -> None:
        self.sources = sources
        self.access = access
        self.gauges = StatusGauges(sources.metrics.registry)
        self._lock = asyncio.Lock()  # one snapshot at a time: a burst of reloads costs one read each
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port."""
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page)
        app.router.add_get("/status.json", self._json)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.access.ssl_context(), reuse_port=False)
        await site.start()
        server: Any = site._server  # aiohttp exposes the bound port only here
        return int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.sources.history is not None:
            self.sources.history.close()
            self.sources.history = None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path not in _ROUTES:
            return web.Response(status=404, text="not found: try / , /status.json or /metrics\n")
        peer = request.transport.get_extra_info("peercert") if request.transport is not None else None
        status = self.access.decide(request.headers.get("Authorization", ""), peer)
        if status == 401:
            return web.Response(
                status=401,
                text="the status page needs an admin node's bearer token or client certificate\n",
                headers={"WWW-Authenticate": 'Bearer realm="exo-remote"'},
            )
        if status == 403:
            return web.Response(status=403, text="only a node with role: admin may read the status page\n")
        response: web.StreamResponse = await handler(request)
        response.headers.update(_HEADERS)
        return response

    async def _snapshot(self, with_history: bool) -> Any:
        async with self._lock:
            snapshot = await collect(self.sources, with_history=with_history)
            self.gauges.update(snapshot)
            return snapshot

    async def _page(self, request: web.Request) -> web.Response:
        snapshot = await self._snapshot(with_history=True)
        return web.Response(
            text=render(snapshot), content_type="text/html", headers={"Content-Security-Policy": _PAGE_CSP}
        )

    async def _json(self, request: web.Request) -> web.Response:
        snapshot = await self._snapshot(with_history=True)
        return web.Response(text=json.dumps(snapshot.to_json(), indent=1), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        if prom is None:
            hint = "prometheus_client is not installed (pip install 'exo-remote-engine[sidecar]')\n"
            return web.Response(status=503, text=hint)
        await self._snapshot(with_history=False)
        body = prom.generate_latest(self.sources.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": prom.CONTENT_TYPE_LATEST})
