"""The fake OpenAI upstream, checked through real LiteLLM (and a few raw HTTP reads)."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import litellm
import litellm.exceptions as litellm_exc
import pytest
from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper
from litellm.types.utils import ModelResponse, ModelResponseStream

from tests.support.openai_upstream import (
    MALFORMED_FRAME,
    OpenAIUpstream,
    Scenario,
    ToolCallSpec,
)

API_KEY = "sk-test-upstream-0123456789"
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "hello there"}]
TEST_BUDGET_S = 10.0
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with OpenAIUpstream() as up:
        yield up


async def open_stream(up: OpenAIUpstream, model: str, **kwargs: Any) -> CustomStreamWrapper:
    response = await litellm.acompletion(
        model=f"openai/{model}",
        messages=kwargs.pop("messages", MESSAGES),
        api_base=f"{up.url}/v1",
        api_key=API_KEY,
        stream=True,
        stream_options={"include_usage": True},
        num_retries=0,
        max_retries=0,
        timeout=kwargs.pop("timeout", TEST_BUDGET_S),
        **kwargs,
    )
    assert isinstance(response, CustomStreamWrapper)
    return response


async def collect(up: OpenAIUpstream, model: str, **kwargs: Any) -> list[ModelResponseStream]:
    stream = await open_stream(up, model, **kwargs)
    return [chunk async for chunk in stream]


async def aclose(stream: Any) -> None:
    """``CustomStreamWrapper.aclose`` is untyped."""
    await stream.aclose()


def text_of(chunks: list[ModelResponseStream]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def finish_reasons(chunks: list[ModelResponseStream]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def usage_of(chunks: list[ModelResponseStream]) -> Any:
    usages = [u for c in chunks if (u := getattr(c, "usage", None)) is not None]
    assert len(usages) == 1, usages
    return usages[0]


async def test_streamed_text_arrives_complete_in_order(upstream: OpenAIUpstream) -> None:
    words = [f"w{i} " for i in range(40)]
    upstream.scenarios["text"] = Scenario(chunks=words, finish_reason="length", usage=(17, 40), cached_tokens=5)
    async with asyncio.timeout(TEST_BUDGET_S):
        chunks = await collect(upstream, "text")
        record = await upstream.wait_closed("text", timeout=2)

    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == words
    assert finish_reasons(chunks) == ["length"]
    usage = usage_of(chunks)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (17, 40, 57)
    assert usage.prompt_tokens_details.cached_tokens == 5
    assert record.outcome == "completed"
    assert record.stream and record.chunks_written == 40


async def test_default_usage_and_reported_model(upstream: OpenAIUpstream) -> None:
    upstream.scenarios["alias"] = Scenario(chunks=["a", "b", "c"], model_reported="gpt-4o-2024")
    async with asyncio.timeout(TEST_BUDGET_S):
        chunks = await collect(upstream, "alias")
    usage = usage_of(chunks)
    assert (usage.prompt_tokens, usage.completion_tokens) == (11, 3)
    assert text_of(chunks) == "abc"
    # LiteLLM stamps streamed chunks with the requested model; the upstream's "model" field
    # survives only in the hidden params (non-streamed responses do carry it in .model).
    assert {c.model for c in chunks} == {"alias"}
    assert chunks[0]._hidden_params["provider_response_model"] == "gpt-4o-2024"


async def test_tool_call_fragments_reassemble(upstream: OpenAIUpstream) -> None:
    calls = [
        ToolCallSpec("call_abc", "get_weather", json.dumps({"city": "Paris", "unit": "C"})),
        ToolCallSpec("call_def", "lookup", json.dumps({"ids": [1, 2, 3], "deep": {"x": None}})),
    ]
    upstream.scenarios["tools"] = Scenario(chunks=["Let me check."], tool_calls=calls, finish_reason="tool_calls")
    async with asyncio.timeout(TEST_BUDGET_S):
        chunks = await collect(upstream, "tools")

    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    fragments = 0
    for chunk in chunks:
        if not chunk.choices:
            continue
        deltas: list[Any] = chunk.choices[0].delta.tool_calls or []
        for call in deltas:
            fragments += 1
            if call.id:
                ids[call.index] = call.id
            if call.function.name:
                names[call.index] = call.function.name
            arguments[call.index] = arguments.get(call.index, "") + (call.function.arguments or "")
    assert fragments > 2 * len(calls)  # really streamed in pieces
    assert ids == {0: "call_abc", 1: "call_def"}
    assert names == {0: "get_weather", 1: "lookup"}
    assert {i: json.loads(a) for i, a in arguments.items()} == {i: json.loads(c.arguments) for i, c in enumerate(calls)}
    assert text_of(chunks) == "Let me check."
    assert finish_reasons(chunks) == ["tool_calls"]

    rebuilt = litellm.stream_chunk_builder(chunks)
    assert isinstance(rebuilt, ModelResponse)
    rebuilt_calls: list[Any] = rebuilt.choices[0].message.tool_calls or []
    assert [(t.id, t.function.name, json.loads(t.function.arguments)) for t in rebuilt_calls] == [
        (c.id, c.name, json.loads(c.arguments)) for c in calls
    ]


async def test_non_stream_completion(upstream: OpenAIUpstream) -> None:
    upstream.scenarios["plain"] = Scenario(
        chunks=["Hello", " you"],
        tool_calls=[ToolCallSpec("call_1", "f", '{"a": 1}')],
        finish_reason="tool_calls",
        usage=(3, 4),
    )
    async with asyncio.timeout(TEST_BUDGET_S):
        response = await litellm.acompletion(
            model="openai/plain",
            messages=MESSAGES,
            api_base=f"{upstream.url}/v1",
            api_key=API_KEY,
            num_retries=0,
            max_retries=0,
        )
    assert isinstance(response, ModelResponse)
    choice = response.choices[0]
    assert choice.message.content == "Hello you"
    assert choice.finish_reason == "tool_calls"
    tool_calls: list[Any] = choice.message.tool_calls or []
    assert [(t.id, t.function.name, t.function.arguments) for t in tool_calls] == [("call_1", "f", '{"a": 1}')]
    usage: Any = getattr(response, "usage", None)
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 4)


async def test_echo_mode_for_unknown_models(upstream: OpenAIUpstream) -> None:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "say this back"}]},
    ]
    async with asyncio.timeout(TEST_BUDGET_S):
        chunks = await collect(upstream, "anything", messages=messages)
    assert text_of(chunks) == "echo: say this back"
    assert finish_reasons(chunks) == ["stop"]


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (
            Scenario(status=401, error_message=f"Incorrect API key provided: {API_KEY[:12]}..."),
            litellm_exc.AuthenticationError,
        ),
        (Scenario(status=429, retry_after="7"), litellm_exc.RateLimitError),
        (Scenario(status=500), (litellm_exc.InternalServerError, litellm_exc.APIError)),
    ],
    ids=["401", "429", "500"],
)
async def test_error_statuses_map_to_litellm_exceptions(
    upstream: OpenAIUpstream,
    scenario: Scenario,
    expected: type[Exception] | tuple[type[Exception], ...],
) -> None:
    upstream.scenarios["err"] = scenario
    async with asyncio.timeout(TEST_BUDGET_S):
        with pytest.raises(expected) as caught:
            await collect(upstream, "err")
        record = await upstream.wait_closed("err", timeout=2)
    assert record.outcome == "error"
    assert len(upstream.requests_for("err")) == 1  # no SDK or LiteLLM retries
    exc: Any = caught.value
    assert exc.status_code == scenario.status
    if scenario.error_message:
        assert scenario.error_message in str(exc)
    if scenario.retry_after is not None:
        # LiteLLM's exception carries a synthetic httpx response; the real headers are here.
        assert exc.litellm_response_headers["retry-after"] == scenario.retry_after


async def test_error_body_has_openai_shape(upstream: OpenAIUpstream) -> None:
    upstream.scenarios["limited"] = Scenario(status=429, retry_after="3", error_message="slow down")
    async with asyncio.timeout(TEST_BUDGET_S), aiohttp.ClientSession() as session:
        async with session.post(
            f"{upstream.url}/v1/chat/completions", json={"model": "limited", "messages": MESSAGES}
        ) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "3"
            body = await resp.json()
    assert body == {
        "error": {
            "message": "slow down",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


async def test_raw_sse_and_models_listing(upstream: OpenAIUpstream) -> None:
    upstream.scenarios["raw"] = Scenario(chunks=["x", "y"])
    async with asyncio.timeout(TEST_BUDGET_S), aiohttp.ClientSession() as session:
        async with session.get(f"{upstream.url}/v1/models") as resp:
            listing = await resp.json()
        async with session.post(
            f"{upstream.url}/v1/chat/completions",
            json={
                "model": "raw",
                "messages": MESSAGES,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = (await resp.read()).decode()
    assert listing == {
        "object": "list",
        "data": [{"id": "raw", "object": "model", "created": 0, "owned_by": "test"}],
    }
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" and p["model"] == "raw" for p in payloads)
    assert [p["choices"][0]["delta"] for p in payloads[:3]] == [
        {"role": "assistant", "content": "x"},
        {"content": "y"},
        {},
    ]
    assert payloads[2]["choices"][0]["finish_reason"] == "stop"
    assert payloads[3]["choices"] == []
    assert payloads[3]["usage"]["total_tokens"] == 13


async def test_client_aclose_mid_stream_is_noticed(upstream: OpenAIUpstream) -> None:
    upstream.scenarios["slow"] = Scenario(chunks=["tok "] * 200, interval_s=0.05)
    async with asyncio.timeout(TEST_BUDGET_S):
        stream = await open_stream(upstream, "slow")
        received = 0
        async for chunk in stream:
            received += bool(chunk.choices and chunk.choices[0].delta.content)
            if received == 3:
                break
        closed_at = time.monotonic()
        await aclose(stream)
        record = await upstream.wait_closed("slow", timeout=1.0)
    assert record.outcome == "disconnected" and record.client_disconnected
    assert record.ended_at - closed_at < 1.0
    assert 3 <= record.chunks_written < 10


async def test_cancelling_the_consumer_task_is_noticed(upstream: OpenAIUpstream) -> None:
    upstream.scenarios["slow"] = Scenario(chunks=["tok "] * 200, interval_s=0.05)
    got_some = asyncio.Event()

    async def consume() -> None:
        stream = await open_stream(upstream, "slow")
        async for _ in stream:
            got_some.set()

    async with asyncio.timeout(TEST_BUDGET_S):
        task = asyncio.create_task(consume())
        await got_some.wait()
        await asyncio.sleep(0.12)
        cancelled_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        record = await upstream.wait_closed("slow", timeout=1.0)
    assert record.outcome == "disconnected"
    assert record.ended_at - cancelled_at < 1.0
    assert record.chunks_written < 20


async def test_stream_timing_is_fixed_rate(upstream: OpenAIUpstream) -> None:
    upstream.scenarios["paced"] = Scenario(chunks=["t"] * 10, interval_s=0.02)
    async with asyncio.timeout(TEST_BUDGET_S):
        started = time.monotonic()
        chunks = await collect(upstream, "paced")
        elapsed = time.monotonic() - started
    assert text_of(chunks) == "t" * 10
    assert 0.19 <= elapsed < 2.0  # tail goes out at 10 * 0.02 s


async def test_recorded_requests_show_sampling_params(upstream: OpenAIUpstream) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    async with asyncio.timeout(TEST_BUDGET_S):
        await collect(
            upstream,
            "params",
            max_tokens=33,
            temperature=0.25,
            stop=["\n\n", "END"],
            tools=tools,
            user="u-1",
        )
    [request] = upstream.requests_for("params")
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    body = request.body
    assert body is not None
    assert body["max_tokens"] == 33
    assert body["temperature"] == 0.25
    assert body["stop"] == ["\n\n", "END"]
    assert body["tools"] == tools
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == MESSAGES


async def test_dropped_connection_fails_the_stream(upstream: OpenAIUpstream) -> None:
    upstream.scenarios["drop"] = Scenario(chunks=list("abcdef"), drop_after_chunks=3)
    received: list[str] = []
    async with asyncio.timeout(TEST_BUDGET_S):
        stream = await open_stream(upstream, "drop")
        with pytest.raises((litellm_exc.APIConnectionError, litellm_exc.ServiceUnavailableError)):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
        record = await upstream.wait_closed("drop", timeout=2)
    assert "".join(received) == "abc"
    assert (record.outcome, record.chunks_written) == ("dropped", 3)


async def test_malformed_line_fails_the_stream(upstream: OpenAIUpstream) -> None:
    assert not MALFORMED_FRAME.startswith(b"data: [")
    upstream.scenarios["bad"] = Scenario(chunks=list("abcdef"), malformed_after_chunks=2)
    received: list[str] = []
    async with asyncio.timeout(TEST_BUDGET_S):
        stream = await open_stream(upstream, "bad")
        with pytest.raises((litellm_exc.APIConnectionError, litellm_exc.ServiceUnavailableError)):
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(received) == "ab"


async def test_stall_before_first_byte_hits_client_timeout(upstream: OpenAIUpstream) -> None:
    upstream.scenarios["stall"] = Scenario(stall_before_first_byte_s=5.0)
    async with asyncio.timeout(TEST_BUDGET_S):
        with pytest.raises(litellm_exc.Timeout):
            await collect(upstream, "stall", timeout=0.5)
        record = await upstream.wait_closed("stall", timeout=2)
    assert (record.outcome, record.chunks_written) == ("disconnected", 0)


def test_in_thread_runner_with_sync_litellm() -> None:
    with OpenAIUpstream.in_thread({"sync": Scenario(chunks=["one", " two"])}) as up:
        stream = litellm.completion(
            model="openai/sync",
            messages=MESSAGES,
            api_base=f"{up.url}/v1",
            api_key=API_KEY,
            stream=True,
            num_retries=0,
            max_retries=0,
            timeout=TEST_BUDGET_S,
        )
        assert isinstance(stream, CustomStreamWrapper)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        record = up.wait_closed_sync("sync", timeout=2)
    assert text == "one two"
    assert record.outcome == "completed"


async def test_in_thread_runner_awaited_from_another_loop() -> None:
    with OpenAIUpstream.in_thread({"x": Scenario(chunks=["x"] * 5, interval_s=0.01)}) as up:
        async with asyncio.timeout(TEST_BUDGET_S):
            chunks = await collect(up, "x")
            record = await up.wait_closed("x", timeout=2)
            with pytest.raises(TimeoutError):
                await up.wait_closed("x", timeout=0.05)  # each record is returned once
    assert text_of(chunks) == "xxxxx"
    assert record.chunks_written == 5


async def test_command_line_entry_serves_default_scenario() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.openai_upstream",
            "--port",
            "0",
            "--chunks",
            "4",
            "--interval-s",
            "0.001",
            "--chunk-text",
            "hi ",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 15)).strip()
        assert url.startswith("http://127.0.0.1:")
        response = await asyncio.wait_for(
            litellm.acompletion(
                model="openai/whatever",
                messages=MESSAGES,
                api_base=f"{url}/v1",
                api_key=API_KEY,
                num_retries=0,
                max_retries=0,
            ),
            TEST_BUDGET_S,
        )
        assert isinstance(response, ModelResponse)
        assert response.choices[0].message.content == "hi hi hi hi "
    finally:
        proc.terminate()
        returncode = proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
    assert returncode == 0
