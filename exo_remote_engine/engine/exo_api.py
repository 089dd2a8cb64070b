"""OpenAI-faithful chat completions for remote models, inside exo's own API.

exo's handler drops max_tokens, stop and tool_choice, rewrites images, calls every
stream chunk ``chat.completion``, never sends usage or ``[DONE]``, and derives the finish
reason from EOS alone. For remote models this handler takes over the HTTP side while the
tokens still flow through exo's node and token loop: the prompt envelope carries the
request as sent, and the in-band control events carry the provider's finish reason,
usage, tool calls and errors back. Local models never reach this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.openai_chat import chat_body_to_request
from exo_remote_engine.engine import codec

# Request fields forwarded to the provider (exo's own parser drops all but temperature).
FORWARDED_PARAMS = (
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "tool_choice",
    "parallel_tool_calls",
)


def error_response(error: RemoteError) -> web.Response:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return web.json_response(error.to_openai_error(), status=error.http_status, headers=headers)


@dataclass
class _Collected:
    """What the control events said, and the text so far (for non-streamed replies)."""

    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: RemoteError | None = None

    def add_tool_fragment(self, event: Mapping[str, Any]) -> None:
        call = self.tool_calls.setdefault(
            int(event["index"]),
            {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if event.get("id"):
            call["id"] = event["id"]
        if event.get("name"):
            call["function"]["name"] = event["name"]
        call["function"]["arguments"] += event.get("arguments") or ""


def _error_from_event(event: Mapping[str, Any]) -> RemoteError:
    try:
        reason = Reason(event.get("reason", "INTERNAL"))
    except ValueError:
        reason = Reason.INTERNAL
    return RemoteError(reason, str(event.get("message", "remote model failed")), event.get("retry_after_s"))


_cancellations: set[asyncio.Future[None]] = set()
# How often a waiting handler checks that its client is still connected.
DISCONNECT_POLL_S = 0.1


async def _client_gone(request: web.Request) -> None:
    """Returns once the client's connection is closed (aiohttp clears the transport then)."""
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def _sse(event: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


class RemoteChatHandler:
    """Serves one chat completion for a remote model through exo's node."""

    def __init__(self, api: Any, engine: Any, exo_id: str) -> None:
        self.api = api
        self.engine = engine  # the local RemoteLLMInferenceEngine, or None on a relay node
        self.exo_id = exo_id
        self.request_id = str(uuid.uuid4())
        self.created = int(time.time())
        from exo import VERSION

        self.fingerprint = f"exo_{VERSION}"

    def cancel_upstream(self) -> None:
        """Stop the provider call wherever it runs: here directly, and on the node that
        serves the model through exo's opaque-status broadcast (which reaches every node)."""
        from exo_remote_engine.engine.cluster import CANCEL_TYPE

        if self.engine is not None:
            self.engine.cancel(self.request_id)
        status = json.dumps({"type": CANCEL_TYPE, "request_id": self.request_id})
        task = asyncio.ensure_future(self.api.node.broadcast_opaque_status(self.request_id, status))
        _cancellations.add(task)
        task.add_done_callback(_cancellations.discard)

    def _envelope(self, object_type: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{self.request_id}",
            "object": object_type,
            "created": self.created,
            "model": self.exo_id,
            "system_fingerprint": self.fingerprint,
        }

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk = self._envelope("chat.completion.chunk")
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        return _sse(chunk)

    async def handle(self, request: web.Request, body: Mapping[str, Any]) -> web.StreamResponse:
        from exo.models import build_base_shard

        messages = body.get("messages")
        try:
            # Validate everything the sidecar would, before exo's loop is involved.
            chat_body_to_request(body, request_id=self.request_id, model=self.exo_id)
        except RemoteError as exc:
            return error_response(exc)
        assert isinstance(messages, list)
        if self.api.system_prompt and not any(m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.api.system_prompt}, *messages]
        params = {k: body[k] for k in FORWARDED_PARAMS if body.get(k) is not None}
        tokenizer = self.engine.tokenizer if self.engine else None
        if tokenizer is None:
            from exo_remote_engine.engine.tokenizer import RemoteTokenizer

            tokenizer = RemoteTokenizer()
        prompt = tokenizer.apply_chat_template(messages, tools=body.get("tools"), params=params)
        shard = build_base_shard(self.exo_id, self.api.inference_engine_classname)
        if shard is None:
            return error_response(RemoteError(Reason.MODEL_NOT_FOUND, f"unknown model {self.exo_id!r}"))
        if self.api.on_chat_completion_request:  # exo's TUI shows the user's last message
            with contextlib.suppress(Exception):
                from exo_remote_engine.engine.tokenizer import PromptEnvelope

                text = PromptEnvelope(messages=list(messages)).last_user_text()
                self.api.on_chat_completion_request(self.request_id, None, text)
        stream = bool(body.get("stream"))
        options = body.get("stream_options") or {}
        include_usage = bool(isinstance(options, Mapping) and options.get("include_usage"))
        queue: asyncio.Queue[tuple[list[int], bool]] = self.api.token_queues[self.request_id]
        finished_cleanly = False
        # exo's aiohttp does not cancel a handler whose client went away, and a non-streamed
        # reply writes nothing until the end: watch the connection, or the provider keeps
        # generating (and billing) for nobody.
        serving = asyncio.ensure_future(self._serve(request, shard, prompt, stream, include_usage, queue))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait((serving, gone), return_when=asyncio.FIRST_COMPLETED)
            if not serving.done():
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
                return web.Response(status=499)  # nobody reads it
            response = serving.result()
            finished_cleanly = True
            return response
        except TimeoutError:
            return error_response(RemoteError(Reason.DEADLINE_EXCEEDED, "response generation timed out"))
        except RuntimeError as exc:  # the node that serves the model is not reachable
            return error_response(RemoteError(Reason.SIDECAR_UNAVAILABLE, str(exc)))
        finally:
            gone.cancel()
            if not serving.done():
                serving.cancel()
            self.api.token_queues.pop(self.request_id, None)
            if not finished_cleanly:
                self.cancel_upstream()

    async def _serve(
        self,
        request: web.Request,
        shard: Any,
        prompt: str | list[int],
        stream: bool,
        include_usage: bool,
        queue: asyncio.Queue[tuple[list[int], bool]],
    ) -> web.StreamResponse:
        """Run the prompt through exo's node and answer from its token queue."""
        await asyncio.wait_for(
            asyncio.shield(
                asyncio.create_task(self.api.node.process_prompt(shard, prompt, request_id=self.request_id))
            ),
            timeout=self.api.response_timeout,
        )
        if stream:
            return await self._stream(request, queue, include_usage)
        return await self._collect(queue)

    async def _next(self, queue: asyncio.Queue[tuple[list[int], bool]]) -> tuple[list[int], bool]:
        return await asyncio.wait_for(queue.get(), timeout=self.api.response_timeout)

    def _absorb(self, pieces: list[str | bytes], collected: _Collected) -> tuple[list[str], list[dict[str, Any]]]:
        """Split decoded pieces into text and tool-call deltas; record finish/usage/error."""
        texts: list[str] = []
        tools: list[dict[str, Any]] = []
        for piece in pieces:
            if isinstance(piece, str):
                texts.append(piece)
                continue
            event = json.loads(piece)
            kind = event.get("type")
            if kind == "tool_call":
                collected.add_tool_fragment(event)
                tool: dict[str, Any] = {"index": event["index"], "function": {"arguments": event.get("arguments", "")}}
                if event.get("id"):
                    tool["id"] = event["id"]
                    tool["type"] = "function"
                if event.get("name"):
                    tool["function"]["name"] = event["name"]
                tools.append(tool)
            elif kind == "finished":
                collected.finish_reason = event.get("finish_reason")
                collected.usage = event.get("usage")
            elif kind == "error":
                collected.error = _error_from_event(event)
        return texts, tools

    async def _stream(
        self, request: web.Request, queue: asyncio.Queue[tuple[list[int], bool]], include_usage: bool
    ) -> web.StreamResponse:
        decoder = codec.StreamDecoder()
        collected = _Collected()
        response: web.StreamResponse | None = None
        first = True
        try:
            while True:
                tokens, is_finished = await self._next(queue)
                texts, tools = self._absorb(decoder.feed(tokens), collected)
                if collected.error is not None and response is None:
                    return error_response(collected.error)
                if texts or tools:
                    if response is None:
                        response = await self._prepare(request)
                    delta: dict[str, Any] = {"role": "assistant"} if first else {}
                    first = False
                    if texts:
                        delta["content"] = "".join(texts)
                    if tools:
                        delta["tool_calls"] = tools
                    await response.write(self._chunk(delta))
                if is_finished:
                    break
            if response is None:
                response = await self._prepare(request)
            if collected.error is not None:
                payload = {"error": collected.error.to_openai_error()["error"]}
                await response.write(f"data: {json.dumps(payload)}\n\n".encode())
            else:
                reason = collected.finish_reason or self._fallback_reason(tokens)
                await response.write(self._chunk({"role": "assistant"} if first else {}, reason))
                if include_usage and collected.usage is not None:
                    usage_chunk = {**self._envelope("chat.completion.chunk"), "choices": [], "usage": collected.usage}
                    await response.write(_sse(usage_chunk))
            if not self._from_tinychat(request):
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        except ConnectionResetError:  # the client went away: stop paying for its tokens
            self.cancel_upstream()
            return response or web.StreamResponse(status=499)
        except asyncio.CancelledError:
            self.cancel_upstream()
            raise

    @staticmethod
    def _from_tinychat(request: web.Request) -> bool:
        """exo's own tinychat page JSON-parses every event and would fail on ``[DONE]``
        after a non-"stop" finish; every other client gets OpenAI's terminator."""
        referer = request.headers.get("Referer", "")
        return bool(referer) and referer.startswith(f"{request.scheme}://{request.host}/")

    async def _prepare(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        return response

    @staticmethod
    def _fallback_reason(tokens: list[int]) -> str:
        # No finished event: exo's own limit (--max-generate-tokens) or a cancelled stream.
        return "stop" if tokens and tokens[-1] == codec.EOS_ID else "length"

    async def _collect(self, queue: asyncio.Queue[tuple[list[int], bool]]) -> web.Response:
        decoder = codec.StreamDecoder()
        collected = _Collected()
        while True:
            tokens, is_finished = await self._next(queue)
            texts, _ = self._absorb(decoder.feed(tokens), collected)
            collected.text.extend(texts)
            if is_finished:
                break
        if collected.error is not None:
            return error_response(collected.error)
        content = "".join(collected.text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if collected.tool_calls:
            message["tool_calls"] = [collected.tool_calls[i] for i in sorted(collected.tool_calls)]
            message["content"] = content or None
        body: dict[str, Any] = {
            **self._envelope("chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": collected.finish_reason or self._fallback_reason(tokens),
                }
            ],
        }
        if collected.usage is not None:
            body["usage"] = collected.usage
        return web.json_response(body, dumps=lambda o: json.dumps(o, ensure_ascii=False))
