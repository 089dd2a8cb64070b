"""The sidecar's ``EXO_REMOTE_*`` variables: the one list, and the one reader of them.

Standard library only and apart from :mod:`~exo_remote_engine.sidecar.serving.settings` (which
imports most of the sidecar), so that ``spend``, whose ledger ``exo-remote usage`` also
opens, reads its default directory through the same reader.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import overload

# Every EXO_REMOTE_* variable a user may set for the sidecar, and what it stands for.
VARIABLES: Mapping[str, str] = {
    "EXO_REMOTE_LISTEN": "--listen",
    "EXO_REMOTE_CONFIG": "--config",
    "EXO_REMOTE_EMBEDDED_MODEL": "--embedded-model",
    "EXO_REMOTE_EMBEDDED_THREADS": "--embedded-threads",
    "EXO_REMOTE_EMBEDDED_CTX": "--embedded-ctx",
    "EXO_REMOTE_EMBEDDED_PARALLEL": "--embedded-parallel",
    "EXO_REMOTE_EMBEDDED_ECHO": "--embedded-echo (1)",
    "EXO_REMOTE_LOG_LEVEL": "--log-level",
    "EXO_REMOTE_TOKEN_FILE": "--token-file",
    "EXO_REMOTE_TOKEN": "one accepted token when there is no --token-file",
    "EXO_REMOTE_METRICS_LISTEN": "--metrics-listen",
    "EXO_REMOTE_DISCOVER": "--no-discover (0)",
    "EXO_REMOTE_ENV_FILE": "--env-file",
    "EXO_REMOTE_SERVERS": "--server, comma-separated",
    "EXO_REMOTE_STALL_LIMIT_S": "--stall-limit-s",
    "EXO_REMOTE_WORKERS": "--workers",
    "EXO_REMOTE_OPENAI_FAST_PATH": "--no-openai-fast-path (0)",
    "EXO_REMOTE_STATE_DIR": "--state-dir",
    "EXO_REMOTE_ACCOUNTING": "--no-accounting (0)",
    "EXO_REMOTE_REDIS": "--redis",
    "EXO_REMOTE_DATABASE": "--database",
    "EXO_REMOTE_UVLOOP": "asyncio's loop instead of uvloop (0)",
    "EXO_REMOTE_CACHE": "where the embedded models' files are (no flag)",
}


class Environment:
    """Reads the declared sidecar variables from ``environ``, and nothing else."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str) -> str: ...
    def get(self, name: str, default: str | None = None) -> str | None:
        if name not in VARIABLES:
            raise KeyError(f"{name} is not a sidecar setting: declare it in VARIABLES")
        return self._environ.get(name, default)

    def flag(self, name: str) -> bool:
        """On unless set to 0."""
        return self.get(name, "1") != "0"
