"""Cached-prompt and reasoning tokens end to end: the provider's usage details travel
through the wire contract to the client (exo's OpenAI usage) and into the ledger, and the
recorded cost equals ``litellm.completion_cost`` for the same usage; config overrides with
the cost map's names win over the map."""

from __future__ import annotations

import sqlite3

import litellm
import pytest
from litellm.types.utils import (
    CompletionTokensDetailsWrapper,
    ModelResponse,
    PromptTokensDetailsWrapper,
    Usage,
)

from exo_remote_engine.contract.openai_chat import usage_to_openai
from exo_remote_engine.server import RunningSidecar
from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.ledger.spend import cost_usd
from exo_remote_engine.sidecar.ledger.token_cost import TokenDetails
from tests.support.harness import chat_request, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.traffic import FakeClock, Sidecars, deployment

PROMPT, COMPLETION, CACHED, REASONING = 1000, 200, 800, 50


def _litellm_cost(model: str, provider: str, usage: Usage) -> float:
    response = ModelResponse(model=model, usage=usage)
    return float(litellm.completion_cost(completion_response=response, model=model, custom_llm_provider=provider))


def _openai_usage() -> Usage:
    return Usage(
        prompt_tokens=PROMPT,
        completion_tokens=COMPLETION,
        total_tokens=PROMPT + COMPLETION,
        prompt_tokens_details=PromptTokensDetailsWrapper(cached_tokens=CACHED),
        completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=REASONING),
    )


def _row(sidecar: RunningSidecar) -> tuple[float, int, int, int]:
    ledger = sidecar.servicer.accounting.ledger
    assert ledger is not None
    with sqlite3.connect(ledger.path) as db:
        rows = list(db.execute("SELECT cost_usd, prompt_tokens, cached_prompt_tokens, reasoning_tokens FROM requests"))
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize("override", [None, 0.0])
async def test_cached_and_reasoning_tokens_reach_the_client_and_the_ledger_at_litellms_price(
    upstream: OpenAIUpstream, sidecars: Sidecars, override: float | None
) -> None:
    upstream.scenarios["gpt-4o"] = Scenario(
        usage=(PROMPT, COMPLETION), cached_tokens=CACHED, reasoning_tokens=REASONING
    )
    params = {} if override is None else {"cache_read_input_token_cost": override}
    sidecar = await sidecars.start("model_list:\n" + deployment("m", "gpt-4o", upstream.url, **params), FakeClock())
    client = sidecar_client(sidecar.address)
    try:
        events = [e async for e in client.generate(chat_request("m"))]
    finally:
        await client.close()
    usage = events[-1].finished.usage
    assert (usage.cached_prompt_tokens, usage.reasoning_tokens) == (CACHED, REASONING)
    openai_usage = usage_to_openai(usage)  # what exo's OpenAI API answers
    assert openai_usage["prompt_tokens_details"] == {"cached_tokens": CACHED}
    assert openai_usage["completion_tokens_details"] == {"reasoning_tokens": REASONING}
    cost, prompt, cached, reasoning = _row(sidecar)
    assert (prompt, cached, reasoning) == (PROMPT, CACHED, REASONING)
    info = litellm.model_cost["gpt-4o"]
    uncached = PROMPT * info["input_cost_per_token"] + COMPLETION * info["output_cost_per_token"]
    if override is None:
        assert cost == pytest.approx(_litellm_cost("gpt-4o", "openai", _openai_usage()), rel=1e-12)
        assert cost < uncached, "cache reads are cheaper than fresh input"
    else:  # the operator's price for cache reads: free
        fresh = (PROMPT - CACHED) * info["input_cost_per_token"] + COMPLETION * info["output_cost_per_token"]
        assert cost == pytest.approx(fresh, rel=1e-12)


def test_anthropic_cache_reads_and_writes_cost_what_litellm_says() -> None:
    model = "claude-haiku-4-5"
    info = litellm.model_cost[model]
    assert info["cache_creation_input_token_cost"] > info["input_cost_per_token"] > info["cache_read_input_token_cost"]
    entry = ModelEntry(alias="c", litellm_model=f"anthropic/{model}", provider="anthropic")
    details = TokenDetails(cached_prompt_tokens=500, cache_creation_prompt_tokens=300)
    usage = Usage(
        prompt_tokens=PROMPT,
        completion_tokens=COMPLETION,
        total_tokens=PROMPT + COMPLETION,
        cache_creation_input_tokens=300,
        cache_read_input_tokens=500,
    )
    ours = cost_usd(entry, PROMPT, COMPLETION, details)
    assert ours == pytest.approx(_litellm_cost(model, "anthropic", usage), rel=1e-12)
    assert ours != pytest.approx(cost_usd(entry, PROMPT, COMPLETION), rel=1e-6), "the details change the price"
