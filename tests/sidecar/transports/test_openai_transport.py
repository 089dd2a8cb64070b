"""The direct transport (:mod:`exo_remote_engine.sidecar.transports.openai_transport`) against real
servers on 127.0.0.1: which deployments it takes, the route it builds, its SSE parser fed
exact bytes split at awkward TCP boundaries, its failures through the one error table,
cancellation and connection reuse.

The upstream here is a raw asyncio TCP server written for these tests, not aiohttp.web:
it writes exactly the bytes a test scripts (status line, headers, chunked or
``Connection: close`` framing, SSE lines), one TCP write per piece, so the parser sees
events cut mid-line, mid-UTF-8 character and mid-chunk-header.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.openai_chat import chat_body_to_request
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.loader import ModelEntry, embedded_entry, load_config
from exo_remote_engine.sidecar.relay.streaming import StreamingBackend, StreamState
from exo_remote_engine.sidecar.transports.openai_transport import OpenAICompatibleTransport, _proxy_for
from exo_remote_engine.sidecar.transports.provider_errors import (
    ProviderConnectionError,
    ProviderStatusError,
    ProviderTimeoutError,
    classify,
)
from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.harness import assert_no_key, error_surface
from tests.support.waits import eventually

pytestmark = pytest.mark.timeout(10)

ALIAS = "alias-under-test"
CRLF = b"\r\n"


# --------------------------------------------------------------------------- raw HTTP server


@dataclass(frozen=True)
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> dict[str, Any]:
        parsed = json.loads(self.body)
        assert isinstance(parsed, dict)
        return parsed


@dataclass
class Exchange:
    """One request on one connection; the handler writes the response's raw bytes."""

    request: RawRequest
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    number: int  # 1-based, across all connections of the server
    keep_alive: bool = True  # False: the server closes the connection after the handler

    async def send(self, *pieces: bytes, pause_s: float = 0.005) -> None:
        """Each piece in its own TCP write (TCP_NODELAY is on), ``pause_s`` apart."""
        for i, piece in enumerate(pieces):
            if i and pause_s:
                await asyncio.sleep(pause_s)
            self.writer.write(piece)
            await self.writer.drain()

    async def client_closed(self) -> float:
        """Wait for the client's FIN (or RST); time.monotonic() when it was seen."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        return time.monotonic()


Handler = Callable[[Exchange], Awaitable[None]]


class RawHTTPServer:
    """HTTP/1.1 on 127.0.0.1, keep-alive by default, answers scripted by ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests: list[RawRequest] = []
        self.connections_ended: list[float] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.accepted += 1
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # torn down by __aexit__; finishing quietly keeps asyncio from logging the handler
        finally:
            self.connections_ended.append(time.monotonic())
            self._writers.discard(writer)
            writer.close()
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client closed the connection between requests
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {}
            for line in filter(None, header_lines):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = RawRequest(method, path, headers, body)
            self.requests.append(request)
            exchange = Exchange(request, reader, writer, len(self.requests))
            try:
                await self.handler(exchange)
            except ConnectionError:
                return
            if not exchange.keep_alive:
                return


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawHTTPServer]:
    async with RawHTTPServer(handler) as server:
        yield server


# --------------------------------------------------------------------------- HTTP and SSE bytes


def sse_head(framing: str) -> bytes:
    """Status line and headers of a 200 event stream, ``chunked`` or ``close`` delimited."""
    framing_header = b"Transfer-Encoding: chunked" if framing == "chunked" else b"Connection: close"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    return head + framing_header + CRLF * 2


def http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}".encode() + CRLF + data + CRLF


LAST_CHUNK = b"0\r\n\r\n"


def json_response(status: int, reason: str, body: bytes, extra_headers: Sequence[tuple[str, str]] = ()) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in extra_headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return b"data: " + data.encode() + b"\n\n"


