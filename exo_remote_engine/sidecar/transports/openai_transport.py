"""The direct transport: OpenAI-compatible chat-completions streams read with aiohttp.

vLLM, llama.cpp, LM Studio, Ollama's ``/v1`` and any server a config names as
``openai/<model>`` (or ``hosted_vllm/<model>``) with an ``api_base`` speak OpenAI's wire
format, so LiteLLM has nothing to translate for them, yet its stream wrapper costs about
0.5 ms of CPU per chunk (the SSE parse itself is ~10 us). This reader sends the same body
LiteLLM would send and parses the SSE itself. Only deployments whose ``litellm_params``
are transport settings take it; anything else (custom params, other providers, the
embedded model) stays on LiteLLM, which remains the reference behaviour. Failures raise
the exception types of :mod:`~exo_remote_engine.sidecar.transports.provider_errors`, mapped through
the same table as LiteLLM's: an event that is malformed, or over the limits of
:mod:`~exo_remote_engine.sidecar.transports.upstream_limits`, is PROVIDER_UNAVAILABLE, as LiteLLM
answers for the same body.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from exo_remote_engine.contract.openai_chat import chat_completion_body
from exo_remote_engine.contract.redaction import SECRETS
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.transports.provider_errors import (
    ProviderConnectionError,
    ProviderProtocolError,
    ProviderStatusError,
    ProviderTimeoutError,
)
from exo_remote_engine.sidecar.transports.stream_types import StreamState
from exo_remote_engine.sidecar.transports.upstream_limits import MAX_EVENT_BYTES, MAX_EVENT_LINES, event_too_large

# LiteLLM provider -> the environment variable LiteLLM reads its key from.
_PROVIDER_KEY_ENV: dict[str, str] = {"openai": "OPENAI_API_KEY", "hosted_vllm": "HOSTED_VLLM_API_KEY"}
# litellm_params this transport understands; any other key sends the deployment to LiteLLM.
_TRANSPORT_PARAMS = frozenset({"api_base", "api_key", "timeout", "stream_timeout", "extra_headers"})
_MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True)
class Route:
    url: str
    model: str
    timeout_s: float
    headers: Mapping[str, str] = field(repr=False)
    proxy: str | None = field(default=None, repr=False)  # may carry credentials

    @functools.cached_property
    def client_timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s)


class OpenAICompatibleTransport:
    writes_inline = True

    def __init__(self, request_timeout_s: float = 600.0) -> None:
        self._default_timeout_s = request_timeout_s
        self._session: aiohttp.ClientSession | None = None
        # id(entry) -> (entry, the implicit key it was built with, its route): a route is
        # built once per deployment, not per request (URL parsing, headers, the proxy).
        self._routes: dict[int, tuple[ModelEntry, str | None, Route]] = {}

    def accepts(self, entry: ModelEntry) -> bool:
        return (
            entry.provider in _PROVIDER_KEY_ENV
            and bool(entry.params.get("api_base"))
            and _TRANSPORT_PARAMS.issuperset(entry.params)
        )

    def route(self, entry: ModelEntry) -> Route:
        params = entry.params
        prefix, sep, rest = entry.litellm_model.partition("/")
        model = rest if sep and prefix == entry.provider else entry.litellm_model
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        key = params.get("api_key") or os.environ.get(_PROVIDER_KEY_ENV[entry.provider])
        if key:
            SECRETS.add(key)  # taken implicitly from the environment, maybe: never echoed
            headers["Authorization"] = f"Bearer {key}"
        extra = {str(k): str(v) for k, v in (params.get("extra_headers") or {}).items()}
        SECRETS.add_all(extra.values())
        headers.update(extra)
        timeout = params.get("stream_timeout") or params.get("timeout") or self._default_timeout_s
        url, basic = _without_userinfo(f"{str(params['api_base']).rstrip('/')}/chat/completions")
        if basic:  # credentials in api_base win over a key, as httpx (LiteLLM's client) does it
            headers["Authorization"] = basic
        return Route(url, model, float(timeout), headers, _proxy_for(url))

    def _route(self, entry: ModelEntry) -> Route:
        """:meth:`route`, remembered per entry while the key it may take from the
        environment stays the same."""
        implicit = os.environ.get(_PROVIDER_KEY_ENV[entry.provider])
        cached = self._routes.get(id(entry))
        if cached is not None and cached[0] is entry and cached[1] == implicit:
            return cached[2]
        if len(self._routes) >= 256:  # entries come and go with discovery
            self._routes.clear()
        route = self.route(entry)
        self._routes[id(entry)] = (entry, implicit, route)
        return route

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No connection cap (the sidecar's policy bounds concurrency). Proxies from the
            # environment are honoured per route (see _proxy_for), not by aiohttp's
            # trust_env, which costs two thread-pool hops on every request.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def produce(self, entry: ModelEntry, request: pb.GenerateRequest, state: StreamState) -> None:
        route = self._route(entry)
        body = chat_completion_body(request)
        body.update(model=route.model, stream=True, stream_options={"include_usage": True})
        try:
            async with self._client().post(
                route.url,
                data=json.dumps(body).encode(),
                headers=dict(route.headers),
                timeout=route.client_timeout,
                proxy=route.proxy,
            ) as response:
                if response.status >= 400:
                    raw = await _read_error_body(response.content)
                    headers = {k.lower(): v for k, v in response.headers.items()}
                    raise ProviderStatusError(response.status, _error_message(raw), headers)
                try:
                    await _read_events(response.content, state)
                except BaseException:
                    response.close()  # mid-stream: drop the connection, never reuse it
                    raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise ProviderTimeoutError(f"no data for {route.timeout_s:g}s") from exc
        except aiohttp.ClientError as exc:
            raise ProviderConnectionError(f"connection to the provider failed ({type(exc).__name__})") from exc


def _without_userinfo(url: str) -> tuple[str, str | None]:
    """``url`` without ``user:password@`` and the Basic authorization it stood for
    (aiohttp refuses a URL with credentials next to an Authorization header)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    host = parts.netloc.rpartition("@")[2]
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


