"""An upstream that answers every chat completion with exactly the bytes a test sets: any
status, any headers, any body (an error document, or server-sent events that break every
rule). For property tests over what a provider can send; the well-behaved, scriptable
provider is :mod:`tests.support.openai_upstream`."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web


@dataclass
class RawResponse:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"data: [DONE]\n\n"


class RawUpstream:
    """``async with RawUpstream() as up``; set ``up.response`` before each request."""

    def __init__(self) -> None:
        self.response = RawResponse()
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        scripted = self.response
        content_type = "text/event-stream" if scripted.status == 200 else "application/json"
        headers = {"Content-Type": content_type, **scripted.headers}
        return web.Response(status=scripted.status, headers=headers, body=scripted.body)

    async def __aenter__(self) -> RawUpstream:
        app = web.Application()
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