def text_event(text: str) -> bytes:
    return event({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def finish_event(reason: str = "stop") -> bytes:
    return event({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})


DONE = b"data: [DONE]\n\n"


async def send_stream(ex: Exchange, *events: bytes, pause_s: float = 0.0) -> None:
    """A complete chunked event stream, one HTTP chunk per event, then the last chunk."""
    await ex.send(sse_head("chunked"), *(http_chunk(e) for e in events), LAST_CHUNK, pause_s=pause_s)


# --------------------------------------------------------------------------- entries and calls


def entry(
    api_base: str | None,
    model: str = "openai/test-model",
    provider: str = "openai",
    **params: Any,
) -> ModelEntry:
    all_params = {"api_base": api_base, **params} if api_base is not None else dict(params)
    return ModelEntry(alias=ALIAS, litellm_model=model, provider=provider, params=all_params)


def request(text: str = "Hi there") -> pb.GenerateRequest:
    return chat_body_to_request({"messages": [{"role": "user", "content": text}]}, request_id="r-1", model=ALIAS)


async def produce(
    model: ModelEntry, transport: OpenAICompatibleTransport | None = None
) -> tuple[StreamState, BaseException | None]:
    """Run produce() once; (the state it filled, what it raised or None)."""
    owned = transport is None
    transport = transport or OpenAICompatibleTransport()
    state = StreamState()
    try:
        await transport.produce(model, request(), state)
    except Exception as exc:
        return state, exc
    finally:
        if owned:
            await transport.close()
    return state, None


def classified(exc: BaseException | None, model: ModelEntry, secrets: Sequence[str] = ()) -> RemoteError:
    assert exc is not None, "produce() was expected to fail"
    return classify(exc, alias=model.alias, provider=model.provider, secrets=list(secrets))


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- accepts()


@pytest.mark.parametrize(
    ("model", "accepted"),
    [
        pytest.param(entry("http://127.0.0.1:1/v1"), True, id="openai-api_base-only"),
        pytest.param(
            entry(
                "http://127.0.0.1:1/v1",
                api_key="k",
                timeout=30,
                stream_timeout=5,
                extra_headers={"X-Org": "o"},
            ),
            True,
            id="openai-all-transport-params",
        ),
        pytest.param(
            entry("http://127.0.0.1:1/v1", "hosted_vllm/meta/llama", "hosted_vllm", api_key="k"),
            True,
            id="hosted_vllm",
        ),
        pytest.param(entry("http://127.0.0.1:1", "anthropic/claude-x", "anthropic"), False, id="anthropic"),
        pytest.param(entry("http://127.0.0.1:11434", "ollama_chat/llama3", "ollama_chat"), False, id="ollama_chat"),
        pytest.param(embedded_entry(), False, id="embedded"),
        pytest.param(entry(None, api_key="k"), False, id="no-api_base"),
        pytest.param(entry(""), False, id="empty-api_base"),
        pytest.param(entry("http://127.0.0.1:1/v1", temperature=0.2), False, id="extra-temperature"),
        pytest.param(
            entry("http://127.0.0.1:1/v1", custom_llm_provider="openai"), False, id="extra-custom_llm_provider"
        ),
        pytest.param(
            entry("http://127.0.0.1:1/v1", "hosted_vllm/m", "hosted_vllm", max_tokens=5),
            False,
            id="hosted_vllm-extra-max_tokens",
        ),
    ],
)
def test_accepts_only_plain_openai_compatible_deployments(model: ModelEntry, accepted: bool) -> None:
    assert OpenAICompatibleTransport().accepts(model) is accepted


def test_accepts_what_a_proxy_config_file_declares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PLANTED_KEY)
    config = load_config(write_proxy_config(tmp_path / "c.yaml", "http://127.0.0.1:9", ["a", "b"]))
    transport = OpenAICompatibleTransport()
    assert [transport.accepts(m) for m in config.models] == [True, True]
    backend = StreamingBackend(openai_fast_path=False)
    assert not isinstance(backend.transport_for(config.models[0]), OpenAICompatibleTransport), "the switch works"


# --------------------------------------------------------------------------- route()


def test_route_strips_the_provider_prefix_and_joins_the_url() -> None:
    transport = OpenAICompatibleTransport()
    route = transport.route(entry("http://127.0.0.1:8000/v1/", "openai/foo/bar", api_key="k"))
    assert route.model == "foo/bar"
    assert route.url == "http://127.0.0.1:8000/v1/chat/completions"
    vllm = transport.route(entry("http://h:1", "hosted_vllm/meta-llama/Llama-3", "hosted_vllm"))
    assert (vllm.model, vllm.url) == ("meta-llama/Llama-3", "http://h:1/chat/completions")
    # A model that does not start with its provider's prefix is sent as written.
    assert transport.route(entry("http://h:1/v1", "gpt-4o-mini")).model == "gpt-4o-mini"


def test_route_authorization_from_api_key_else_the_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    transport = OpenAICompatibleTransport()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai-env")
    monkeypatch.setenv("HOSTED_VLLM_API_KEY", "vllm-from-env")
    base = "http://127.0.0.1:1/v1"
    assert transport.route(entry(base, api_key="sk-param")).headers["Authorization"] == "Bearer sk-param"
    assert transport.route(entry(base)).headers["Authorization"] == "Bearer sk-from-openai-env"
    vllm = entry(base, "hosted_vllm/m", "hosted_vllm")
    assert transport.route(vllm).headers["Authorization"] == "Bearer vllm-from-env"
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("HOSTED_VLLM_API_KEY")
    assert "Authorization" not in transport.route(entry(base)).headers
    assert "Authorization" not in transport.route(vllm).headers


def test_route_proxy_from_the_environment_with_no_proxy_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like LiteLLM's httpx client: HTTP(S)_PROXY applies unless NO_PROXY names the host."""
    transport = OpenAICompatibleTransport()
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "vllm.internal")
    _proxy_for.cache_clear()
    try:
        hosted = transport.route(entry("https://api.example.com/v1"))
        assert hosted.proxy == "http://user:pw@proxy.internal:3128"
        assert "pw" not in repr(hosted)
        assert transport.route(entry("https://vllm.internal/v1")).proxy is None
        assert transport.route(entry("http://127.0.0.1:1/v1")).proxy is None  # no HTTP_PROXY set
    finally:
        _proxy_for.cache_clear()


