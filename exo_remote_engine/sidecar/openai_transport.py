"""The direct transport: OpenAI-compatible chat-completions streams read with aiohttp.

vLLM, llama.cpp, LM Studio, Ollama's ``/v1`` and any server a config names as
``openai/<model>`` (or ``hosted_vllm/<model>``) with an ``api_base`` speak OpenAI's wire
format, so LiteLLM has nothing to translate for them, yet its stream wrapper costs about
0.5 ms of CPU per chunk (the SSE parse itself is ~10 us). This reader sends the same body
LiteLLM would send and parses the SSE itself. Only deployments whose ``litellm_params``
are transport settings take it; anything else (custom params, other providers, the
embedded model) stays on LiteLLM, which remains the reference behaviour. Failures raise
the exception types of :mod:`~exo_remote_engine.sidecar.provider_errors`, mapped through
the same table as LiteLLM's.
"""

from __future__ import annotations

import functools
import json
import os
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.openai_wire import chat_completion_body
from exo_remote_engine.sidecar.config import ModelEntry
from exo_remote_engine.sidecar.provider_errors import (
    ProviderConnectionError,
    ProviderStatusError,
    ProviderTimeoutError,
)
from exo_remote_engine.sidecar.streaming import StreamState

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


class OpenAICompatibleTransport:
    writes_inline = True

    def __init__(self, request_timeout_s: float = 600.0) -> None:
        self._default_timeout_s = request_timeout_s
        self._session: aiohttp.ClientSession | None = None

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
            headers["Authorization"] = f"Bearer {key}"
        headers.update({str(k): str(v) for k, v in (params.get("extra_headers") or {}).items()})
        timeout = params.get("stream_timeout") or params.get("timeout") or self._default_timeout_s
        url = f"{str(params['api_base']).rstrip('/')}/chat/completions"
        return Route(url, model, float(timeout), headers, _proxy_for(url))

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
        route = self.route(entry)
        body = chat_completion_body(request)
        body.update(model=route.model, stream=True, stream_options={"include_usage": True})
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=route.timeout_s, sock_read=route.timeout_s)
        try:
            async with self._client().post(
                route.url,
                data=json.dumps(body).encode(),
                headers=dict(route.headers),
                timeout=timeout,
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
    woken once: a burst becomes one delta, not one gRPC message per event."""
    pending = b""
    data: list[bytes] = []
    done = False
    async for block in content.iter_any():
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        for line in lines:
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                data.append(line[5:].lstrip())
            elif not line and data:
                done = _dispatch(b"\n".join(data), state)
                data.clear()
                if done:
                    break
                if not state.started and state.buffer:
                    await state.flush()  # the first token goes out before the rest is parsed
        await state.flush()
        if done:
            break
    if not done:
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
    except ValueError:
        raise ProviderConnectionError("the provider sent a malformed stream event") from None
    if not isinstance(chunk, dict):
        raise ProviderConnectionError("the provider sent a malformed stream event")
    error = chunk.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        raise ProviderStatusError(code if isinstance(code, int) else 500, str(message or "stream error"), {})
    _absorb(chunk, state)
    return False


def _absorb(chunk: dict[str, Any], state: StreamState) -> None:
    buffer = state.buffer
    choices = chunk.get("choices")
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        if delta:
            content = delta.get("content")
            if content:
                buffer.add_text(content)
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                buffer.add_reasoning(reasoning)
            calls = delta.get("tool_calls")
            if calls:
                state.saw_tool_calls = True
                for call in calls:
                    fn = call.get("function") or {}
                    buffer.add_tool(call.get("index") or 0, call.get("id"), fn.get("name"), fn.get("arguments"))
        if choice.get("finish_reason"):
            state.finish_reason = choice["finish_reason"]
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
        state.model = model


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
