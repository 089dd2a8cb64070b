"""Tail-aware ``latency-based-routing`` (control/latency.py) on the router, with its clock
in the test's hands: a bimodal member loses to a steady one that LiteLLM's mean would
rank behind it; old samples fade; a stale member gets a small probe share."""

from __future__ import annotations

import random
import statistics

from exo_remote_engine.sidecar.config.loader import ModelEntry, RouterSettings
from exo_remote_engine.sidecar.control.latency import PROBE_SHARE, STALE_AFTER_S, TtftWindow
from exo_remote_engine.sidecar.control.limits import UsageWindows
from exo_remote_engine.sidecar.control.routing import Router
from tests.support.traffic import FakeClock

BIMODAL = [0.05] * 8 + [2.0] * 2  # 50 ms four times in five, 2 s the fifth
STEADY = [0.5] * 10


def _member(name: str) -> ModelEntry:
    return ModelEntry(alias="g", litellm_model=f"openai/{name}", provider="openai", deployment=name)


def _router(clock: FakeClock, seed: int = 7) -> Router:
    settings = RouterSettings(routing_strategy="latency-based-routing")
    return Router(settings, UsageWindows(clock), rng=random.Random(seed))


async def _picks(router: Router, group: list[ModelEntry], n: int) -> dict[str, int]:
    counts = {m.deployment_name: 0 for m in group}
    for _ in range(n):
        counts[(await router.pick(group)).deployment_name] += 1
    return counts


async def test_a_bimodal_member_loses_to_a_steady_one_that_the_mean_would_rank_behind_it() -> None:
    clock = FakeClock()
    router = _router(clock)
    bimodal, steady = _member("bimodal"), _member("steady")
    for fast_or_slow, even in zip(BIMODAL, STEADY, strict=True):
        router.first_token(bimodal, fast_or_slow)
        router.first_token(steady, even)
        clock.now += 1
    # LiteLLM's rule (mean of the last 10) picks the bimodal member: 0.44 s < 0.5 s.
    assert statistics.mean(BIMODAL) < statistics.mean(STEADY)
    counts = await _picks(router, [bimodal, steady], 200)
    assert counts == {"bimodal": 0, "steady": 200}, "p90: 2 s against 0.5 s"


async def test_old_samples_fade_so_a_recovered_member_wins_again() -> None:
    clock = FakeClock()
    router = _router(clock)
    bimodal, steady = _member("bimodal"), _member("steady")
    for value in BIMODAL:
        router.first_token(bimodal, value)
    router.first_token(steady, 0.5)
    clock.now += 180  # three half-lives later the member answers fast every time
    for _ in range(5):  # unweighted, 2 slow of 15 would still make the p90 2 s
        router.first_token(bimodal, 0.05)
        router.first_token(steady, 0.5)
    counts = await _picks(router, [bimodal, steady], 100)
    assert counts["bimodal"] == 100, counts


def test_the_weighted_percentile_and_the_window() -> None:
    window = TtftWindow()
    assert window.percentile(0.0) is None and window.stale(0.0)
    for i, value in enumerate([0.1] * 9 + [3.0]):
        window.add(float(i), value)
    assert window.percentile(9.0) == 3.0  # the slowest tenth is the p90
    assert window.percentile(9.0, q=0.5) == 0.1
    assert not window.stale(9.0) and window.stale(9.0 + STALE_AFTER_S + 1)
    assert window.percentile(1000.0) is None, "samples older than the window are gone"


async def test_a_stale_member_gets_a_small_probe_share_and_untried_members_go_first() -> None:
    clock = FakeClock()
    router = _router(clock, seed=11)
    fast, slow, new = _member("fast"), _member("slow"), _member("new")
    router.first_token(slow, 1.0)
    clock.now += STALE_AFTER_S + 5  # slow's only sample is stale now; fast is fresh
    router.first_token(fast, 0.1)
    first = await router.pick([fast, slow, new])
    assert first is new, "an untried member is tried first"
    router.first_token(new, 5.0)
    counts = await _picks(router, [fast, slow, new], 2000)
    expected = 2000 * PROBE_SHARE
    assert 0.4 * expected <= counts["slow"] <= 1.8 * expected, counts  # probes, ~5%
    assert counts["new"] == 0 and counts["fast"] == 2000 - counts["slow"], counts