def test_route_merges_extra_headers_and_prefers_stream_timeout() -> None:
    transport = OpenAICompatibleTransport(request_timeout_s=42.0)
    base = "http://127.0.0.1:1/v1"
    route = transport.route(
        entry(base, api_key="k", extra_headers={"X-Trace": "abc", "OpenAI-Organization": "org-1"}, timeout=30)
    )
    assert dict(route.headers) == {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "Authorization": "Bearer k",
        "X-Trace": "abc",
        "OpenAI-Organization": "org-1",
    }
    assert route.timeout_s == 30.0
    assert transport.route(entry(base, timeout=30, stream_timeout=7)).timeout_s == 7.0
    assert transport.route(entry(base, stream_timeout="2.5")).timeout_s == 2.5
    assert transport.route(entry(base)).timeout_s == 42.0, "the transport's default without either"


def test_route_repr_holds_no_key() -> None:
    route = OpenAICompatibleTransport().route(
        entry("http://127.0.0.1:1/v1", api_key=PLANTED_KEY, extra_headers={"X-Api-Key": PLANTED_KEY})
    )
    assert route.headers["Authorization"] == f"Bearer {PLANTED_KEY}"
    assert_no_key(repr(route), str(route), where="repr(route)")


# --------------------------------------------------------------------------- SSE parsing

_TOOL_A = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
_USAGE = {
    "choices": [],
    "usage": {
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "total_tokens": 46,
        "prompt_tokens_details": {"cached_tokens": 5},
        "completion_tokens_details": {"reasoning_tokens": 3},
    },
}
_NIHON = "日本".encode()  # 6 bytes; the stream cuts it after byte 4, inside 本


