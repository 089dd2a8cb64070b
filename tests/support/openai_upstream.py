"""A fake but real OpenAI-compatible HTTP upstream for tests and benchmarks.

:class:`OpenAIUpstream` is an ``aiohttp.web`` server on ``127.0.0.1`` (ephemeral port) that
speaks ``/v1/chat/completions`` (streamed SSE and plain JSON) and ``GET /v1/models`` closely
enough that LiteLLM's ``openai/<model>`` provider parses it like the real service. What it
answers is scripted per requested ``model`` by a :class:`Scenario`; a model without one gets
the ``default`` scenario, or, when that is ``None``, echo mode (``"echo: " + last user
text`` in chunks of four characters).

In async tests::

    async with OpenAIUpstream({"m": Scenario(chunks=["a", "b"])}) as up:
        await litellm.acompletion(model="openai/m", api_base=f"{up.url}/v1", ...)
        record = await up.wait_closed("m", timeout=2)

From sync code the server runs on its own loop in a daemon thread::

    with OpenAIUpstream.in_thread(default=Scenario(chunks=["x"] * 50, interval_s=0.02)) as up:
        ...
        up.wait_closed_sync("m", timeout=2)

From a shell (prints the URL on the first line, serves until SIGINT/SIGTERM)::

    python -m tests.support.openai_upstream --port 0 --chunks 50 --interval-s 0.02 \
        --chunk-text "tok "

Timing of a stream: delta ``i`` is written at ``t0 + i * interval_s``; the tail (finish chunk,
usage chunk, ``[DONE]``) at ``t0 + n * interval_s``. With ``interval_s == 0`` the whole body
goes out in one write. Every chat completion that got past body parsing ends in exactly one
:class:`StreamRecord` in :attr:`OpenAIUpstream.connections_closed`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import itertools
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Self

from aiohttp import web

__all__ = [
    "OpenAIUpstream",
    "Outcome",
    "RecordedRequest",
    "Scenario",
    "StreamRecord",
    "ToolCallSpec",
    "delta_frame",
    "main",
]

DEFAULT_PROMPT_TOKENS: Final = 11
ECHO_PREFIX: Final = "echo: "
ECHO_CHUNK_CHARS: Final = 4
MALFORMED_FRAME: Final = b"data: {this is not json, just garbage\n\n"
_DONE_FRAME: Final = b"data: [DONE]\n\n"
_CACHE_LIMIT: Final = 512

# OpenAI's error "type"/"code" per status; a Scenario may override either.
_ERROR_KINDS: Final[dict[int, tuple[str, str | None]]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    408: ("timeout", None),
    409: ("invalid_request_error", None),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", None),
    503: ("server_error", None),
    504: ("server_error", None),
}

Outcome = Literal["completed", "disconnected", "dropped", "error", "server_stopped"]
"""How a chat completion ended.

``completed``: the whole body (``[DONE]`` included) was written. ``disconnected``: the
client went away first (a write failed or aiohttp cancelled the handler). ``dropped``: the
scenario's ``drop_after_chunks`` closed the connection on purpose. ``error``: the scenario's
non-200 status was answered. ``server_stopped``: :meth:`OpenAIUpstream.stop` cut it short.
"""


@dataclass
class ToolCallSpec:
    """One function call the assistant makes; ``arguments`` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass
class Scenario:
    """What the upstream answers for one model.

    ``usage=None`` means the default ``(11, number of streamed deltas)``; set
    ``omit_usage=True`` to send no usage at all (not even when the client asks for it).
    """

    chunks: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    tool_calls: list[ToolCallSpec] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: tuple[int, int] | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    omit_usage: bool = False
    interval_s: float = 0.0
    status: int = 200
    error_message: str = ""
    error_type: str | None = None
    error_code: str | None = None
    retry_after: str | None = None
    stall_before_first_byte_s: float = 0.0
    drop_after_chunks: int | None = None
    malformed_after_chunks: int | None = None
    model_reported: str | None = None
    # Raw bytes written ``flood_count`` times right after the first delta, at whatever
    # pace the client reads (each write waits for the socket to drain): hostile bodies
    # (``data:`` lines without a blank line, an endless line) or a firehose of valid
    # frames (:func:`delta_frame`) for backpressure tests. Then the stream ends normally.
    flood: bytes = b""
    flood_count: int = 0

    @property
    def text(self) -> str:
        return "".join(self.chunks)


