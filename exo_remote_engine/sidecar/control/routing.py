"""Deployment groups: which member of a ``model_name`` group serves a request.

The rules are LiteLLM Router's, as its docs and ``router_strategy/`` define them:
- ``simple-shuffle`` (default): random, weighted by ``weight``, else ``rpm``, else ``tpm``,
  else uniform;
- ``least-busy``: fewest requests in flight;
- ``latency-based-routing``: lowest recent p90 of time to first token, not LiteLLM's mean
  of the last 10 (untried first, a small probe share for stale members; control/latency.py);
- ``usage-based-routing`` / ``-v2``: fewest tokens this minute;
ties are broken at random. Deployments over their ``rpm``/``tpm`` this minute are skipped;
when every one is, the caller gets RATE_LIMITED until the minute ends. A deployment whose
failures this minute exceed ``allowed_fails`` (or that answers 429, 401 or 404 while it has
alternatives) cools down for ``cooldown_time`` seconds; a single-deployment group never
does (LiteLLM's rule: there is nothing to move to). Only the deployment's own faults count
(:func:`deployment_fault`, LiteLLM's ``_is_cooldown_required``): a request the provider
refuses for what it asks (400, 413, 422: too long, a bad schema, content policy) says
nothing about the deployment, so one node's bad requests never cool it down for the others.

Why not LiteLLM's Router object itself: its selection, cooldowns and usage counters are
bound to its own ``acompletion`` call path and wall-clock caches, so the direct OpenAI
reader (a tenth of LiteLLM's CPU per token) could not be used under it, and tests could not
drive time. This module keeps the same rules over our transports and an injectable clock.

With ``--redis`` the deployments' minute counts are shared by every sidecar host (as the
LiteLLM proxy shares its router's usage): a group whose members have ``rpm``/``tpm``, or
that routes by usage, reads them from Redis, and the chosen deployment is counted there by
the same atomic script as node limits; when another host took its last request first, the
next member is tried.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.sidecar.config.loader import ModelEntry, RouterSettings
from exo_remote_engine.sidecar.control.latency import TtftWindow, fastest_tail
from exo_remote_engine.sidecar.control.limits import WINDOW_S, UsageWindows, has_room, rate_limited
from exo_remote_engine.sidecar.control.shared_windows import RedisWindows

_IMMEDIATE_COOLDOWN_STATUSES = (429, 401, 404)
# The request's own fault: the provider refused what this caller asked, not the service.
CALLER_FAULTS = frozenset(
    {Reason.INVALID_REQUEST, Reason.REQUEST_TOO_LARGE, Reason.CONTEXT_WINDOW_EXCEEDED, Reason.CONTENT_POLICY}
)


def deployment_fault(error: RemoteError) -> bool:
    """Whether ``error`` counts against the deployment (429, 401/403, 404, 408, 5xx,
    timeouts, connection errors), as opposed to the caller's own request."""
    return error.reason not in CALLER_FAULTS


@dataclass
class _Health:
    in_flight: int = 0
    ttft: TtftWindow = field(default_factory=TtftWindow)
    fail_minute: int = -1
    fails: int = 0
    cooldown_until: float = 0.0


def deployment_key(entry: ModelEntry) -> str:
    return f"deployment:{entry.deployment_name}"


