"""Helpers for the traffic and spend tests: config fragments in LiteLLM's shape, and
in-process sidecars on a controllable clock (tests/support/clock.py) that use them."""

from __future__ import annotations

import collections
from pathlib import Path

from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.engine.client import SidecarClient
from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config
from tests.support.clock import FakeClock
from tests.support.harness import chat_request
from tests.support.openai_upstream import OpenAIUpstream

KEY_ENV = "TEST_UPSTREAM_KEY"


def deployment(alias: str, model: str, url: str, **params: object) -> str:
    lines = [
        f"  - model_name: {alias}",
        "    litellm_params:",
        f"      model: openai/{model}",
        f"      api_base: {url}/v1",
        f"      api_key: os.environ/{KEY_ENV}",
        *(f"      {k}: {v}" for k, v in params.items()),
    ]
    return "\n".join(lines) + "\n"


class Sidecars:
    """In-process sidecars for config texts, their ledger in ``tmp_path/state``."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[RunningSidecar] = []

    async def start(self, text: str, clock: FakeClock, **settings: object) -> RunningSidecar:
        path = self.tmp_path / f"config{len(self.running)}.yaml"
        path.write_text(text)
        fields: dict[str, object] = {"listen": "127.0.0.1:0", "clock": clock, "state_dir": self.tmp_path / "state"}
        sidecar = await start_sidecar(SidecarSettings(**{**fields, **settings}), load_config(path))  # type: ignore[arg-type]
        self.running.append(sidecar)
        return sidecar

    async def stop(self) -> None:
        for sidecar in self.running:
            await sidecar.stop(grace_s=None)


async def complete(client: SidecarClient, model: str, text: str = "hi") -> str:
    return "".join([e.delta.text async for e in client.generate(chat_request(model, text))])


async def outcome(client: SidecarClient, model: str) -> RemoteError | None:
    try:
        await complete(client, model)
    except RemoteError as exc:
        return exc
    return None


def served_counts(upstream: OpenAIUpstream) -> collections.Counter[str]:
    return collections.Counter(r.model for r in upstream.requests if r.model)
