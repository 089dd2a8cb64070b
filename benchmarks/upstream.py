"""The benchmark suite's upstream: an OpenAI-compatible chat-completions SSE server that is
cheap per chunk, so on a 2-core box it never becomes the thing being measured.

``python -m benchmarks.upstream [--port 0]`` prints its URL (``http://127.0.0.1:PORT``) on
the first stdout line and serves until SIGINT/SIGTERM. It is written on a raw asyncio
Protocol (HTTP/1.1, keep-alive, Content-Length request bodies, chunked responses) rather
than aiohttp.web, because a framework's per-chunk cost would be charged to every row.

The workload is chosen per request by the last user message, e.g. ``bench n=500 rate=50``:

* ``rate > 0``: ``n`` chunks, chunk ``i`` written at ``t0 + i/rate`` (absolute schedule, so
  lateness never accumulates). Each chunk's content is the send time ``time.monotonic_ns()``
  as ``<hex>``; CLOCK_MONOTONIC is shared by all processes on Linux, so a client computes
  per-token delivery latency as receive time - stamp, even when a relay merges chunks.
* ``rate = 0``: ``n`` chunks as fast as the connection takes them (flow controlled), short
  numbered prose words (distinct, so LiteLLM's repeated-chunk guard never trips) so chars/s
  means something; the first chunk also carries a stamp.

Then a ``finish_reason: "stop"`` chunk, a usage chunk when ``stream_options.include_usage``
asks, and ``data: [DONE]``. A disconnect stops the stream at once. ``GET /v1/models`` lists
``bench``; ``GET /stats`` (``?reset=1`` to start a new window) reports this process's CPU
and how late rate-mode chunks were written against their schedule, which is how the suite
shows that the upstream was not the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import signal
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

PROSE = (
    "the quick brown fox jumps over the lazy dog while the cluster keeps streaming tokens "
    "remote models appear beside local ones and every reply arrives in order complete"
).split()
_N_RE = re.compile(r"\bn=(\d+)")
_RATE_RE = re.compile(r"\brate=([0-9.]+)")
_MAX_HEADER = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
# Unbounded mode writes at most this many chunks per loop turn, so one fast stream cannot
# starve the timers of the paced ones.
_BURST = 64


def stamp(ns: int) -> str:
    """The compact, self-delimiting form of a send time that clients parse back."""
    return f"<{ns:x}>"


def word(i: int) -> str:
    return f"{PROSE[i % len(PROSE)]}{i % 10} "


class Stats:
    """Counters for one measurement window (reset by ``GET /stats?reset=1``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.window_start = time.monotonic()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_start = usage.ru_utime + usage.ru_stime
        self.lateness_ns: list[int] = []
        self.chunks = 0
        self.streams_started = 0
        self.streams_finished = 0
        self.streams_aborted = 0

    def report(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        late = sorted(self.lateness_ns)

        def q(p: float) -> float:
            return late[min(len(late) - 1, int(p * len(late)))] / 1e6 if late else 0.0

        elapsed = time.monotonic() - self.window_start
        cpu = usage.ru_utime + usage.ru_stime - self.cpu_start
        return {
            "window_s": elapsed,
            "cpu_s": cpu,
            "cpu_fraction": cpu / elapsed if elapsed > 0 else 0.0,
            "chunks": self.chunks,
            "streams_started": self.streams_started,
            "streams_finished": self.streams_finished,
            "streams_aborted": self.streams_aborted,
            "paced_chunks": len(late),
            "lateness_ms": {"p50": q(0.5), "p99": q(0.99), "max": late[-1] / 1e6 if late else 0.0},
            "maxrss_mb": usage.ru_maxrss / 1024,
        }


STATS = Stats()


class Stream:
    """One streamed response, driven by loop callbacks (no task per stream: cheaper)."""

    def __init__(self, conn: HTTPConnection, model: str, n: int, rate: float, usage: bool, keep_alive: bool) -> None:
        self.conn = conn
        self.loop = conn.loop
        self.n = n
        self.rate = rate
        self.usage = usage
        self.keep_alive = keep_alive
        self.i = 0
        self.timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.created = int(time.time())
        ident = f"chatcmpl-bench{id(self):x}"
        head = f'{{"id":"{ident}","object":"chat.completion.chunk","created":{self.created},"model":{json.dumps(model)}'
        self.head = head
        self.content_prefix = (head + ',"choices":[{"index":0,"delta":{"content":').encode()
        self.first_prefix = (head + ',"choices":[{"index":0,"delta":{"role":"assistant","content":').encode()
        self.content_suffix = b'},"finish_reason":null}]}'

    def start(self) -> None:
        STATS.streams_started += 1
        self.t0 = self.loop.time()
        self.conn.write_raw(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n" + (b"" if self.keep_alive else b"Connection: close\r\n") + b"\r\n"
        )
        if self.rate > 0:
            self.paced()
        else:
            self.unbounded()

    def _event(self, payload: bytes) -> None:
        data = b"data: " + payload + b"\n\n"
        self.conn.write_raw(b"%x\r\n%s\r\n" % (len(data), data))

    def _content(self, text: str) -> None:
        prefix = self.first_prefix if self.i == 0 else self.content_prefix
        self._event(prefix + json.dumps(text).encode() + self.content_suffix)
        self.i += 1
        STATS.chunks += 1

    def paced(self) -> None:
        """Write every chunk that is due, then sleep until the next one's slot."""
        self.timer = None
        if self.conn.closed:
            return self.abort()
        now = self.loop.time()
        interval = 1.0 / self.rate
        while self.i < self.n:
            due = self.t0 + self.i * interval
            if due > now:
                self.timer = self.loop.call_at(due, self.paced)
                return
            sent = time.monotonic_ns()
            STATS.lateness_ns.append(sent - int(due * 1e9))
            self._content(stamp(sent))
        self.finish()

    def unbounded(self) -> None:
        self.timer = None
        if self.conn.closed:
            return self.abort()
        burst = 0
        while self.i < self.n:
            if self.conn.paused:
                self.conn.on_resume = self.unbounded
                return
            if burst >= _BURST:
                self.timer = self.loop.call_soon(self.unbounded)
                return
            text = word(self.i)
            if self.i == 0:
                text = stamp(time.monotonic_ns()) + text
            self._content(text)
            burst += 1
        self.finish()

    def finish(self) -> None:
        self._event(self.head.encode() + b',"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
        if self.usage:
            usage = {"prompt_tokens": 8, "completion_tokens": self.n, "total_tokens": 8 + self.n}
            self._event(self.head.encode() + b',"choices":[],"usage":' + json.dumps(usage).encode() + b"}")
        self.conn.write_raw(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        STATS.streams_finished += 1
        self.conn.response_done(self.keep_alive)

    def abort(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        STATS.streams_aborted += 1


class HTTPConnection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; requests are handled one at a time, in order."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.closed = False
        self.paused = False
        self.on_resume: Any = None
        self.stream: Stream | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=64 * 1024)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self.process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.stream is not None and self.stream.i < self.stream.n:
            self.stream.abort()
            self.stream = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        callback, self.on_resume = self.on_resume, None
        if callback is not None:
            callback()

    # HTTP
    def write_raw(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def process(self) -> None:
        """Parse and dispatch the next complete request in the buffer, if any."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_HEADER:
                self.simple(431, {"error": "headers too large"}, keep_alive=False)
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        try:
            method, target, version = head[0].split(" ", 2)
        except ValueError:
            self.simple(400, {"error": "bad request line"}, keep_alive=False)
            return
        headers: dict[str, str] = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.simple(411, {"error": "send Content-Length"}, keep_alive=False)
            return
        length = int(headers.get("content-length") or 0)
        if length > _MAX_BODY:
            self.simple(413, {"error": "body too large"}, keep_alive=False)
            return
        if len(self.buffer) < end + 4 + length:
            if headers.get("expect", "").lower() == "100-continue" and len(self.buffer) == end + 4:
                self.write_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        self.busy = True
        self.dispatch(method, target, body, keep_alive)

    def response_done(self, keep_alive: bool) -> None:
        self.busy = False
        self.stream = None
        if not keep_alive:
            if self.transport is not None:
                self.transport.close()
            return
        if self.buffer and not self.closed:
            self.loop.call_soon(self.process)

    def simple(self, status: int, payload: Any, keep_alive: bool = True) -> None:
        body = json.dumps(payload).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}.get(status, "Error")
        self.write_raw(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
            + (b"" if keep_alive else b"Connection: close\r\n")
            + b"\r\n"
            + body
        )
        self.busy = True
        self.response_done(keep_alive)

    def dispatch(self, method: str, target: str, body: bytes, keep_alive: bool) -> None:
        url = urlsplit(target)
        path = url.path.rstrip("/")
        if method == "GET" and path in ("/v1/models", "/models"):
            listed = {"id": "bench", "object": "model", "created": 0, "owned_by": "bench"}
            return self.simple(200, {"object": "list", "data": [listed]}, keep_alive)
        if method == "GET" and path == "/stats":
            report = STATS.report()
            if parse_qs(url.query).get("reset"):
                STATS.reset()
            return self.simple(200, report, keep_alive)
        if method == "GET" and path in ("/health", "/"):
            return self.simple(200, {"ok": True}, keep_alive)
        if method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            try:
                request = json.loads(body)
                n, rate = workload(request)
            except (ValueError, TypeError, AttributeError) as exc:
                return self.simple(400, {"error": {"message": f"bad request: {exc}"}}, keep_alive)
            model = str(request.get("model") or "bench")
            if not request.get("stream"):
                return self.simple(200, completion(model, n), keep_alive)
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            self.stream = Stream(self, model, n, rate, usage, keep_alive)
            self.stream.start()
            return None
        return self.simple(404, {"error": {"message": f"no route {method} {path}"}}, keep_alive)


def workload(request: dict[str, Any]) -> tuple[int, float]:
    """``n`` and ``rate`` from the last user message (defaults: 16 chunks, unbounded)."""
    text = ""
    for message in reversed(request.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            text = str(content or "")
            break
    n_match, rate_match = _N_RE.search(text), _RATE_RE.search(text)
    return (int(n_match.group(1)) if n_match else 16, float(rate_match.group(1)) if rate_match else 0.0)


def completion(model: str, n: int) -> dict[str, Any]:
    text = "".join(word(i) for i in range(n))
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n},
    }


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HTTPConnection, host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
