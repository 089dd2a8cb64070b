"""Contract tests: drive RemoteLLMInferenceEngine exactly the way exo's node does
(infer_prompt, sample, EOS check, forwarded ids into infer_tensor, on_token callbacks),
against a real sidecar process and a real upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exo_remote_engine.engine import codec
from exo_remote_engine.engine.target import RetryPolicy, SidecarTarget
from exo_remote_engine.engine.tokenizer import RemoteTokenizer
from exo_remote_engine.engine_adapter import RemoteLLMInferenceEngine
from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import SidecarProcess, free_port, start_sidecar_process

SLOW_CHUNKS = [f"t{i} " for i in range(3000)]


@dataclass(frozen=True)
class Shard:  # the fields exo's Shard has
    model_id: str
    start_layer: int = 0
    end_layer: int = 0
    n_layers: int = 1

    def is_first_layer(self) -> bool:
        return self.start_layer == 0

    def is_last_layer(self) -> bool:
        return self.end_layer == self.n_layers - 1


@pytest.fixture(scope="module")
def upstream_thread() -> Iterator[OpenAIUpstream]:
    scenarios = {
        "story": Scenario(chunks=["Once ", "upon a time, ", "a 🦊 met ", "a 狐狸."], usage=(9, 4)),
        # Distinct chunks: LiteLLM aborts a stream after 100 identical ones.
        "slow": Scenario(chunks=SLOW_CHUNKS, interval_s=0.01),
        "limited": Scenario(status=429, retry_after="0", error_message=f"slow down {PLANTED_KEY}"),
    }
    with OpenAIUpstream.in_thread(scenarios=scenarios) as up:
        yield up


@pytest.fixture(scope="module")
def sidecar_process(
    upstream_thread: OpenAIUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    workdir = tmp_path_factory.mktemp("engine")
    config = write_proxy_config(workdir / "config.yaml", upstream_thread.url, ["story", "slow", "limited", "echo"])
    sidecar = start_sidecar_process(config, workdir / "sidecar.log", env={"TEST_UPSTREAM_KEY": PLANTED_KEY})
    yield sidecar
    sidecar.stop()


@pytest.fixture
async def engine(sidecar_process: SidecarProcess) -> AsyncIterator[RemoteLLMInferenceEngine]:
    eng = RemoteLLMInferenceEngine(SidecarTarget(address=sidecar_process.address), idle_timeout_s=1.0)
    await eng.refresh_catalog()
    yield eng
    await eng.close()


def _prompt(text: str, **params: Any) -> str:
    # What exo's API does: its own tokenizer instance builds the prompt string.
    prompt = RemoteTokenizer().apply_chat_template([{"role": "user", "content": text}], params=params)
    assert isinstance(prompt, str)
    return prompt


async def drive(
    engine: RemoteLLMInferenceEngine,
    request_id: str,
    shard: Shard,
    prompt: str,
    max_tokens: int = 10_000,
    pause_after: int | None = None,
) -> list[int]:
    """exo's Node.process_prompt / process_inference_result loop for a one-node ring."""
    result, state = await engine.infer_prompt(request_id, shard, prompt, {})
    ids: list[int] = []
    while True:
        token = await engine.sample(result, temp=0.0)
        await engine.ensure_shard(shard)
        ids.append(int(token.item()))
        finished = ids[-1] == engine.tokenizer.eos_token_id or len(ids) >= max_tokens
        engine.on_token(request_id, [ids[-1]], finished)
        if finished or (pause_after is not None and len(ids) >= pause_after):
            return ids
        result, state = await engine.infer_tensor(request_id, shard, token.reshape(1, -1), state)


def _events(ids: list[int]) -> tuple[str, list[dict[str, Any]]]:
    pieces = codec.StreamDecoder().feed(ids)
    text = "".join(p for p in pieces if isinstance(p, str))
    return text, [json.loads(p) for p in pieces if isinstance(p, bytes)]


async def test_ids_decode_in_another_tokenizer_instance_with_eos_last(engine: RemoteLLMInferenceEngine) -> None:
    ids = await drive(engine, "r1", Shard("story"), _prompt("Tell me a story"))
    assert ids[-1] == codec.EOS_ID != 0
    assert ids.count(codec.EOS_ID) == 1
    expected = "Once upon a time, a 🦊 met a 狐狸."
    assert RemoteTokenizer().decode(ids) == expected, "a second instance decodes the same text"
    assert RemoteTokenizer().decode(np.array(ids)) == expected
    text, events = _events(ids)
    assert text == expected
    assert events == [
        {
            "type": "finished",
            "finish_reason": "stop",
            "model": "story",
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
        }
    ]
    text_ids = [i for i in ids if codec.decode_id(i)]
    chunks = ["Once ", "upon a time, ", "a 🦊 met ", "a 狐狸."]
    assert len(text_ids) <= sum(len(codec.encode_text(c)) for c in chunks), "packed at least per chunk"
    assert not engine._generations, "a finished request leaves nothing behind"


