"""Helpers for the traffic and spend tests: config fragments in LiteLLM's shape, and
in-process sidecars on a controllable clock (tests/support/clock.py) that use them."""

from __future__ import annotations

import collections
from pathlib import Path

from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.server import RunningSidecar
from tests.support.clock import MINUTE_START, FakeClock
from tests.support.configs import KEY_ENV, deployment
from tests.support.harness import chat_request, drain
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.sidecars import InProcessSidecars


class Sidecars(InProcessSidecars):
    """In-process sidecars for config texts, their ledger in ``tmp_path/state``."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(state_dir=tmp_path / "state")
        self.tmp_path = tmp_path

    async def start(self, text: str, clock: FakeClock, **settings: object) -> RunningSidecar:  # type: ignore[override]
        path = self.tmp_path / f"config{len(self.running)}.yaml"
        path.write_text(text)
        return await super().start(path, clock=clock, **settings)


async def complete(client: SidecarClient, model: str, text: str = "hi") -> str:
    return (await drain(client, chat_request(model, text), catch=False)).text


async def outcome(client: SidecarClient, model: str) -> RemoteError | None:
    try:
        await complete(client, model)
    except RemoteError as exc:
        return exc
    return None


def served_counts(upstream: OpenAIUpstream) -> collections.Counter[str]:
    return collections.Counter(r.model for r in upstream.requests if r.model)


__all__ = ["KEY_ENV", "MINUTE_START", "FakeClock", "Sidecars", "complete", "deployment", "outcome", "served_counts"]