def _delta_json(delta: dict[str, Any]) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}, ensure_ascii=False)


def scripted_pieces(tail: str) -> list[bytes]:
    """One stream's body as TCP writes, cut where a parser is likeliest to slip: inside
    ``data:``, between CR and LF, inside a UTF-8 character, inside a multi-line event,
    inside ``[DONE]``. ``tail``: ``done`` ends with ``[DONE]`` and a blank line,
    ``eof-after-line`` with the usage line's LF but no blank line, ``eof-mid-line`` with
    no line end at all."""
    first = json.dumps(
        {
            "id": "c1",
            "model": "served-model",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}],
        }
    ).encode()
    reasoning = b"data: " + _delta_json({"reasoning_content": "think "}).encode() + b"\n\n"
    reasoning2 = _delta_json({"reasoning": "more"}).encode()
    tool_a_args = _delta_json({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}).encode()
    tool_b_call = {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    tool_b = _delta_json({"tool_calls": [tool_b_call]}).encode()
    tool_a_more = _delta_json({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}).encode()
    usage = json.dumps(_USAGE).encode()
    pieces = [
        b": keep-alive\r\n\r\nevent: message\r\nda",
        b"ta: " + first + b"\r",
        b"\n\r\n",
        reasoning + b"data: " + reasoning2[:20],
        reasoning2[20:] + b"\n",
        b'\ndata: {"choices":[{"index":0,\n',
        b'data: "delta":{"content":"lo, ' + _NIHON[:4],
        _NIHON[4:] + b'"}}]}\n\n: comment between events\n\n',
        b"event: message\ndata: " + _delta_json({"tool_calls": [_TOOL_A]}).encode() + b"\n\ndata: " + tool_a_args[:33],
        tool_a_args[33:] + b"\n\ndata: " + tool_b + b"\n\n",
        b"data: " + tool_a_more + b"\n\n" + finish_event("tool_calls"),
    ]
    if tail == "done":
        pieces += [b"data: " + usage + b"\n\ndata: [DO", b"NE]\n\n"]
    elif tail == "eof-after-line":
        pieces += [b"data: " + usage[:10], usage[10:] + b"\n"]
    else:
        pieces += [b"data: " + usage[:10], usage[10:]]
    return pieces


def assert_scripted_stream_parsed(state: StreamState) -> None:
    delta = state.buffer.take()
    assert delta is not None
    assert delta.text == "Hello, 日本"
    assert delta.reasoning_text == "think more"
    assert [(t.index, t.id, t.name, t.arguments_fragment) for t in delta.tool_calls] == [
        (0, "call_a", "get_weather", '{"city": "Paris"}'),
        (1, "call_b", "get_time", "{}"),
    ]
    assert state.finish_reason == "tool_calls"
    assert state.saw_tool_calls and state.started
    assert state.model == "served-model"
    assert state.usage == pb.Usage(prompt_tokens=12, completion_tokens=34, cached_prompt_tokens=5, reasoning_tokens=3)


@pytest.mark.parametrize("framing", ["chunked", "close"])
@pytest.mark.parametrize("tail", ["done", "eof-after-line", "eof-mid-line"])
async def test_sse_events_split_at_awkward_tcp_boundaries_parse_exactly(framing: str, tail: str) -> None:
    pieces = scripted_pieces(tail)

    async def handler(ex: Exchange) -> None:
        if framing == "chunked":
            await ex.send(sse_head(framing), *(http_chunk(p) for p in pieces), LAST_CHUNK)
        else:
            await ex.send(sse_head(framing), *pieces)
            ex.keep_alive = False  # the body ends when the connection does

    async with raw_server(handler) as server:
        model = entry(server.api_base + "/", "openai/org/model-x", api_key="sk-test")
        state, error = await produce(model)
    assert error is None, repr(error)
    assert_scripted_stream_parsed(state)
    # The request on the wire: the route, and the body LiteLLM would have sent.
    [sent] = server.requests
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.headers["accept"] == "text/event-stream"
    assert sent.headers["content-type"] == "application/json"
    assert sent.json() == {
        "messages": [{"role": "user", "content": "Hi there"}],
        "model": "org/model-x",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize("split", ["one-write", "3-byte-writes"])
async def test_sse_parse_does_not_depend_on_where_tcp_cuts_the_wire_bytes(split: str) -> None:
    """The whole chunked body (HTTP chunk headers included) cut every 3 bytes, or sent at once."""
    wire = sse_head("chunked") + b"".join(http_chunk(p) for p in scripted_pieces("done")) + LAST_CHUNK
    cuts = [wire] if split == "one-write" else [wire[i : i + 3] for i in range(0, len(wire), 3)]

    async def handler(ex: Exchange) -> None:
        await ex.send(*cuts, pause_s=0.0 if split == "one-write" else 0.0005)

    async with raw_server(handler) as server:
        state, error = await produce(entry(server.api_base))
    assert error is None, repr(error)
    assert_scripted_stream_parsed(state)


# --------------------------------------------------------------------------- errors


async def test_http_400_context_length_is_context_window_exceeded() -> None:
    body = json.dumps(
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    ).encode()

    async def handler(ex: Exchange) -> None:
        await ex.send(json_response(400, "Bad Request", body))

    async with raw_server(handler) as server:
        model = entry(server.api_base)
        _, exc = await produce(model)
    assert isinstance(exc, ProviderStatusError) and exc.status_code == 400
    error = classified(exc, model)
    assert error.reason is Reason.CONTEXT_WINDOW_EXCEEDED, error
    assert "maximum context length" in error.message, "the provider's explanation reaches the client"


async def test_http_400_error_body_arriving_in_two_tcp_segments_is_read_whole() -> None:
    body = json.dumps(
        {"error": {"message": "This model's maximum context length is 8192 tokens.", "type": "invalid_request_error"}}
    ).encode()
    head = f"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"

    async def handler(ex: Exchange) -> None:
        await ex.send(head.encode() + body[:30], body[30:], pause_s=0.05)

    async with raw_server(handler) as server:
        model = entry(server.api_base)
        _, exc = await produce(model)
    assert classified(exc, model).reason is Reason.CONTEXT_WINDOW_EXCEEDED


async def test_http_401_is_auth_failed_and_the_key_reaches_no_part_of_the_error() -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"Incorrect API key provided: {PLANTED_KEY}. You can find your API key at ...",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        }
    ).encode()

    async def handler(ex: Exchange) -> None:
        await ex.send(json_response(401, "Unauthorized", body, [("WWW-Authenticate", f"Bearer {PLANTED_KEY}")]))

    async with raw_server(handler) as server:
        model = entry(server.api_base, api_key=PLANTED_KEY)
        _, exc = await produce(model)
    assert server.requests[0].headers["authorization"] == f"Bearer {PLANTED_KEY}", "the key was really planted"
    assert isinstance(exc, ProviderStatusError) and exc.status_code == 401
    for secrets in ([PLANTED_KEY], []):  # even when the redactor is not told the key
        error = classified(exc, model, secrets)
        assert error.reason is Reason.PROVIDER_AUTH_FAILED
        assert error.metadata == {"model": ALIAS, "provider": "openai"}
        assert_no_key(*error_surface(error), error.retry_after_s, where="the classified RemoteError")


