"""Node rpm/tpm windows in a real Redis (tests/support/servers.py): one admission script
shared by every process, and this process's own windows while Redis cannot be reached."""

from __future__ import annotations

import asyncio
import logging

import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.redaction import SECRETS
from exo_remote_engine.sidecar.config.loader import ConfigError
from exo_remote_engine.sidecar.control.limits import UsageWindows
from exo_remote_engine.sidecar.control.shared_windows import RedisWindows, check_redis_url, minute_key
from exo_remote_engine.sidecar.ledger.shared_services import display_url
from exo_remote_engine.sidecar.serving.settings import SidecarSettings, parse_args
from tests.support.clock import FakeClock
from tests.support.processes import free_port
from tests.support.servers import RedisServer
from tests.support.waits import eventually


async def _admitted(windows: RedisWindows, key: str, rpm: int | None, tpm: int | None = None) -> RemoteError | None:
    try:
        await windows.admit(key, rpm, tpm, "node 'n'")
    except RemoteError as exc:
        return exc
    return None


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url


async def _until_tokens(url: str, key: str, now: float, expected: int) -> None:
    """Until the shared minute's token count of ``key``, read from Redis itself, is ``expected``."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)

    async def landed() -> bool:
        return int(await client.get(minute_key(key, int(now // 60), "tokens")) or 0) == expected

    try:
        await eventually(landed, f"{expected} tokens of {key} in Redis")
    finally:
        await client.aclose()


async def test_admission_is_atomic_across_processes_sharing_redis(redis_url: str) -> None:
    clock = FakeClock()
    hosts = [RedisWindows(redis_url, UsageWindows(clock)) for _ in range(3)]
    try:
        results = await asyncio.gather(*(_admitted(hosts[i % 3], "node:n", 25) for i in range(120)))
        assert sum(r is None for r in results) == 25, "exactly the limit, however many processes ask at once"
        refused = [r for r in results if r is not None]
        assert {r.reason for r in refused} == {Reason.RATE_LIMITED}
        assert all(r.retry_after_s == pytest.approx(50.0) for r in refused), "the minute's end (clock at :10)"
        clock.now += 60  # the next minute: counts start again
        assert await _admitted(hosts[1], "node:n", 25) is None
        # Tokens reported on one host stop the node on another once over its tpm.
        hosts[0].add_tokens("node:t", 700)  # added without making the caller wait: until it lands
        await _until_tokens(redis_url, "node:t", clock.now, 700)
        assert await _admitted(hosts[2], "node:t", None, 1000) is None
        hosts[1].add_tokens("node:t", 400)
        await _until_tokens(redis_url, "node:t", clock.now, 1100)
        over = await _admitted(hosts[2], "node:t", None, 1000)
        assert over is not None and over.metadata == {"limit": "tpm"} and "1100 of its 1000 tokens" in over.message
        assert all(h.shared for h in hosts)
    finally:
        for host in hosts:
            await host.close()


async def test_an_unreachable_redis_falls_back_to_this_process_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    windows = RedisWindows(f"redis://:sekret-redis-password-1234@127.0.0.1:{free_port()}/0", UsageWindows(clock))
    try:
        with caplog.at_level(logging.WARNING, logger="exo_remote_engine.sidecar"):
            results = [await _admitted(windows, "node:n", 3) for _ in range(5)]
    finally:
        await windows.close()
    assert [r is None for r in results] == [True, True, True, False, False], "the limit holds in this process"
    assert not windows.shared
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "hold per sidecar process" in warnings[0], warnings
    assert "sekret" not in caplog.text


async def test_a_returning_redis_is_used_again(own_redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    redis_server = own_redis_server  # stopped and restarted here: not the session's
    clock = FakeClock()
    windows = RedisWindows(redis_server.url, UsageWindows(clock))
    try:
        assert await _admitted(windows, "node:r", 2) is None
        await asyncio.to_thread(redis_server.stop)
        with caplog.at_level(logging.WARNING, logger="exo_remote_engine.sidecar"):
            assert await _admitted(windows, "node:r", 2) is None  # this process's windows: 1 of 2
            assert not windows.shared
            await asyncio.to_thread(redis_server.start)

            async def back() -> bool:  # another node's admissions, once the back-off (2 s) ends
                await _admitted(windows, "node:probe", None)
                return windows.shared

            await eventually(back, "Redis is used again after the back-off")
            assert await _admitted(windows, "node:r", 2) is None  # a fresh Redis: 1 of 2
            assert await _admitted(windows, "node:r", 2) is None
            refused = await _admitted(windows, "node:r", 2)
        assert refused is not None and refused.reason is Reason.RATE_LIMITED
        assert windows.shared and "is back" in caplog.text
    finally:
        await windows.close()


def test_redis_and_database_urls_are_checked_without_showing_passwords() -> None:
    with pytest.raises(ConfigError) as caught:
        SidecarSettings.from_args(parse_args(["--redis", "http://u:sekret-pass-0001@h:1/0"]))
    assert "redis://" in str(caught.value) and "sekret" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        SidecarSettings.from_args(parse_args(["--database", "mysql://u:sekret-pass-0002@h:1/db"]))
    assert "postgresql://" in str(caught.value) and "sekret" not in str(caught.value)
    with pytest.raises(ConfigError, match="needs accounting"):
        SidecarSettings.from_args(parse_args(["--database", "postgresql://h/db", "--no-accounting"]))
    env = {
        "EXO_REMOTE_REDIS": "redis://:sekret-pass-0003@10.0.0.9:6379/2",
        "EXO_REMOTE_DATABASE": "postgresql://exo:sekret-pass-0004@10.0.0.8/exo",
    }
    settings = SidecarSettings.from_args(parse_args([], env), env)
    assert settings.redis_url == env["EXO_REMOTE_REDIS"] and settings.database_url == env["EXO_REMOTE_DATABASE"]
    assert "sekret" not in repr(settings)
    assert "sekret-pass-0003" in SECRETS and "sekret-pass-0004" in SECRETS
    assert display_url(check_redis_url(env["EXO_REMOTE_REDIS"])) == "redis://10.0.0.9:6379/2"
