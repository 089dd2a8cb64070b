"""Two tenants on one key holder: an attacker node and a victim node, each with its own
token and rules, on in-process sidecars over the scriptable upstream (issue 21).

:func:`tenant_config` writes a LiteLLM proxy config whose aliases are deployment groups of
upstream model names, with node rules and extra settings sections; :class:`Tenants` starts
sidecars on it (one, or several sharing Redis) and calls them as either node;
:func:`ledger_rows` reads what the ledger charged.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config
from tests.support.configs import KEY_ENV
from tests.support.harness import chat_request, sidecar_client

ATTACKER, VICTIM = "attacker", "victim"
# Tokens share no text with the node names: a token's fragments are redacted wherever they appear.
TOKENS = {ATTACKER: "tok-A-5f2e9c7d4b3a1e6f08", VICTIM: "tok-V-9a8b7c6d5e4f3a2b1c"}
CONTEXT_ERROR = "This model's maximum context length is 8192 tokens. However, your messages resulted in 90000 tokens."


def tenant_config(
    upstream_url: str,
    groups: Mapping[str, Sequence[str]],
    nodes: Mapping[str, Sequence[str]] = {},
    sections: str = "",
    prices: Mapping[str, tuple[float, float]] = {},
) -> str:
    """A proxy config: each alias a group of upstream model names (one deployment each),
    ``nodes`` their ``allowed_models``, ``sections`` extra top-level YAML, ``prices`` per
    alias (input, output USD per token)."""
    lines = ["model_list:"]
    for alias, members in groups.items():
        for member in members:
            lines += [
                f"  - model_name: {alias}",
                "    litellm_params:",
                f"      model: openai/{member}",
                f"      api_base: {upstream_url}/v1",
                f"      api_key: os.environ/{KEY_ENV}",
            ]
            if alias in prices:
                lines += [
                    f"      input_cost_per_token: {prices[alias][0]:.12f}",  # YAML 1.1 reads 1e-09 as text
                    f"      output_cost_per_token: {prices[alias][1]:.12f}",
                ]
    text = "\n".join(lines) + "\n" + sections
    if nodes:
        text += "exo_remote_settings:\n  nodes:\n"
        text += "".join(f"    {name}: {{allowed_models: {list(allowed)!r}}}\n" for name, allowed in nodes.items())
    return text


class Tenants:
    """Sidecars for one config text, each with the two nodes' tokens and its own ledger."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[RunningSidecar] = []
        self._clients: list[SidecarClient] = []

    def state_dir(self, index: int = 0) -> Path:
        return self.tmp_path / f"state{index}"

    async def start(self, config_text: str, **settings: Any) -> RunningSidecar:
        index = len(self.running)
        path = self.tmp_path / f"tenants{index}.yaml"
        path.write_text(config_text)
        fields: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "named_tokens": TOKENS,
            "state_dir": self.state_dir(index),
            **settings,
        }
        sidecar = await start_sidecar(SidecarSettings(**fields), load_config(path))
        self.running.append(sidecar)
        return sidecar

    def client(self, sidecar: RunningSidecar, node: str, **target: Any) -> SidecarClient:
        client = sidecar_client(sidecar.address, token=TOKENS[node], deadline_s=30, **target)
        self._clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self._clients:
            await client.close()
        for sidecar in self.running:
            await sidecar.stop(grace_s=None)


async def ask(client: SidecarClient, model: str, text: str = "hello", request_id: str | None = None) -> str:
    """The reply's text; raises the RemoteError the node got."""
    request = chat_request(model, text, request_id=request_id)
    return "".join([e.delta.text async for e in client.generate(request) if e.HasField("delta")])


async def outcome(client: SidecarClient, model: str, text: str = "hello") -> str | RemoteError:
    try:
        return await ask(client, model, text)
    except RemoteError as exc:
        return exc


def ledger_rows(state_dir: Path, expected: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """The ledger's rows once at least ``expected`` were written (they are written off the
    event loop), as dicts; whatever is there when ``timeout_s`` runs out."""
    deadline = time.monotonic() + timeout_s
    rows: list[dict[str, Any]] = []
    while True:
        path = state_dir / "spend.sqlite3"
        if path.exists():
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                db.row_factory = sqlite3.Row
                rows = [dict(r) for r in db.execute("SELECT * FROM requests ORDER BY id")]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


async def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    """Until ``predicate()`` holds (bounded): for events seen by another task."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)
