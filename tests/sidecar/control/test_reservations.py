"""Budget reservations in one process (sidecar/control/budgets.py), the reply cut at them
(sidecar/control/reply_limit.py) and the deployments a request's reservation is priced over
(``Servicer._chargeable``: its group and every fallback that may serve it, context-window
fallbacks included); across hosts they are tested in tests/adversarial/test_tenant_budgets.py
against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.loader import NodeQuota
from exo_remote_engine.sidecar.control.budgets import Budgets, plan
from exo_remote_engine.sidecar.control.reply_limit import clip_delta
from exo_remote_engine.sidecar.ledger.spend import Ledger
from exo_remote_engine.sidecar.ledger.token_estimates import delta_tokens, estimate_text_tokens, prompt_bound
from tests.support.harness import chat_request
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.tenants import ATTACKER, CONTEXT_ERROR, VICTIM, Tenants, ledger_rows, tenant_config
from tests.support.traffic import FakeClock


def test_plan_clamps_the_output_to_what_is_left() -> None:
    assert plan(1.0, 0.001, 0.01, 100, 1000) == (90, pytest.approx(1.0))  # 0.1 prompt + 90 x 0.01
    assert plan(1.0, 0.001, 0.01, 100, 20) == (20, pytest.approx(0.3))  # max_tokens fits: kept
    assert plan(0.105, 0.001, 0.01, 100, 20) is None, "the prompt fits, not one output token"
    assert plan(0.05, 0.001, 0.01, 100, 20) is None, "not even the prompt fits"
    assert plan(0.0, 0.0, 0.0, 100, 20) == (20, 0.0), "a free model always fits"


def test_plan_never_exceeds_what_is_left_despite_rounding() -> None:
    for left in (0.1, 0.3, 1e-5, 7.000000001, 123.456):
        planned = plan(left, 1.5e-7, 6e-7, 26, 10**9)
        assert planned is not None
        tokens, cost = planned
        assert cost <= left and math.isclose(cost, 26 * 1.5e-7 + tokens * 6e-7)


def test_a_delta_is_clipped_to_the_room_left() -> None:
    delta = pb.Delta(text="word " * 100, reasoning_text="think " * 10)
    delta.tool_calls.append(pb.ToolCallDelta(index=0, id="c", name="lookup", arguments_fragment='{"q": 1}'))
    clipped = clip_delta(delta, 25)
    assert delta_tokens(clipped) <= 25 and clipped.text == ("word " * 100)[:100]
    assert clipped.reasoning_text == "" and not clipped.tool_calls
    assert clip_delta(delta, 0) == pb.Delta()
    cjk = clip_delta(pb.Delta(text="你好世界" * 10), 6)
    assert cjk.text == "你好世界" and estimate_text_tokens(cjk.text) == 6
    assert delta_tokens(clip_delta(delta, 10_000)) == delta_tokens(delta)


@pytest.fixture
def budgets(tmp_path: Path) -> Budgets:
    quotas = {"n": NodeQuota(max_budget=1.0, budget_duration="1d")}
    return Budgets(quotas, Ledger.open(tmp_path), FakeClock())


async def test_concurrent_reservations_never_hold_more_than_the_budget(budgets: Budgets) -> None:
    async def reserve() -> object:
        try:
            return await budgets.reserve("n", 0.001, 0.01, 100, 20, 60)
        except RemoteError as exc:
            return exc

    results = await asyncio.gather(*(reserve() for _ in range(10)))
    held = [r for r in results if not isinstance(r, RemoteError)]
    refused = [r for r in results if isinstance(r, RemoteError)]
    assert len(held) == 3 and sum(r.cost_usd for r in held) <= 1.0  # type: ignore[union-attr]
    assert [r.output_tokens for r in held] == [20, 20, 20]  # type: ignore[union-attr]
    assert len(refused) == 7 and {r.reason for r in refused} == {Reason.BUDGET_EXCEEDED}
    assert "not even a minimal request fits" in refused[0].message
    # (the 4th finds 0.1 left: the prompt's cost exactly, not one output token more)
    budgets.release(held[0])  # type: ignore[arg-type]
    budgets.add("n", 0.05)  # the charge that replaces it
    again = await budgets.reserve("n", 0.001, 0.01, 100, 20, 60)
    assert again is not None and again.output_tokens == 20
    with pytest.raises(RemoteError):  # 0.05 + 3 x 0.3 held: 0.05 left, less than the prompt
        await budgets.reserve("n", 0.001, 0.01, 100, 20, 60)
    budgets.release(held[1])  # type: ignore[arg-type]  # (a request charged nothing)
    clamped = await budgets.reserve("n", 0.001, 0.01, 100, 1000, 60)
    assert clamped is not None and clamped.output_tokens in (24, 25), "0.35 left: the prompt (0.1) and 25 tokens"
    assert clamped.cost_usd <= 0.35 + 1e-12  # (floating point may round one token away, never add one)
    assert await budgets.reserve("other", 0.001, 0.01, 100, 20, 60) is None, "no budget, nothing held"


# A cheap model whose context-window fallback costs 100,000 times more: a prompt too long for
# the cheap one is served (and charged) at the large one's price, so it is reserved at it.
CHEAP, LARGE = (1e-9, 1e-9), (1e-4, 1e-4)
OVERSIZED = "OVERSIZED-PROMPT " + "x" * 40
TIGHT_BUDGET = 0.001  # the oversized prompt alone costs more at the large price (about 0.008)
ROOMY_BUDGET = 0.05  # the prompt and a few hundred output tokens at the large price


def _context_fallback_config(upstream: OpenAIUpstream) -> str:
    upstream.by_prompt.append(
        ("cheap", OVERSIZED, Scenario(status=400, error_message=CONTEXT_ERROR, error_code="context_length_exceeded"))
    )
    upstream.scenarios["large"] = Scenario(chunks=["tok "] * 30)  # usage (11, 30): 0.0041 USD
    sections = "litellm_settings:\n  context_window_fallbacks: [{cheap: [large]}]\n"
    sections += "exo_remote_settings:\n  nodes:\n"
    sections += f"    {ATTACKER}: {{max_budget: {TIGHT_BUDGET}}}\n    {VICTIM}: {{max_budget: {ROOMY_BUDGET}}}\n"
    groups = {"cheap": ["cheap"], "large": ["large"]}
    return tenant_config(upstream.url, groups, sections=sections, prices={"cheap": CHEAP, "large": LARGE})


async def _generate(tenants: Tenants, node: str, request: pb.GenerateRequest) -> str | RemoteError:
    client = tenants.client(tenants.running[0], node)
    try:
        return "".join([e.delta.text async for e in client.generate(request) if e.HasField("delta")])
    except RemoteError as exc:
        return exc


@pytest.mark.timeout(120)
async def test_a_context_window_fallback_is_reserved_at_its_price(upstream: OpenAIUpstream, tenants: Tenants) -> None:
    """A budget that holds the request at the cheap price but not at its context-window
    fallback's: refused before any provider call (it used to be served by the large model
    and overspend the budget fourfold)."""
    await tenants.start(_context_fallback_config(upstream))
    result = await _generate(tenants, ATTACKER, chat_request("cheap", OVERSIZED, request_id="tight"))
    spent = sum(r["cost_usd"] for r in ledger_rows(tenants.state_dir(), expected=0, timeout_s=0))
    assert spent <= TIGHT_BUDGET, f"spent ${spent:.6f} of a ${TIGHT_BUDGET} budget"
    assert isinstance(result, RemoteError) and result.reason is Reason.BUDGET_EXCEEDED, result
    assert not upstream.requests, "refused before any provider call"


@pytest.mark.timeout(120)
async def test_a_request_that_may_fall_back_is_clamped_at_the_fallbacks_price(
    upstream: OpenAIUpstream, tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    """The output the budget leaves at the large model's price is what both models are asked
    for, and the large model serves the request within the budget."""
    await tenants.start(_context_fallback_config(upstream))
    request = chat_request("cheap", OVERSIZED, request_id="roomy")
    planned = plan(ROOMY_BUDGET, *LARGE, prompt_bound(request), 8192)  # no max_tokens: the default maximum
    assert planned is not None and 0 < planned[0] < 8192
    assert await _generate(tenants, VICTIM, request) == "tok " * 30
    asked = [r.body.get("max_tokens") for r in upstream.requests if r.body is not None]
    assert [r.model for r in upstream.requests] == ["cheap", "large"]
    assert asked and all(a in (planned[0] - 1, planned[0]) for a in asked), (asked, planned)
    rows = ledger_rows(tenants.state_dir(), expected=1)
    assert [r["model"] for r in rows] == ["openai/large"] and sum(r["cost_usd"] for r in rows) <= ROOMY_BUDGET
    assert "more than the reservation" not in caplog.text, "the charge fits in what was reserved"
