"""The models the sidecar serves right now: configured aliases, plus discovery when on.

The servicer asks this one object what exists, what is ready, which model an alias
means and which to recommend; whether discovery runs behind it is a deployment choice,
not something the servicer knows about. Every credential a listed model may be called
with is registered with the process's secret registry here, before it can be sent: the
config's, the environment's (keys LiteLLM and the direct reader take implicitly) and,
at each refresh, discovery's (environment and ``--env-file``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from exo_remote_engine.contract.redaction import SECRETS
from exo_remote_engine.sidecar.config.loader import SidecarConfig
from exo_remote_engine.sidecar.discovery import (
    DiscoveredModel,
    ModelDiscovery,
    ServerSpec,
    choose_default,
)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines (dotenv style, ``#`` comments, optional quotes); missing file = {}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return {}
    values: dict[str, str] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


class ModelRegistry:
    def __init__(self, config: SidecarConfig, discovery: ModelDiscovery | None = None) -> None:
        self.config = config
        self.discovery = discovery
        self._static = [DiscoveredModel(entry, ready=True) for entry in config.models]
        SECRETS.add_all(config.secrets)
        SECRETS.add_environment(os.environ)

    @classmethod
    def with_discovery(
        cls,
        config: SidecarConfig,
        *,
        env_file: Path | None = None,
        servers: tuple[ServerSpec, ...] = (),
        ttl_s: float = 60.0,
        timeout_s: float = 5.0,
    ) -> ModelRegistry:
        """Discovery over the process environment, overlaid by ``env_file`` re-read at every
        refresh (so a key added there is picked up without a restart)."""

        def environ() -> Mapping[str, str]:
            env = {**os.environ, **read_env_file(env_file)} if env_file else os.environ
            SECRETS.add_environment(env)  # read at every refresh: a key added there is a secret now
            return env

        for server in servers:
            SECRETS.add(server.api_key)
            SECRETS.add_url(server.base_url)
        discovery = ModelDiscovery(
            config_entries=config.models, environ=environ, servers=servers, ttl=ttl_s, timeout=timeout_s
        )
        return cls(config, discovery)

    async def models(self, refresh: bool = False) -> list[DiscoveredModel]:
        if self.discovery is None:
            return list(self._static)
        found = await self.discovery.snapshot(refresh=refresh)
        SECRETS.add_all(self.discovery.secrets)
        return found

    async def lookup(self, alias: str) -> DiscoveredModel | None:
        if self.discovery is None:
            return next((m for m in self._static if m.alias == alias), None)
        found = await self.discovery.lookup(alias)
        SECRETS.add_all(self.discovery.secrets)
        return found

    def default(self, models: list[DiscoveredModel]) -> str:
        preferred = self.config.default_model if self.config.path is not None else None
        return choose_default(models, preferred) or self.config.default_model

    def start(self) -> None:
        if self.discovery is not None:
            self.discovery.start()

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
