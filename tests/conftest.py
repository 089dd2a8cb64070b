"""Shared fixtures: a real OpenAI-compatible upstream, a real sidecar on a real port."""

from __future__ import annotations

import os
import shutil
import tempfile

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config
from tests.support.openai_upstream import OpenAIUpstream

if TYPE_CHECKING:  # tests.support.traffic imports this module (through the harness)
    from tests.support.servers import PostgresServer, RedisServer
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
def write_proxy_config(path: Path, upstream_url: str, aliases: Iterable[str]) -> Path:
    """A LiteLLM proxy config.yaml, as a user would write it, pointing at the upstream."""
    lines = ["model_list:"]
    for alias in aliases:
        lines += [
            f"  - model_name: {alias}",
            "    litellm_params:",
            f"      model: openai/{alias}",
            f"      api_base: {upstream_url}/v1",
            "      api_key: os.environ/TEST_UPSTREAM_KEY",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
async def upstream() -> AsyncIterator[OpenAIUpstream]:
    async with OpenAIUpstream() as up:
        yield up


SidecarFactory = Callable[..., "AsyncIterator[RunningSidecar]"]


@pytest.fixture
async def sidecar_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., object]]:
    """Start sidecars serving the given aliases from an upstream; stopped at teardown."""
    monkeypatch.setenv("TEST_UPSTREAM_KEY", PLANTED_KEY)
    running: list[RunningSidecar] = []

    async def start(upstream: OpenAIUpstream, *aliases: str, **settings: object) -> RunningSidecar:
        config_path = write_proxy_config(tmp_path / f"config{len(running)}.yaml", upstream.url, aliases)
        sidecar = await start_sidecar(
            SidecarSettings(listen="127.0.0.1:0", config_path=config_path, **settings),  # type: ignore[arg-type]
            load_config(config_path),
        )
        running.append(sidecar)
        return sidecar

    yield start
    for sidecar in running:
        await sidecar.stop(grace_s=None)


@pytest.fixture
async def sidecars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Sidecars]:
    """Sidecars over deployment groups on a controllable clock (tests/support/traffic.py)."""
    from tests.support.traffic import KEY_ENV, Sidecars

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
    from tests.support.real_parts import missing
    from tests.support.servers import RedisServer, redis_skip_reason

    reason = redis_skip_reason()
    if reason is not None:
        missing(reason)
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    """A Redis of the test's own, for a test that stops and restarts it: the session's
    Redis, which other tests share, stays up whatever the test does."""
    from tests.support.real_parts import missing
    from tests.support.servers import RedisServer, redis_skip_reason

    reason = redis_skip_reason()
    if reason is not None:
        missing(reason)
    server = RedisServer()
    server.start()
    yield server
    server.close()