async def test_parameters_from_the_envelope_reach_the_provider(
    engine: RemoteLLMInferenceEngine, upstream_thread: OpenAIUpstream
) -> None:
    await drive(engine, "r2", Shard("echo"), _prompt("hi", max_tokens=7, stop=["x"], temperature=0.2))
    sent = upstream_thread.requests_for("echo")[-1].body
    assert sent is not None and (sent["max_tokens"], sent["stop"], sent["temperature"]) == (7, ["x"], 0.2)


async def test_exo_max_tokens_finish_cancels_the_upstream(
    engine: RemoteLLMInferenceEngine, upstream_thread: OpenAIUpstream
) -> None:
    ids = await drive(engine, "r3", Shard("slow"), _prompt("go"), max_tokens=5)
    stopped = time.monotonic()
    assert len(ids) == 5 and codec.EOS_ID not in ids
    record = await asyncio.to_thread(upstream_thread.wait_closed_sync, "slow", 15)
    # Promptly: the stream would run 30 s; 5 s is a loaded box's margin.
    assert record.client_disconnected and record.ended_at - stopped < 5.0, record


async def test_a_request_nobody_pulls_is_cancelled_by_the_watchdog(
    engine: RemoteLLMInferenceEngine, upstream_thread: OpenAIUpstream
) -> None:
    await drive(engine, "r4", Shard("slow"), _prompt("go"), pause_after=3)  # exo stops calling
    record = await asyncio.to_thread(upstream_thread.wait_closed_sync, "slow", 10)
    assert record.client_disconnected
    result, _ = await engine.infer_tensor("r4", Shard("slow"), np.array([[5]]))
    assert int(result.item()) == codec.EOS_ID, "a late pull ends exo's loop cleanly"


async def test_provider_error_before_first_delta_becomes_an_error_event(engine: RemoteLLMInferenceEngine) -> None:
    started = time.monotonic()
    ids = await drive(engine, "r5", Shard("limited"), _prompt("x"))
    text, events = _events(ids)
    assert text == "" and ids[-1] == codec.EOS_ID
    assert events[-1]["type"] == "error" and events[-1]["reason"] == "RATE_LIMITED" and events[-1]["status"] == 429
    assert PLANTED_KEY not in json.dumps(events)
    assert time.monotonic() - started < 15, "retries are bounded"


async def test_unavailable_sidecar_is_retried_then_reported() -> None:
    target = SidecarTarget(address=f"127.0.0.1:{free_port()}", retry=RetryPolicy(attempts=3, max_total_s=3))
    eng = RemoteLLMInferenceEngine(target)
    try:
        started = time.monotonic()
        ids = await drive(eng, "r6", Shard("story"), _prompt("x"))
        _, events = _events(ids)
        assert events[-1]["reason"] == "SIDECAR_UNAVAILABLE" and events[-1]["status"] == 503
        assert time.monotonic() - started < 10
    finally:
        await eng.close()


async def test_sidecar_killed_mid_stream_ends_the_request_without_duplicates(
    upstream_thread: OpenAIUpstream, tmp_path: Path
) -> None:
    config = write_proxy_config(tmp_path / "c.yaml", upstream_thread.url, ["slow"])
    sidecar = start_sidecar_process(config, tmp_path / "s.log", env={"TEST_UPSTREAM_KEY": PLANTED_KEY})
    eng = RemoteLLMInferenceEngine(SidecarTarget(address=sidecar.address))
    try:
        ids = await drive(eng, "r7", Shard("slow"), _prompt("go"), pause_after=20)
        os.kill(sidecar.process.pid, signal.SIGKILL)
        while ids[-1] != codec.EOS_ID:
            result, _ = await eng.infer_tensor("r7", Shard("slow"), np.array([[ids[-1]]]))
            ids.append(int(result.item()))
        text, events = _events(ids)
        assert text and "".join(SLOW_CHUNKS).startswith(text), "in order, nothing repeated or lost"
        assert events[-1]["type"] == "error" and events[-1]["reason"] in ("SIDECAR_UNAVAILABLE", "CANCELLED")
    finally:
        await eng.close()
        sidecar.stop()