async def test_http_429_retry_after_is_rate_limited_with_the_hint() -> None:
    body = b'{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}'

    async def handler(ex: Exchange) -> None:
        await ex.send(json_response(429, "Too Many Requests", body, [("Retry-After", "3")]))

    async with raw_server(handler) as server:
        model = entry(server.api_base)
        _, exc = await produce(model)
    error = classified(exc, model)
    assert error.reason is Reason.RATE_LIMITED
    assert error.retry_after_s == 3.0


async def test_http_503_is_provider_unavailable() -> None:
    async def handler(ex: Exchange) -> None:
        await ex.send(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\noverloaded\n"
        )

    async with raw_server(handler) as server:
        model = entry(server.api_base)
        _, exc = await produce(model)
    assert isinstance(exc, ProviderStatusError) and exc.status_code == 503
    error = classified(exc, model)
    assert error.reason is Reason.PROVIDER_UNAVAILABLE and error.retryable


async def test_error_event_mid_stream_raises_after_the_earlier_text_was_absorbed() -> None:
    async def handler(ex: Exchange) -> None:
        error = {"error": {"message": "upstream worker crashed", "type": "server_error", "code": 500}}
        await ex.send(
            sse_head("chunked"),
            http_chunk(text_event("partial ") + text_event("answer")),
            http_chunk(event(error)),
            LAST_CHUNK,
            pause_s=0.05,
        )

    async with raw_server(handler) as server:
        model = entry(server.api_base)
        state, exc = await produce(model)
    assert isinstance(exc, ProviderStatusError) and exc.status_code == 500, repr(exc)
    assert state.started, "the text before the error was flushed: a retry must not resend it"
    delta = state.buffer.take()
    assert delta is not None and delta.text == "partial answer"
    assert state.finish_reason is None
    assert classified(exc, model).reason is Reason.PROVIDER_UNAVAILABLE


