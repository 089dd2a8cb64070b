"""One sidecar with known traffic for the status page tests (JSON, browser, Prometheus):
four nodes (a budgeted, limited ``node-a``, an unlimited ``node-b``, ``node-c`` at rpm 1,
an admin ``ops``), a priced model, an unpriced one, a two-member group whose favoured
member answers 429 (so it cools down), and a model whose provider answers 503. Every
figure the page should show follows from the traffic :func:`drive` sends, and is returned
with it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from exo_remote_engine.server import RunningSidecar
from tests.support.harness import sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.traffic import FakeClock, Sidecars, complete, deployment, outcome

TOKENS = {
    "node-a": "tok-node-a-0123456789",
    "node-b": "tok-node-b-0123456789",
    "node-c": "tok-node-c-0123456789",
    "ops": "tok-ops-0123456789abc",
}
PRICE_IN, PRICE_OUT = 0.000001, 0.000002
PROMPT, COMPLETION = 11, 4  # the usage the upstream reports for every reply
COST = PROMPT * PRICE_IN + COMPLETION * PRICE_OUT
# Written as decimals: YAML 1.1 (PyYAML) reads 1e-06 as a string.
PRICES = {"input_cost_per_token": f"{PRICE_IN:.9f}", "output_cost_per_token": f"{PRICE_OUT:.9f}"}


def scene_config(url: str) -> str:
    return (
        "model_list:\n"
        + deployment("cheap", "cheap", url, **PRICES)
        + deployment("grp", "grp-a", url, weight=1, **PRICES)
        + deployment("grp", "grp-b", url, weight=1000000, **PRICES)  # picked first; answers 429
        + deployment("flaky", "flaky", url, **PRICES)
        + deployment("free", "free", url)  # no price anywhere: its cost is unknown, never $0
        + "router_settings:\n  cooldown_time: 3600\n"
        + "exo_remote_settings:\n  num_retries: 1\n  nodes:\n"
        + "    node-a: {max_budget: 1.0, budget_duration: 1d, rpm: 50, tpm: 100000}\n"
        + "    node-b: {allowed_models: [cheap, free]}\n"
        + "    node-c: {rpm: 1}\n"
        + "    ops: {role: admin}\n"
    )


@dataclass
class Expected:
    """What the traffic must show: per node spend, admitted requests, tokens, errors."""

    spend: dict[str, float] = field(default_factory=dict)  # known prices only
    requests: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    errors: dict[str, dict[str, int]] = field(default_factory=dict)
    ttft_samples: dict[str, int] = field(default_factory=dict)  # per model


async def start_scene(
    sidecars: Sidecars, upstream: OpenAIUpstream, clock: FakeClock | None = None, **settings: Any
) -> tuple[RunningSidecar, FakeClock]:
    """The sidecar on a clock frozen at now (the minute windows cannot roll over mid-test);
    several sidecars of one test share one ``clock``."""
    for model in ("cheap", "grp-a", "free"):
        upstream.scenarios[model] = Scenario(usage=(PROMPT, COMPLETION))
    upstream.scenarios["grp-b"] = Scenario(status=429, error_message="slow down")
    upstream.scenarios["flaky"] = Scenario(status=503, error_message="overloaded")
    clock = clock or FakeClock(time.time())
    sidecar = await sidecars.start(scene_config(upstream.url), clock, named_tokens=dict(TOKENS), **settings)
    return sidecar, clock


async def drive(sidecar: RunningSidecar, **target: Any) -> Expected:
    """The traffic; ``target`` adds client settings (``tls=ClientTLS(...)``)."""
    a = sidecar_client(sidecar.address, token=TOKENS["node-a"], **target)
    b = sidecar_client(sidecar.address, token=TOKENS["node-b"], **target)
    for _ in range(3):
        await complete(a, "cheap")
    for _ in range(2):
        await complete(a, "grp")  # grp-b answers 429 and cools down; grp-a serves
    failure = await outcome(a, "flaky")
    assert failure is not None and failure.reason.value == "PROVIDER_UNAVAILABLE", failure
    for _ in range(2):
        await complete(b, "cheap")
    await complete(b, "free")
    c = sidecar_client(sidecar.address, token=TOKENS["node-c"], **target)
    await complete(c, "cheap")
    refused = await outcome(c, "cheap")  # its second request this minute: over rpm 1, refused at admission
    assert refused is not None and refused.reason.value == "RATE_LIMITED", refused
    return Expected(
        spend={"node-a": 5 * COST, "node-b": 2 * COST, "node-c": COST},
        requests={"node-a": 6, "node-b": 3, "node-c": 2},
        tokens={"node-a": 5 * (PROMPT + COMPLETION)},
        errors={"node-a": {"PROVIDER_UNAVAILABLE": 1}, "node-b": {}, "node-c": {"RATE_LIMITED": 1}},
        ttft_samples={"cheap": 6, "grp": 2, "flaky": 0, "free": 1},
    )