@functools.lru_cache(maxsize=256)
def _proxy_for(url: str) -> str | None:
    """The HTTP(S)_PROXY that applies to ``url`` (NO_PROXY honoured), as LiteLLM's httpx
    client would use it; looked up once per URL."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.hostname and urllib.request.proxy_bypass(parsed.hostname):
        return None
    return urllib.request.getproxies().get(parsed.scheme)


async def _read_events(content: aiohttp.StreamReader, state: StreamState) -> None:
    """Parse SSE ``data:`` events into ``state`` until ``[DONE]`` or the end of the body.
    After the first token, every event already received is absorbed before the writer is
    woken once: a burst becomes one delta, not one gRPC message per event. Linear in the
    bytes received, and every event within the limits of ``upstream_limits``."""
    partial: list[bytes] = []  # an unfinished line, in the blocks it arrived in
    partial_size = 0
    data: list[bytes] = []
    event_lines = event_size = 0
    done = False
    async for block in content.iter_any():
        if b"\n" not in block:
            partial.append(block)
            partial_size += len(block)
            if event_size + partial_size > MAX_EVENT_BYTES:
                raise ProviderProtocolError(event_too_large(0, event_size + partial_size))
            continue
        if partial:
            block = b"".join((*partial, block))
            partial.clear()
        # Line by line with find(), not split(): a hostile block of 200,000 lines costs
        # nothing past the line that breaks a limit.
        start = 0
        while (end := block.find(b"\n", start)) >= 0:
            line = block[start:end].rstrip(b"\r")
            start = end + 1
            if not line:
                if data:
                    done = _dispatch(b"\n".join(data), state)
                    data.clear()
                event_lines = event_size = 0
                if done:
                    break
                if not state.started and state.buffer:
                    await state.flush()  # the first token goes out before the rest is parsed
                continue
            event_lines += 1
            event_size += len(line)
            if event_lines > MAX_EVENT_LINES or event_size > MAX_EVENT_BYTES:
                raise ProviderProtocolError(event_too_large(event_lines, event_size))
            if line.startswith(b"data:"):
                data.append(line[5:].lstrip())
        tail = block[start:]
        partial_size = len(tail)
        if tail:
            partial.append(tail)
        if event_size + partial_size > MAX_EVENT_BYTES:
            raise ProviderProtocolError(event_too_large(0, event_size + partial_size))
        await state.flush()
        if done:
            break
    if not done:
        pending = b"".join(partial)
        if pending.startswith(b"data:"):
            data.append(pending[5:].lstrip())
        if data:
            _dispatch(b"\n".join(data), state)
            await state.flush()
    else:
        # Read the chunked terminator so the connection can be reused.
        async for _ in content.iter_any():
            pass


def _dispatch(payload: bytes, state: StreamState) -> bool:
    """Absorb one event; True at ``[DONE]``."""
    if payload == b"[DONE]":
        return True
    try:
        chunk = json.loads(payload)
    except ValueError as exc:
        raise ProviderProtocolError(f"the provider sent a malformed stream event (not JSON: {exc})") from None
    if not isinstance(chunk, dict):
        raise ProviderProtocolError(f"the provider sent a malformed stream event (a JSON {type(chunk).__name__})")
    error = chunk.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        raise ProviderStatusError(code if isinstance(code, int) else 500, str(message or "stream error"), {})
    try:
        _absorb(chunk, state)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        # A field of the wrong type or shape: the provider's fault, not ours (no INTERNAL).
        detail = f"{type(exc).__name__}: {exc}"
        raise ProviderProtocolError(f"the provider sent a malformed stream event ({detail})") from None
    return False


def _text(value: Any, field: str) -> str:
    if value.__class__ is str:
        return value  # type: ignore[no-any-return]
    raise TypeError(f"{field} is a {type(value).__name__}, not a string")


def _text_or_none(value: Any, field: str) -> str | None:
    return None if value is None else _text(value, field)


def _absorb(chunk: dict[str, Any], state: StreamState) -> None:
    buffer = state.buffer
    choices = chunk.get("choices")
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        if delta:
            content = delta.get("content")
            if content:
                buffer.add_text(_text(content, "content"))
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                buffer.add_reasoning(_text(reasoning, "reasoning"))
            calls = delta.get("tool_calls")
            if calls:
                state.saw_tool_calls = True
                for call in calls:
                    fn = call.get("function") or {}
                    index = call.get("index") or 0
                    if not isinstance(index, int):
                        raise TypeError("tool call index is not an integer")
                    buffer.add_tool(
                        index,
                        _text_or_none(call.get("id"), "tool call id"),
                        _text_or_none(fn.get("name"), "tool name"),
                        _text_or_none(fn.get("arguments"), "tool arguments"),
                    )
        if choice.get("finish_reason"):
            state.finish_reason = str(choice["finish_reason"])
    usage = chunk.get("usage")
    if usage:
        state.usage = pb.Usage(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_prompt_tokens=int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
            reasoning_tokens=int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0),
        )
    model = chunk.get("model")
    if model:
        state.model = _text(model, "model")


async def _read_error_body(content: aiohttp.StreamReader) -> bytes:
    """The whole error body up to a cap (``read(n)`` alone stops at what is buffered)."""
    parts: list[bytes] = []
    size = 0
    while size < _MAX_ERROR_BODY:
        part = await content.read(_MAX_ERROR_BODY - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def _error_message(raw: bytes) -> str:
    """The provider's own error message (OpenAI's ``{"error": {"message": ...}}`` shape
    or plain text); provider_errors decides whether a client may see it."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    if isinstance(payload, dict) and payload.get("message"):
        return str(payload["message"])
    return text