class Router:
    def __init__(
        self,
        settings: RouterSettings,
        windows: UsageWindows,
        rng: random.Random | None = None,
        shared: RedisWindows | None = None,
    ) -> None:
        self.settings = settings
        self.windows = windows
        self.shared = shared
        self._rng = rng or random.Random()
        self._health: dict[str, _Health] = {}

    def _of(self, entry: ModelEntry) -> _Health:
        health = self._health.get(entry.deployment_name)
        if health is None:
            health = self._health[entry.deployment_name] = _Health()
        return health

    def cooling(self, entry: ModelEntry) -> bool:
        return self._of(entry).cooldown_until > self.windows.clock()

    def cooldown_left_s(self, entry: ModelEntry) -> float:
        """Seconds until ``entry`` leaves its cooldown (0: it is not cooling down)."""
        return max(0.0, self._of(entry).cooldown_until - self.windows.clock())

    async def pick(self, group: Sequence[ModelEntry], tried: Collection[str] = ()) -> ModelEntry:
        """Choose a deployment not yet ``tried`` in this request (any, when all were), not
        cooling down, under its limits; count the request against it."""
        now = self.windows.clock()
        fresh = [d for d in group if d.deployment_name not in tried] or list(group)
        healthy = [d for d in fresh if self._of(d).cooldown_until <= now]
        if not healthy:
            wait = min(self._of(d).cooldown_until for d in fresh) - now
            raise RemoteError(
                Reason.PROVIDER_UNAVAILABLE,
                f"every deployment of model {group[0].alias!r} is cooling down after failures",
                retry_after_s=wait,
            )
        usage_based = self.settings.routing_strategy.startswith("usage-based-routing")
        if self.shared is not None and (usage_based or any(d.rpm or d.tpm for d in healthy)):
            return await self._pick_shared(self.shared, group[0].alias, healthy)
        room = [d for d in healthy if self.windows.has_room(deployment_key(d), d.rpm, d.tpm)]
        if not room:
            raise self._all_limited(group[0].alias)
        chosen = room[0] if len(room) == 1 else self._choose(room, lambda d: self.windows.tokens(deployment_key(d)))
        self.windows.add_request(deployment_key(chosen))
        return chosen

    async def _pick_shared(self, shared: RedisWindows, alias: str, healthy: list[ModelEntry]) -> ModelEntry:
        counts = await shared.counts([deployment_key(d) for d in healthy])

        room = [d for d in healthy if has_room(*counts[deployment_key(d)], d.rpm, d.tpm)]
        while room:
            chosen = room[0] if len(room) == 1 else self._choose(room, lambda d: counts[deployment_key(d)][1])
            try:
                what = f"deployment {chosen.deployment_name!r}"
                await shared.admit(deployment_key(chosen), chosen.rpm, chosen.tpm, what)
            except RemoteError:
                room.remove(chosen)  # another host took its last request of the minute
                continue
            return chosen
        raise self._all_limited(alias)

    def _all_limited(self, alias: str) -> RemoteError:
        return rate_limited(
            f"every deployment of model {alias!r} is at its rpm/tpm limit this minute",
            self.windows.retry_after_s(),
            "deployment",
        )

    def _choose(self, room: list[ModelEntry], tokens: Callable[[ModelEntry], int]) -> ModelEntry:
        strategy = self.settings.routing_strategy
        if strategy == "least-busy":
            return self._lowest(room, lambda d: float(self._of(d).in_flight))
        if strategy == "latency-based-routing":
            return fastest_tail(room, lambda d: self._of(d).ttft, self.windows.clock(), self._rng)
        if strategy.startswith("usage-based-routing"):
            return self._lowest(room, lambda d: float(tokens(d)))
        for attribute in ("weight", "rpm", "tpm"):
            weights = [float(getattr(d, attribute) or 0) for d in room]
            if any(weights):
                return self._rng.choices(room, weights=weights)[0]
        return self._rng.choice(room)

    def _lowest(self, room: list[ModelEntry], score: object) -> ModelEntry:
        assert callable(score)
        scores = [score(d) for d in room]
        best = min(scores)
        return self._rng.choice([d for d, s in zip(room, scores, strict=True) if s == best])

    def started(self, entry: ModelEntry) -> None:
        self._of(entry).in_flight += 1

    def first_token(self, entry: ModelEntry, ttft_s: float) -> None:
        """An attempt's first delta arrived ``ttft_s`` after it started."""
        self._of(entry).ttft.add(self.windows.clock(), ttft_s)

    def succeeded(self, entry: ModelEntry, latency_s: float, tokens: int) -> None:
        health = self._of(entry)
        health.in_flight -= 1
        (self.shared or self.windows).add_tokens(deployment_key(entry), tokens)

    def failed(self, entry: ModelEntry, status: int | None, group_size: int) -> None:
        """Count a failure; cool the deployment down when LiteLLM's rule says so."""
        health = self._of(entry)
        health.in_flight -= 1
        if group_size < 2:
            return
        now = self.windows.clock()
        minute = int(now // WINDOW_S)
        if health.fail_minute != minute:
            health.fail_minute, health.fails = minute, 0
        health.fails += 1
        if health.fails > self.settings.allowed_fails or status in _IMMEDIATE_COOLDOWN_STATUSES:
            health.cooldown_until = now + self.settings.cooldown_time_s

    def ended(self, entry: ModelEntry) -> None:
        """A stream that was cancelled or failed after its first delta: no longer in flight."""
        self._of(entry).in_flight -= 1
