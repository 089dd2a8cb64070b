"""Shared fixtures: a real OpenAI-compatible upstream, a real sidecar on a real port."""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from exo_remote_engine.server import RunningSidecar
from tests.support.configs import KEY_ENV, write_config
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.sidecars import InProcessSidecars

if TYPE_CHECKING:  # tests.support.traffic imports this module (through the harness)
    from tests.support.servers import PostgresServer, RedisServer
    from tests.support.tenants import Tenants
    from tests.support.traffic import Sidecars

# With CI=true a skip for a missing real part is a failure (only EXO_SRC's may stay a skip).
# The `transport` fixture: once per transport (direct reader, LiteLLM).
pytest_plugins = ["tests.support.real_parts", "tests.support.transports"]


def pytest_configure(config: pytest.Config) -> None:
    """Sidecars started by tests keep their spend ledger in a temporary directory, never in
    the user's data dir; it is removed when the run ends."""
    if "EXO_REMOTE_STATE_DIR" not in os.environ:
        state_dir = tempfile.mkdtemp(prefix="exo-remote-test-state-")
        os.environ["EXO_REMOTE_STATE_DIR"] = state_dir

        def remove() -> None:
            os.environ.pop("EXO_REMOTE_STATE_DIR", None)
            shutil.rmtree(state_dir, ignore_errors=True)

        config.add_cleanup(remove)


PLANTED_KEY = "sk-planted-0123456789abcdefPLANTEDKEY"


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with OpenAIUpstream() as up:
        yield up


@pytest.fixture
async def in_process_sidecars() -> AsyncIterator[InProcessSidecars]:
    """In-process sidecars (tests/support/sidecars.py), stopped at teardown."""
    started = InProcessSidecars()
    yield started
    await started.stop()


@pytest.fixture
def sidecar_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_process_sidecars: InProcessSidecars
) -> Callable[..., Awaitable[RunningSidecar]]:
    """Start sidecars serving the given aliases from an upstream, the planted key in the
    environment; ``exo_settings`` adds exo_remote_settings YAML lines, the rest are
    SidecarSettings fields. Stopped at teardown."""
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)

    async def start(upstream: OpenAIUpstream, *aliases: str, exo_settings: str = "", **settings: Any) -> RunningSidecar:
        path = tmp_path / f"config{len(in_process_sidecars.running)}.yaml"
        return await in_process_sidecars.start(write_config(path, upstream.url, aliases, exo_settings), **settings)

    return start


@pytest.fixture
async def tenants(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Tenants]:
    """Sidecars serving two nodes (an attacker and a victim, tests/support/tenants.py) with
    the planted key in the environment; stopped with their clients at teardown."""
    from tests.support.tenants import Tenants

    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    started = Tenants(tmp_path)
    yield started
    await started.stop()


@pytest.fixture
async def sidecars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sidecars]:
    """Sidecars over deployment groups on a controllable clock (tests/support/traffic.py)."""
    from tests.support.traffic import Sidecars

    monkeypatch.setenv(KEY_ENV, "sk-upstream-test-key-000000")
    started = Sidecars(tmp_path)
    yield started
    await started.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL on 127.0.0.1 for the session (Debian's package; see servers.py)."""
    from tests.support.real_parts import missing
    from tests.support.servers import PostgresServer, postgres_skip_reason

    reason = postgres_skip_reason()
    if reason is not None:
        missing(reason)
    server = PostgresServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis on 127.0.0.1 for the session (Debian's redis-server; see servers.py)."""
    yield from _started_redis()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A Redis of the test's own, for a test that stops and restarts it: the session's
    Redis, which other tests share, stays up whatever the test does."""
    yield from _started_redis()


def _started_redis() -> Iterator[RedisServer]:
    """One real Redis on 127.0.0.1, stopped when the caller is done; a missing redis-server
    is a failure under CI=true (real_parts.missing)."""
    from tests.support.real_parts import missing
    from tests.support.servers import RedisServer, redis_skip_reason

    reason = redis_skip_reason()
    if reason is not None:
        missing(reason)
    server = RedisServer()
    server.start()
    yield server
    server.close()
