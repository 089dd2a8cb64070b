"""In-process sidecars on free 127.0.0.1 ports, the one way tests start them.

``start(config, **settings)`` runs ``start_sidecar`` with a config file (None: no config,
the embedded model) and any :class:`SidecarSettings` field; ``stop()`` stops every sidecar
started, without a grace period. The ``in_process_sidecars`` fixture (tests/conftest.py)
stops them at teardown; ``sidecar_for`` builds on it for the usual upstream-backed config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config


class InProcessSidecars:
    """Sidecars started in this process, stopped together."""

    def __init__(self, **defaults: Any) -> None:
        self.defaults = {"listen": "127.0.0.1:0", **defaults}
        self.running: list[RunningSidecar] = []

    async def start(self, config: Path | None = None, **settings: Any) -> RunningSidecar:
        fields = {**self.defaults, **settings}
        if config is not None:
            fields.setdefault("config_path", config)
        sidecar = await start_sidecar(SidecarSettings(**fields), load_config(config))
        self.running.append(sidecar)
        return sidecar

    async def stop(self) -> None:
        while self.running:
            await self.running.pop().stop(grace_s=None)
