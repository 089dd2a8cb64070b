"""Deployment groups, routing strategies, cooldowns and rpm/tpm limits, against the real
OpenAI-compatible upstream through a real sidecar. Time is a controllable clock: limits
and cooldowns are checked by moving it, never by sleeping."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exo_remote_engine.contract.errors import Reason
from exo_remote_engine.sidecar.config.loader import ConfigError
from tests.support.clock import MINUTE_START, FakeClock
from tests.support.configs import KEY_ENV, deployment
from tests.support.harness import sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.traffic import Sidecars, complete, outcome, served_counts

GROUP = ("m-a", "m-b", "m-c")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "strategy", ["simple-shuffle", "least-busy", "latency-based-routing", "usage-based-routing-v2"]
)
async def test_a_group_of_three_spreads_300_requests_per_strategy(
    upstream: OpenAIUpstream, sidecars: Sidecars, strategy: str
) -> None:
    url = upstream.url
    weights = {"m-a": 1, "m-b": 1, "m-c": 2}
    text = "model_list:\n" + "".join(
        deployment("g", m, url, **({"weight": weights[m]} if strategy == "simple-shuffle" else {})) for m in GROUP
    )
    text += f"router_settings:\n  routing_strategy: {strategy}\n"
    if strategy == "least-busy":  # every request lasts a while, so in-flight counts matter
        upstream.default = Scenario(chunks=["x"] * 5, interval_s=0.01)
    if strategy == "latency-based-routing":  # m-c answers 50 ms late
        upstream.scenarios["m-c"] = Scenario(stall_before_first_byte_s=0.05)
    sidecar = await sidecars.start(text, FakeClock())
    client = sidecar_client(sidecar.address)
    try:
        if strategy == "least-busy":
            for wave in range(100):  # waves of three at once: the least busy is always a free one
                await asyncio.gather(*(complete(client, "g", f"wave {wave}") for _ in range(3)))
        else:
            for _ in range(300):
                await complete(client, "g")
    finally:
        await client.close()
    counts = served_counts(upstream)
    assert sum(counts.values()) == 300, counts
    a, b, c = (counts[m] for m in GROUP)
    if strategy == "simple-shuffle":  # weights 1:1:2 -> about 75, 75, 150
        assert 40 <= a <= 115 and 40 <= b <= 115 and 105 <= c <= 195, counts
    elif strategy == "least-busy":
        # One request per deployment in a wave of three at once (the other two are busy); a
        # random pick spreads a wave so in 2 of 9. A box that stalls may split a wave, so the
        # bound is most waves: random passes it with odds below 1e-20.
        waves: dict[str, set[str]] = collections.defaultdict(set)
        for r in upstream.requests:
            if r.body and r.model:
                waves[str(r.body["messages"][-1]["content"])].add(r.model)
        assert len(waves) == 100, sorted(waves)[:5]
        spread = sum(len(models) == 3 for models in waves.values())
        assert spread >= 60, f"only {spread} of 100 waves went one to each deployment; {counts}"
    elif strategy == "latency-based-routing":  # the slow one only while untried
        assert c <= 15 and a + b >= 285, counts
    else:  # fewest tokens this minute: equal requests take turns
        assert all(90 <= n <= 110 for n in (a, b, c)), counts


async def test_a_failing_deployment_cools_down_and_traffic_moves_within_one_request(
    upstream: OpenAIUpstream, sidecars: Sidecars
) -> None:
    upstream.scenarios["m-a"] = Scenario(status=500)
    url = upstream.url
    text = "model_list:\n" + deployment("g", "m-a", url, weight=1000) + deployment("g", "m-b", url, weight=1)
    text += deployment("g", "m-c", url, weight=1)
    text += "router_settings:\n  allowed_fails: 0\n  cooldown_time: 30\n"
    clock = FakeClock()
    sidecar = await sidecars.start(text, clock)
    client = sidecar_client(sidecar.address)
    try:
        replies = [await complete(client, "g", f"r{i}") for i in range(30)]
        assert replies[0] == "echo: r0", "the request that met the 500 was served by another deployment"
        assert all(r == f"echo: r{i}" for i, r in enumerate(replies))
        counts = served_counts(upstream)
        assert counts["m-a"] == 1, f"m-a is cooling down after its one failure: {counts}"
        assert counts["m-b"] + counts["m-c"] == 30
        clock.now += 31  # the cooldown is over: the heavy weight brings traffic back to m-a
        assert await complete(client, "g", "again") == "echo: again"
        assert served_counts(upstream)["m-a"] == 2
    finally:
        await client.close()


@pytest.mark.parametrize("where", ["deployment", "node"])
async def test_rpm_3_admits_exactly_3_of_7_per_minute_window(
    upstream: OpenAIUpstream, sidecars: Sidecars, where: str
) -> None:
    text = "model_list:\n" + deployment("solo", "m-a", upstream.url, **({"rpm": 3} if where == "deployment" else {}))
    tokens = {}
    if where == "node":
        text += "exo_remote_settings:\n  nodes:\n    n1: {rpm: 3}\n"
        tokens = {"n1": "token-of-node-one-0001"}
    clock = FakeClock(MINUTE_START + 10)
    sidecar = await sidecars.start(text, clock, named_tokens=tokens)
    client = sidecar_client(sidecar.address, token=tokens.get("n1"))
    try:
        for window in range(2):
            results = [await outcome(client, "solo") for _ in range(7)]
            refused = [r for r in results if r is not None]
            assert results[:3] == [None, None, None] and len(refused) == 4, results
            for error in refused:
                assert error.reason is Reason.RATE_LIMITED, error
                assert error.retry_after_s is not None and abs(error.retry_after_s - 50) < 0.01, error
            assert len(upstream.requests) == 3 * (window + 1), "refused requests never reach the provider"
            clock.now += 60  # the next minute window
    finally:
        await client.close()


async def test_tpm_counts_the_tokens_the_provider_reports(upstream: OpenAIUpstream, sidecars: Sidecars) -> None:
    # Four short chunks, but the provider reports 51 tokens per request.
    upstream.default = Scenario(chunks=["a", "b", "c", "d"], usage=(11, 40))
    text = "model_list:\n" + deployment("solo", "m-a", upstream.url)
    text += "exo_remote_settings:\n  nodes:\n    n1: {tpm: 100}\n"
    clock = FakeClock()
    sidecar = await sidecars.start(text, clock, named_tokens={"n1": "token-of-node-one-0001"})
    client = sidecar_client(sidecar.address, token="token-of-node-one-0001")
    try:
        assert await outcome(client, "solo") is None  # 51 tokens
        assert await outcome(client, "solo") is None  # 102: over, but known only at its end
        error = await outcome(client, "solo")
        assert error is not None and error.reason is Reason.RATE_LIMITED, error
        assert "102 of its 100 tokens" in str(error)
        assert len(upstream.requests) == 2
        clock.now += 60
        assert await outcome(client, "solo") is None
    finally:
        await client.close()


async def test_every_deployment_at_its_rpm_is_rate_limited_until_the_minute_ends(
    upstream: OpenAIUpstream, sidecars: Sidecars
) -> None:
    text = "model_list:\n" + deployment("g", "m-a", upstream.url, rpm=1) + deployment("g", "m-b", upstream.url, rpm=2)
    clock = FakeClock(MINUTE_START + 45)
    sidecar = await sidecars.start(text, clock)
    client = sidecar_client(sidecar.address)
    try:
        assert [await outcome(client, "g") for _ in range(3)] == [None, None, None]
        error = await outcome(client, "g")
        assert error is not None and error.reason is Reason.RATE_LIMITED
        assert error.retry_after_s is not None and abs(error.retry_after_s - 15) < 0.01
        assert served_counts(upstream) == {"m-a": 1, "m-b": 2}
    finally:
        await client.close()


LITELLM_DOCS_CONFIG = """\
model_list:
  - model_name: gpt-3.5-turbo
    litellm_params:
      model: openai/m-a
      api_base: {url}/v1
      api_key: os.environ/TEST_UPSTREAM_KEY
      rpm: 6
  - model_name: gpt-3.5-turbo
    litellm_params:
      model: openai/m-b
      api_base: {url}/v1
      api_key: os.environ/TEST_UPSTREAM_KEY
      rpm: 6
  - model_name: gpt-4
    litellm_params:
      model: openai/m-c
      api_base: {url}/v1
      api_key: os.environ/TEST_UPSTREAM_KEY
      tpm: 100000
    model_info:
      mode: chat
      base_model: gpt-4