async def test_malformed_event_is_a_connection_error() -> None:
    async def handler(ex: Exchange) -> None:
        await ex.send(
            sse_head("chunked"),
            http_chunk(text_event("ok ")),
            http_chunk(b'data: {"choices": [ this is not json\n\n'),
            LAST_CHUNK,
            pause_s=0.05,
        )

    async with raw_server(handler) as server:
        model = entry(server.api_base)
        state, exc = await produce(model)
    assert isinstance(exc, ProviderConnectionError), repr(exc)
    delta = state.buffer.take()
    assert delta is not None and delta.text == "ok "
    assert classified(exc, model).reason is Reason.PROVIDER_UNAVAILABLE


async def test_connection_refused_is_provider_unavailable() -> None:
    model = entry(f"http://127.0.0.1:{closed_port()}/v1")
    started = time.monotonic()
    _, exc = await produce(model)
    assert isinstance(exc, ProviderConnectionError), repr(exc)
    # Refused at once, not after a timeout or retries (the default timeout is minutes).
    assert time.monotonic() - started < 10
    error = classified(exc, model)
    assert error.reason is Reason.PROVIDER_UNAVAILABLE
    assert "ClientConnectorError" not in error.message and "Errno" not in error.message


@pytest.mark.parametrize("when", ["before-headers", "mid-stream"])
async def test_silent_server_is_provider_timeout_and_the_connection_is_closed(when: str) -> None:
    """A 0.3 s read timeout ends a silent stream (no sooner, and not never: the server would
    stay silent forever) and the connection is closed, not leaked."""
    closed_at: list[float] = []

    async def handler(ex: Exchange) -> None:
        if when == "mid-stream":
            await ex.send(sse_head("chunked"), http_chunk(text_event("first ")))
        closed_at.append(await ex.client_closed())  # then nothing, until the client gives up
        ex.keep_alive = False

    async with raw_server(handler) as server:
        model = entry(server.api_base, timeout=0.3)
        started = time.monotonic()
        state, exc = await produce(model)
        failed_at = time.monotonic()
        await eventually(lambda: closed_at, "the silent connection was closed, not leaked")
    assert isinstance(exc, ProviderTimeoutError), repr(exc)
    assert 0.25 < failed_at - started < 10, f"failed after {failed_at - started:.3f}s"
    assert classified(exc, model).reason is Reason.PROVIDER_TIMEOUT
    if when == "mid-stream":
        assert state.started


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("when", ["mid-stream", "before-headers"])
async def test_cancelling_produce_closes_the_connection_promptly(when: str) -> None:
    closed_at: list[float] = []
    events_written = 0
    reached: list[bool] = []
    total = 5000  # 50 s to run its course: "promptly" below is a loaded box's 5 s

    async def handler(ex: Exchange) -> None:
        nonlocal events_written
        reached.append(True)
        watcher = asyncio.create_task(ex.client_closed())
        if when == "mid-stream":
            await ex.send(sse_head("chunked"))
            while not watcher.done() and events_written < total:
                with contextlib.suppress(ConnectionError):
                    await ex.send(http_chunk(text_event(f"t{events_written} ")))
                events_written += 1
                await asyncio.sleep(0.01)
        closed_at.append(await watcher)
        ex.keep_alive = False

    async with raw_server(handler) as server:
        transport = OpenAICompatibleTransport()
        state = StreamState()
        task = asyncio.create_task(transport.produce(entry(server.api_base), request(), state))
        try:
            if when == "mid-stream":
                await eventually(lambda: events_written >= 5 and state.started, "five events arrived")
            else:
                await eventually(lambda: reached, "the request reached the server")
            cancelled_at = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await eventually(lambda: closed_at, "the server saw the connection close")
        finally:
            await transport.close()
    assert closed_at[0] - cancelled_at < 5.0, f"the server saw the close {closed_at[0] - cancelled_at:.3f}s late"
    assert events_written < total