@dataclass(frozen=True)
class RecordedRequest:
    """A request as received. ``headers`` keys are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    received_at: float  # time.monotonic()

    @property
    def model(self) -> str | None:
        if self.body is None:
            return None
        model = self.body.get("model")
        return model if isinstance(model, str) else None


@dataclass(frozen=True)
class StreamRecord:
    """How one chat completion response ended (streamed or not)."""

    model: str
    stream: bool
    chunks_written: int  # content/tool-call deltas written (not the finish/usage/[DONE] tail)
    outcome: Outcome
    started_at: float  # time.monotonic() when the request body was parsed
    ended_at: float  # time.monotonic() when the end was written or the disconnect noticed

    @property
    def client_disconnected(self) -> bool:
        return self.outcome == "disconnected"


@dataclass(frozen=True)
class _Frames:
    """Pre-encoded SSE frames of one (scenario, model, include_usage) stream."""

    deltas: tuple[bytes, ...]
    tail: bytes


def _split_arguments(arguments: str, pieces: int = 3) -> list[str]:
    if not arguments:
        return []
    size = max(1, -(-len(arguments) // pieces))
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def _usage_json(scenario: Scenario, n_deltas: int) -> dict[str, Any]:
    prompt, completion = scenario.usage or (DEFAULT_PROMPT_TOKENS, n_deltas)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if scenario.cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": scenario.cached_tokens}
    if scenario.reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": scenario.reasoning_tokens}
    return usage


def _delta_dicts(scenario: Scenario) -> list[dict[str, Any]]:
    deltas: list[dict[str, Any]] = [{"content": text} for text in scenario.chunks]
    for index, call in enumerate(scenario.tool_calls):
        deltas.append(
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
        )
        deltas.extend(
            {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
            for piece in _split_arguments(call.arguments)
        )
    if deltas:
        deltas[0] = {"role": "assistant", "content": None, **deltas[0]}
    return deltas


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _build_frames(scenario: Scenario, model: str, include_usage: bool, created: int) -> _Frames:
    completion_id = f"chatcmpl-{abs(hash((id(scenario), model))) % 10**12:012d}"
    head = _dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model})[:-1]
    prefix = f"data: {head},".encode()

    def frame(body: str) -> bytes:
        return prefix + body.encode() + b"}\n\n"

    dicts = _delta_dicts(scenario)
    deltas = tuple(frame(f'"choices":[{{"index":0,"delta":{_dumps(d)},"finish_reason":null}}]') for d in dicts)
    tail = frame(f'"choices":[{{"index":0,"delta":{{}},"finish_reason":{_dumps(scenario.finish_reason)}}}]')
    if include_usage and not scenario.omit_usage:
        tail += frame(f'"choices":[],"usage":{_dumps(_usage_json(scenario, len(dicts)))}')
    return _Frames(deltas=deltas, tail=tail + _DONE_FRAME)


def delta_frame(text: str, model: str = "m") -> bytes:
    """One valid ``chat.completion.chunk`` SSE frame carrying ``text`` (for floods)."""
    chunk = {
        "id": "chatcmpl-flood",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return f"data: {_dumps(chunk)}\n\n".encode()


async def _write_flood(response: web.StreamResponse, flood: bytes, count: int) -> None:
    """``flood`` x ``count`` in ~64 KiB writes; each waits for the socket to drain."""
    per_write = max(1, 65536 // max(1, len(flood)))
    block = flood * per_write
    full, rest = divmod(count, per_write)
    for _ in range(full):
        await response.write(block)
    if rest:
        await response.write(flood * rest)


def _completion_json(scenario: Scenario, model: str, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": scenario.text if scenario.chunks else None,
        "refusal": None,
    }
    if scenario.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in scenario.tool_calls
        ]
    body: dict[str, Any] = {
        "id": f"chatcmpl-{abs(hash((id(scenario), model))) % 10**12:012d}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": scenario.finish_reason,
            }
        ],
        "system_fingerprint": None,
    }
    if not scenario.omit_usage:
        body["usage"] = _usage_json(scenario, len(_delta_dicts(scenario)))
    return body


def _last_user_text(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
            )
        return ""
    return ""


def echo_scenario(body: dict[str, Any]) -> Scenario:
    """The scenario echo mode uses for a request body."""
    text = ECHO_PREFIX + _last_user_text(body)
    chunks = [text[i : i + ECHO_CHUNK_CHARS] for i in range(0, len(text), ECHO_CHUNK_CHARS)]
    return Scenario(chunks=chunks)


class OpenAIUpstream:
    """The fake provider. Start with ``async with``, :meth:`start`, or :meth:`in_thread`.

    ``scenarios`` (keyed by the request's ``model``) and ``default`` may be changed at any
    time; a changed scenario is re-encoded on its next use.
    """

    def __init__(
        self,
        scenarios: dict[str, Scenario] | None = None,
        default: Scenario | None = None,
        *,
        port: int = 0,
        shutdown_timeout_s: float = 1.0,
    ) -> None:
        self.scenarios: dict[str, Scenario] = dict(scenarios or {})
        self.default: Scenario | None = default
        # (model or None for any, marker, scenario): a request whose last user message holds
        # the marker gets that scenario, so two callers of one model can be told apart.
        self.by_prompt: list[tuple[str | None, str, Scenario]] = []
        self.requests: list[RecordedRequest] = []
        self.connections_closed: list[StreamRecord] = []
        self._port_wanted = port
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._stopping = False
        self._active: dict[int, web.Request] = {}  # web.Request is unhashable
        self._request_ids = itertools.count(1)
        self._frames_cache: dict[tuple[int, str, bool], tuple[Scenario, _Frames]] = {}
        # Records are appended on the server's loop and may be awaited from another
        # thread's loop (in_thread mode), hence a lock plus thread-safe wakeups.
        self._cond = threading.Condition()
        self._claimed: set[int] = set()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # ----------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no ``/v1``)."""
        if self._port is None:
            raise RuntimeError("OpenAIUpstream is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("OpenAIUpstream is not started")
        return self._port

    @property
    def in_flight(self) -> int:
        """Chat completion handlers currently running."""
        return len(self._active)

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("OpenAIUpstream already started")
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for prefix in ("/v1", ""):
            app.router.add_post(f"{prefix}/chat/completions", self._handle_chat)
            app.router.add_get(f"{prefix}/models", self._handle_models)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            handler_cancellation=True,  # notice a vanished client even between writes
            shutdown_timeout=self._shutdown_timeout_s,
        )
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self._port_wanted))
            site = web.SockSite(runner, sock, backlog=2048)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._port = int(sock.getsockname()[1])
        self._runner = runner
        self._stopping = False

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self._stopping = True
        # aiohttp would wait up to 2 x shutdown_timeout for running streams; cut them now.
        for request in list(self._active.values()):
            _abort(request)
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @classmethod
    @contextlib.contextmanager
    def in_thread(
        cls,
        scenarios: dict[str, Scenario] | None = None,
        default: Scenario | None = None,
        *,
        port: int = 0,
        start_timeout_s: float = 10.0,
    ) -> Iterator[OpenAIUpstream]:
        """Run the server on its own event loop in a daemon thread (for sync code)."""
        upstream = cls(scenarios, default, port=port)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="openai-upstream", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(upstream.start(), loop).result(start_timeout_s)
            try:
                yield upstream
            finally:
                asyncio.run_coroutine_threadsafe(upstream.stop(), loop).result(start_timeout_s)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(start_timeout_s)
            if not thread.is_alive():
                loop.close()

    # ----------------------------------------------------------------- records

    def clear(self) -> None:
        """Forget recorded requests and stream records."""
        with self._cond:
            self.requests.clear()
            self.connections_closed.clear()
            self._claimed.clear()

    def requests_for(self, model: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.model == model]

    def _claim(self, model: str | None) -> StreamRecord | None:
        for index, record in enumerate(self.connections_closed):
            if index not in self._claimed and (model is None or record.model == model):
                self._claimed.add(index)
                return record
        return None

    async def wait_closed(self, model: str | None = None, timeout: float = 5.0) -> StreamRecord:
        """The first not-yet-returned record of a ``model`` response (``None``: any model).

        Waits up to ``timeout`` seconds for it to end (normally, by disconnect, ...);
        raises ``TimeoutError`` otherwise. Each record is returned once, so sequential
        requests to the same model are awaited one after the other.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            future: asyncio.Future[None] = loop.create_future()
            with self._cond:
                record = self._claim(model)
                if record is not None:
                    return record
                self._waiters.append((loop, future))
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(future, remaining)
            except TimeoutError:
                raise TimeoutError(f"no response for model {model!r} ended within {timeout}s") from None
            finally:
                with self._cond:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove((loop, future))

    def wait_closed_sync(self, model: str | None = None, timeout: float = 5.0) -> StreamRecord:
        """Blocking :meth:`wait_closed`, for sync code (never on the server's own loop)."""
        found: list[StreamRecord] = []

        def ready() -> bool:
            record = self._claim(model)
            if record is not None:
                found.append(record)
            return bool(found)

        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                raise TimeoutError(f"no response for model {model!r} ended within {timeout}s")
        return found[0]

    def _record(self, record: StreamRecord) -> None:
        with self._cond:
            self.connections_closed.append(record)
            self._cond.notify_all()
            waiters = list(self._waiters)
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop, future in waiters:
            if loop is current:
                _wake(future)
            else:
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(_wake, future)

    # ----------------------------------------------------------------- handlers

    def _frames_for(self, scenario: Scenario, model: str, include_usage: bool) -> _Frames:
        key = (id(scenario), model, include_usage)
        cached = self._frames_cache.get(key)
        if cached is not None and cached[0] == scenario:
            return cached[1]
        frames = _build_frames(scenario, model, include_usage, int(time.time()))
        if len(self._frames_cache) >= _CACHE_LIMIT:
            self._frames_cache.clear()
        self._frames_cache[key] = (copy.deepcopy(scenario), frames)
        return frames

    async def _handle_models(self, request: web.Request) -> web.Response:
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=None,
                received_at=time.monotonic(),
            )
        )
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "test"} for name in list(self.scenarios)]
        return web.json_response({"object": "list", "data": data})

    def _error_response(self, scenario: Scenario) -> web.Response:
        status = scenario.status
        kind, code = _ERROR_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
        body = {
            "error": {
                "message": scenario.error_message or f"simulated upstream error {status}",
                "type": scenario.error_type or kind,
                "param": None,
                "code": scenario.error_code if scenario.error_code is not None else code,
            }
        }
        headers = {"x-request-id": f"req_{next(self._request_ids)}"}
        if scenario.retry_after is not None:
            headers["Retry-After"] = scenario.retry_after
        return web.json_response(body, status=status, headers=headers)

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        received_at = time.monotonic()
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            parsed = json.loads(await request.read())
        except ValueError:
            parsed = None
        body = parsed if isinstance(parsed, dict) else None
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers=headers,
                body=body,
                received_at=received_at,
            )
        )
        if body is None:
            return self._error_response(Scenario(status=400, error_message="We could not parse the JSON body."))

        model = str(body.get("model", ""))
        prompt = _last_user_text(body) if self.by_prompt else ""
        marked = next((sc for m, marker, sc in self.by_prompt if m in (None, model) and marker in prompt), None)
        scripted = marked or self.scenarios.get(model) or self.default
        scenario = scripted or echo_scenario(body)
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        include_usage = stream and isinstance(options, dict) and bool(options.get("include_usage"))
        reported = scenario.model_reported or model

        started_at = time.monotonic()
        written = 0
        outcome: Outcome = "completed"
        self._active[id(request)] = request
        try:
            if scenario.stall_before_first_byte_s > 0:
                await asyncio.sleep(scenario.stall_before_first_byte_s)
            if scenario.status != 200:
                outcome = "error"
                return self._error_response(scenario)
            if not stream:
                n_deltas = len(_delta_dicts(scenario))
                if scenario.interval_s > 0:
                    await asyncio.sleep(scenario.interval_s * n_deltas)
                if scenario.drop_after_chunks is not None:
                    _abort(request)
                    outcome = "dropped"
                    return web.Response(status=200)
                written = n_deltas
                return web.json_response(
                    _completion_json(scenario, reported, int(time.time())),
                    headers={"x-request-id": f"req_{next(self._request_ids)}"},
                )

            response = web.StreamResponse(
                status=200,
                headers={
                    "Content-Type": "text/event-stream; charset=utf-8",
                    "Cache-Control": "no-cache",
                    "x-request-id": f"req_{next(self._request_ids)}",
                },
            )
            await response.prepare(request)
            frames = (
                self._frames_for(scenario, reported, include_usage)
                if scripted is not None
                else _build_frames(scenario, reported, include_usage, int(time.time()))
            )
            n = len(frames.deltas)
            drop_at = None if scenario.drop_after_chunks is None else min(scenario.drop_after_chunks, n)
            malformed_at = scenario.malformed_after_chunks
            interval = scenario.interval_s
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            pending: list[bytes] = []
            pending_deltas = 0
            for i in range(n + 1):
                if interval > 0 and i > 0:
                    delay = t0 + i * interval - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if i == malformed_at:
                    pending.append(MALFORMED_FRAME)
                if i == drop_at:
                    if pending:
                        await response.write(b"".join(pending))
                        written += pending_deltas
                    outcome = "dropped"
                    _abort(request)
                    return response
                if i == min(1, n) and scenario.flood and scenario.flood_count > 0:
                    if pending:
                        await response.write(b"".join(pending))
                        written += pending_deltas
                        pending.clear()
                        pending_deltas = 0
                    await _write_flood(response, scenario.flood, scenario.flood_count)
                if i < n:
                    pending.append(frames.deltas[i])
                    pending_deltas += 1
                else:
                    pending.append(frames.tail)
                if interval > 0 or i == n:
                    await response.write(b"".join(pending) if len(pending) > 1 else pending[0])
                    written += pending_deltas
                    pending.clear()
                    pending_deltas = 0
            return response
        except ConnectionResetError:
            # A write found the transport closed: aiohttp's finish_response treats the
            # ConnectionError on write_eof as a premature disconnect, quietly.
            outcome = "disconnected"
            return web.Response(status=499)
        except asyncio.CancelledError:
            outcome = "server_stopped" if self._stopping else "disconnected"
            raise
        finally:
            self._active.pop(id(request), None)
            self._record(
                StreamRecord(
                    model=model,
                    stream=stream,
                    chunks_written=written,
                    outcome=outcome,
                    started_at=started_at,
                    ended_at=time.monotonic(),
                )
            )


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _abort(request: web.Request) -> None:
    """Close the TCP connection mid-response: buffered bytes are flushed, then FIN."""
    transport = request.transport
    if transport is not None:
        transport.close()


# --------------------------------------------------------------------- command line


async def _serve_forever(upstream: OpenAIUpstream) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with upstream:
        print(upstream.url, flush=True)
        await stop.wait()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.openai_upstream",
        description="Serve a fake OpenAI-compatible upstream on 127.0.0.1; prints its URL.",
    )
    parser.add_argument("--port", type=int, default=0, help="0 = ephemeral")
    parser.add_argument("--chunks", type=int, default=20, help="text deltas per reply")
    parser.add_argument("--interval-s", type=float, default=0.0, help="delay between chunks")
    parser.add_argument("--chunk-text", default="tok ", help="text of every delta")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    parser.add_argument("--finish-reason", default="stop")
    parser.add_argument("--echo", action="store_true", help="echo the last user message instead of --chunks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    default = (
        None
        if args.echo
        else Scenario(
            chunks=[args.chunk_text] * args.chunks,
            interval_s=args.interval_s,
            finish_reason=args.finish_reason,
            usage=(args.prompt_tokens, args.chunks),
        )
    )
    asyncio.run(_serve_forever(OpenAIUpstream(default=default, port=args.port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
