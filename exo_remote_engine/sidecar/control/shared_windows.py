"""Node and deployment rpm/tpm windows shared by every sidecar host and worker process, in Redis.

``--redis redis://host:port/db`` moves the rpm/tpm counters from one process's memory
(:class:`~exo_remote_engine.sidecar.control.limits.UsageWindows`) to Redis, as the LiteLLM proxy
does for its own instances: the same calendar-minute windows, one key per node (or
deployment), minute and count (``exo-remote:{node:<name>}:<minute>:requests`` / ``:tokens``,
``{deployment:<name>}`` likewise), expiring after two minutes. Admission is one Lua
script, so checking the counts and counting the request is atomic across hosts:
``rpm: 20`` admits 20 requests per minute in total, however many sidecars take them.
Tokens are added when the provider reports them, without waiting.

Minutes come from each host's own clock (the Retry-After a caller gets is that host's
minute end); hosts are expected to keep NTP time, like LiteLLM's.

A Redis that cannot be reached is not an outage of the sidecar: the limits fall back to
this process's own windows (a limit then holds per process, not in total), a warning says
so once per outage, and Redis is tried again after a short back-off (so an outage does
not add a connect timeout to every request). Its return is logged, and the shared counts
are used again from then on.
"""

from __future__ import annotations

import asyncio
from typing import Any

from exo_remote_engine.sidecar.control.limits import WINDOW_S, UsageWindows, rate_limited
from exo_remote_engine.sidecar.ledger.shared_services import Outage, check_service_url, display_url
from exo_remote_engine.sidecar.telemetry.safe_logging import safe_logger

log = safe_logger("exo_remote_engine.sidecar")

KEY_PREFIX = "exo-remote"
KEY_TTL_S = 120  # a minute's counts outlive it by one minute, then Redis drops them
TIMEOUT_S = 0.5  # connect and per-command; a LAN Redis answers in well under 1 ms (slack for a busy loop)
RETRY_AFTER_OUTAGE_S = 2.0  # during an outage, Redis is tried again this often, not per request

# KEYS: requests, tokens of one minute. ARGV: rpm, tpm (-1: none), ttl.
# Returns {0, requests} admitted, {1, requests} over rpm, {2, tokens} over tpm.
_ADMIT = """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
if rpm >= 0 and requests >= rpm then return {1, requests} end
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
if tpm >= 0 and tokens >= tpm then return {2, tokens} end
requests = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {0, requests}
"""


def check_redis_url(url: str) -> str:
    """The ``--redis`` URL, checked (see :func:`check_service_url`)."""
    return check_service_url(
        url,
        flag="--redis",
        package="redis",
        schemes=("redis", "rediss", "unix"),
        expected="redis://host:port/db (or rediss://, unix://)",
    )


def minute_key(key: str, minute: int, what: str) -> str:
    """``exo-remote:{node:n1}:29999999:requests``; the braces keep a minute's two keys in
    one Redis Cluster slot (a Lua script may only touch keys of one slot)."""
    return f"{KEY_PREFIX}:{{{key}}}:{minute}:{what}"


class RedisWindows:
    """Node windows in Redis, with ``fallback`` (this process's windows) during an outage."""

    def __init__(self, url: str, fallback: UsageWindows) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = display_url(url)
        self.fallback = fallback
        self.clock = fallback.clock
        self._redis: Any = Redis.from_url(
            url,
            socket_timeout=TIMEOUT_S,
            socket_connect_timeout=TIMEOUT_S,
            # One immediate retry, on a fresh connection: an idle pooled connection that died
            # with a restarted Redis fails once; a Redis that is down fails both, fast.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=0,
        )
        self._admit = self._redis.register_script(_ADMIT)
        self._outage = Outage(RETRY_AFTER_OUTAGE_S, self._outage_started, self._outage_ended)
        self._pending: set[asyncio.Task[None]] = set()

    @property
    def shared(self) -> bool:
        """False while Redis is unreachable (limits then hold per process)."""
        return not self._outage.active

    async def close(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await self._redis.aclose()

    def _outage_started(self, exc: BaseException) -> None:
        log.warning(
            "Redis %s unreachable (%s): rpm/tpm limits now hold per sidecar process, not across hosts, "
            "until it is back",
            self.url,
            type(exc).__name__,
        )

    def _outage_ended(self) -> None:
        log.warning("Redis %s is back: rpm/tpm limits are shared across hosts again", self.url)

    async def admit(self, key: str, rpm: int | None, tpm: int | None, what: str) -> None:
        """Count one request under ``key`` in the shared minute, or raise RATE_LIMITED."""
        if not self._outage.usable():
            self.fallback.admit(key, rpm, tpm, what)
            return
        from redis.exceptions import RedisError

        minute = int(self.clock() // WINDOW_S)
        keys = [minute_key(key, minute, "requests"), minute_key(key, minute, "tokens")]
        try:
            async with asyncio.timeout(TIMEOUT_S * 3):
                verdict, count = await self._admit(keys=keys, args=[_limit(rpm), _limit(tpm), KEY_TTL_S])
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            self.fallback.admit(key, rpm, tpm, what)
            return
        self._outage.succeeded()
        if verdict == 1:
            raise rate_limited(f"{what} is at its limit of {rpm} requests per minute", self._retry_after(), "rpm")
        if verdict == 2:
            raise rate_limited(f"{what} used {count} of its {tpm} tokens per minute", self._retry_after(), "tpm")

    async def counts(self, keys: list[str]) -> dict[str, tuple[int, int]]:
        """Requests and tokens of the current minute per key (this process's own while
        Redis is unreachable): what deployment routing chooses by."""
        if self._outage.usable():
            from redis.exceptions import RedisError

            minute = int(self.clock() // WINDOW_S)
            names = [minute_key(k, minute, what) for k in keys for what in ("requests", "tokens")]
            try:
                async with asyncio.timeout(TIMEOUT_S * 3):
                    values = await self._redis.mget(names)
            except (RedisError, OSError, TimeoutError) as exc:
                self._outage.failed(exc)
            else:
                self._outage.succeeded()
                numbers = [int(v or 0) for v in values]
                return {k: (numbers[2 * i], numbers[2 * i + 1]) for i, k in enumerate(keys)}
        return self.fallback.counts(keys)

    def add_tokens(self, key: str, tokens: int) -> None:
        """Add the provider's tokens to the shared minute, without making the caller wait."""
        if tokens <= 0:
            return
        if not self._outage.usable():
            self.fallback.add_tokens(key, tokens)
            return
        task = asyncio.get_running_loop().create_task(self._add_tokens(key, tokens))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _add_tokens(self, key: str, tokens: int) -> None:
        from redis.exceptions import RedisError

        name = minute_key(key, int(self.clock() // WINDOW_S), "tokens")
        try:
            async with asyncio.timeout(TIMEOUT_S * 3):
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.incrby(name, tokens)
                    pipe.expire(name, KEY_TTL_S)
                    await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
            self.fallback.add_tokens(key, tokens)
            return
        self._outage.succeeded()

    def _retry_after(self) -> float:
        return self.fallback.retry_after_s()


def _limit(value: int | None) -> int:
    return -1 if value is None else value