router_settings:
  routing_strategy: usage-based-routing-v2
  redis_host: os.environ/REDIS_HOST
  enable_pre_call_checks: true
  num_retries: 2
  allowed_fails: 3
  cooldown_time: 30

litellm_settings:
  drop_params: true
  success_callback: ["langfuse"]
  fallbacks: [{{"gpt-3.5-turbo": ["gpt-4"]}}]

general_settings:
  master_key: sk-1234
  database_url: postgresql://user:pass@localhost/litellm
"""


async def test_a_litellm_docs_config_starts_behaves_and_names_what_it_ignores(
    upstream: OpenAIUpstream, sidecars: Sidecars, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="exo_remote_engine.sidecar")
    clock = FakeClock(MINUTE_START + 1)
    sidecar = await sidecars.start(LITELLM_DOCS_CONFIG.format(url=upstream.url), clock)
    warnings = [r.getMessage() for r in caplog.records if "does nothing with" in r.getMessage()]
    assert len(warnings) == 1, "one warning"
    for key in (
        "router_settings.redis_host",
        "router_settings.enable_pre_call_checks",
        "litellm_settings.drop_params",
        "litellm_settings.success_callback",
        "general_settings.database_url",
    ):
        assert key in warnings[0]
    for acted in ("routing_strategy", "master_key", "fallbacks", "allowed_fails", ".rpm", "base_model"):
        assert acted not in warnings[0]
    assert "pass@" not in warnings[0], "keys are named, values are not"

    # The master key protects the sidecar: without it, nothing.
    anonymous = sidecar_client(sidecar.address)
    try:
        error = await outcome(anonymous, "gpt-3.5-turbo")
        assert error is not None and error.reason is Reason.UNAUTHENTICATED
    finally:
        await anonymous.close()
    client = sidecar_client(sidecar.address, token="sk-1234")
    try:
        # Two deployments of 6 rpm: 12 requests are shared by usage, then the fallback serves.
        results = [await outcome(client, "gpt-3.5-turbo") for _ in range(14)]
        assert results == [None] * 14
        assert served_counts(upstream) == {"m-a": 6, "m-b": 6, "m-c": 2}
        clock.now += 60
        assert await outcome(client, "gpt-3.5-turbo") is None
        assert served_counts(upstream)["m-c"] == 2
    finally:
        await client.close()


def test_limits_with_several_worker_processes_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "w.yaml"
    config.write_text("model_list:\n" + deployment("a", "m-a", "http://127.0.0.1:9", rpm=3))
    done = subprocess.run(
        [sys.executable, "-m", "exo_remote_engine.server", "--no-discover", "--config", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, KEY_ENV: "sk-upstream-test-key-000000"},
    )
    assert done.returncode == 2
    assert "counted per process" in done.stderr and "--workers 1" in done.stderr


async def test_a_budget_without_accounting_is_refused(upstream: OpenAIUpstream, sidecars: Sidecars) -> None:
    text = "model_list:\n" + deployment("a", "m-a", upstream.url)
    text += "exo_remote_settings:\n  nodes:\n    n1: {max_budget: 1}\n"
    with pytest.raises(ConfigError, match="budgets need accounting"):
        await sidecars.start(text, FakeClock(), accounting=False)