# --------------------------------------------------------------------------- keep-alive


@pytest.mark.parametrize("end", ["done", "done-in-last-chunk", "no-done"])
async def test_sequential_streams_reuse_one_connection(end: str) -> None:
    async def handler(ex: Exchange) -> None:
        n = ex.number
        events = [text_event(f"reply {n}"), finish_event()]
        if end == "done":
            await send_stream(ex, *events, DONE, pause_s=0.01)
        elif end == "done-in-last-chunk":  # [DONE] and the last chunk in one TCP write
            await ex.send(sse_head("chunked"), *(http_chunk(e) for e in events), http_chunk(DONE) + LAST_CHUNK)
        else:
            await send_stream(ex, *events)

    async with raw_server(handler) as server:
        transport = OpenAICompatibleTransport()
        try:
            texts = []
            for _ in range(2):
                state = StreamState()
                await transport.produce(entry(server.api_base), request(), state)
                delta = state.buffer.take()
                assert delta is not None and state.finish_reason == "stop"
                texts.append(delta.text)
        finally:
            await transport.close()
    assert texts == ["reply 1", "reply 2"]
    assert len(server.requests) == 2
    assert server.accepted == 1, f"{server.accepted} connections for 2 sequential streams"


# --------------------------------------------------------------------------- through the backend


@pytest.mark.parametrize("bad", ["malformed", "error-event"])
async def test_a_bad_event_in_the_same_read_as_text_never_duplicates_text_on_retry(bad: str) -> None:
    """Text and a bad event in one TCP read: the first token goes out before the rest of the
    read is parsed, so the text counts as started and the error follows it, with no retry.
    Had the parser raised before flushing, the backend would retry, and the retry's reply
    would be glued to the failed attempt's unsent text (or replace text already read)."""
    bad_event = (
        b"data: {not json\n\n" if bad == "malformed" else event({"error": {"message": "worker crashed", "code": 500}})
    )

    async def handler(ex: Exchange) -> None:
        if ex.number == 1:
            await ex.send(sse_head("chunked"), http_chunk(text_event("partial ") + bad_event) + LAST_CHUNK)
        else:
            await send_stream(ex, text_event("fresh reply"), finish_event(), DONE)

    written: list[pb.GenerateResponse] = []

    async def write(response: pb.GenerateResponse) -> None:
        written.append(response)

    async with raw_server(handler) as server:
        backend = StreamingBackend(num_retries=1, retry_base_s=0.0)
        failure: RemoteError | None = None
        try:
            await backend.generate(entry(server.api_base), request(), write)
        except RemoteError as exc:
            failure = exc
        finally:
            await backend.close()
    text = "".join(r.delta.text for r in written if r.HasField("delta"))
    assert failure is not None, f"retried after text was read; the client received {text!r}"
    assert (text, len(server.requests)) == ("partial ", 1), (text, failure)
