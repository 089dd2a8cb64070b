"""What the embedded default says: SmolLM2-135M-Instruct, with its own ChatML template and
stop token, answers a plain question and stops by itself; a request without max_tokens
is capped by the default instead of running to the context limit; Gemma stays selectable.
A real sidecar with the real model on llama.cpp (the file fetched by scripts/bootstrap.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.embedded.model import DEFAULT_ALIAS, EmbeddedModelSettings, local_model_available
from exo_remote_engine.sidecar.embedded.packaged import GEMMA
from exo_remote_engine.sidecar.serving.settings import parse_args
from tests.support.harness import chat_request, sidecar_client
from tests.support.processes import REPO

needs_model = pytest.mark.skipif(
    not local_model_available(), reason="needs the [local] extra and the model file (scripts/bootstrap.sh fetches it)"
)
CAP = 24  # a small default max_tokens so the capped reply is cheap here


def _embedded(argv: list[str], environ: dict[str, str]) -> EmbeddedModelSettings | None:
    return SidecarSettings.from_args(parse_args(argv, environ), environ).embedded_model


@pytest.fixture
async def sidecar() -> AsyncIterator[RunningSidecar]:
    embedded = EmbeddedModelSettings(ctx=1024, parallel=1, max_tokens=CAP)
    running = await start_sidecar(SidecarSettings(listen="127.0.0.1:0", embedded_model=embedded))
    try:
        yield running
    finally:
        await running.stop(grace_s=None)


async def _ask(running: RunningSidecar, prompt: str, **params: object) -> tuple[str, pb.Finished]:
    client = sidecar_client(running.address, deadline_s=120)
    try:
        events = [e async for e in client.generate(chat_request(DEFAULT_ALIAS, prompt, "q-1", **params))]
    finally:
        await client.close()
    assert events[-1].HasField("finished"), events[-1]
    return "".join(e.delta.text for e in events if e.HasField("delta")), events[-1].finished


@needs_model
@pytest.mark.timeout(180)
async def test_capital_of_france_is_paris_and_the_model_stops_by_itself(sidecar: RunningSidecar) -> None:
    assert DEFAULT_ALIAS == "smollm2-135m-instruct"
    text, finished = await _ask(sidecar, "What is the capital of France?", temperature=0)
    print(f"reply: {text!r} ({finished.usage.completion_tokens} tokens)")
    assert "Paris" in text
    assert finished.finish_reason == pb.FINISH_REASON_STOP, "the model's own stop token ended it"
    assert 0 < finished.usage.completion_tokens < CAP
    assert "<|im_end|>" not in text and "<|im_start|>" not in text, "template tokens never leak"


@needs_model
@pytest.mark.timeout(180)
async def test_a_request_without_max_tokens_ends_at_the_default(sidecar: RunningSidecar) -> None:
    prompt = "Write a very long, detailed story about a lighthouse keeper, chapter after chapter."
    text, finished = await _ask(sidecar, prompt)
    assert text.strip()
    # Either the model ends its story by itself or the default cap ends it: never the context.
    assert 0 < finished.usage.completion_tokens <= CAP
    if finished.finish_reason == pb.FINISH_REASON_LENGTH:
        assert finished.usage.completion_tokens == CAP
    # A request naming a larger max_tokens still gets it: the default is not a ceiling.
    _, longer = await _ask(sidecar, prompt, max_tokens=CAP + 16)
    assert longer.usage.completion_tokens > CAP or longer.finish_reason == pb.FINISH_REASON_STOP


def test_gemma_stays_selectable_by_name_and_variable() -> None:
    if not local_model_available(GEMMA.alias):
        pytest.skip("needs the [gemma] extra")
    chosen = _embedded(["--embedded-model", GEMMA.alias], {})
    assert chosen is not None and chosen.alias == GEMMA.alias and chosen.model_path is None
    by_variable = _embedded([], {"EXO_REMOTE_EMBEDDED_MODEL": GEMMA.alias})
    assert by_variable is not None and by_variable.alias == GEMMA.alias
    default = _embedded([], {})
    assert default is None or default.alias == DEFAULT_ALIAS


@pytest.mark.timeout(60)
def test_an_unknown_model_name_is_refused_naming_the_choices(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exo_remote_engine.server", "--listen", "127.0.0.1:0", "--no-discover",
         "--embedded-model", "llama-9000"],
        capture_output=True, text=True, timeout=50, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "llama-9000" in result.stderr and "smollm2-135m-instruct" in result.stderr
    assert "gemma-3-270m" in result.stderr
