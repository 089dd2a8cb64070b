"""The engine side's settings: every ``EXO_REMOTE_*`` variable an exo node, ``exo-remote``
or ``exo-remote-node`` reads, read here only.

The exo hooks turn the add-on's flags (``--sidecar`` ...) into these variables before exo
parses its own (:mod:`~exo_remote_engine.engine.exo_argv`), so the environment is
the one source. Standard library only: the interpreter-startup trigger reads
:attr:`EngineSettings.disabled` before anything else of the add-on is imported. README's
environment table is checked against :data:`VARIABLES` by a test.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DEADLINE_S = 900.0  # exo's own response timeout

VARIABLES: Mapping[str, str] = {
    "EXO_REMOTE_SIDECAR": "sidecar host[:port], IP:port,IP:port or dns:///name:port (--sidecar)",
    "EXO_REMOTE_TOKEN": "bearer token the sidecar expects",
    "EXO_REMOTE_TOKEN_FILE": "file holding that token (--sidecar-token-file)",
    "EXO_REMOTE_TLS_CA": "CA that signed the sidecar's certificate (--sidecar-tls-ca)",
    "EXO_REMOTE_TLS_CERT": "client certificate for mTLS (--sidecar-tls-cert)",
    "EXO_REMOTE_TLS_KEY": "its key (--sidecar-tls-key)",
    "EXO_REMOTE_TLS_SERVER_NAME": "name checked in the sidecar's certificate instead of its host",
    "EXO_REMOTE_DEADLINE_S": "deadline of one Generate call, seconds",
    "EXO_REMOTE_MULTIPLEX": "0: one Generate call per completion instead of a multiplexed Session (default 1)",
    "EXO_REMOTE_DISABLE": "1: the startup trigger installs nothing",
    "EXO_REMOTE_LOG_LEVEL": "level of the add-on's loggers in an exo node",
}


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


@dataclass(frozen=True)
class EngineSettings:
    """What the environment says, unchecked: an address or a token file is validated
    where it is used (:meth:`~exo_remote_engine.engine.connection.target.SidecarTarget.from_settings`)."""

    sidecar: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    deadline_s: float = DEFAULT_DEADLINE_S
    multiplex: bool = True
    disabled: bool = False
    log_level: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EngineSettings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            if name not in VARIABLES:
                raise KeyError(f"{name} is not an engine setting: declare it in VARIABLES")
            return env.get(name) or None

        deadline = env.get("EXO_REMOTE_DEADLINE_S")  # set but empty is an error, as a typo is
        return cls(
            sidecar=get("EXO_REMOTE_SIDECAR"),
            token=get("EXO_REMOTE_TOKEN"),
            token_file=_path(get("EXO_REMOTE_TOKEN_FILE")),
            tls_ca=_path(get("EXO_REMOTE_TLS_CA")),
            tls_cert=_path(get("EXO_REMOTE_TLS_CERT")),
            tls_key=_path(get("EXO_REMOTE_TLS_KEY")),
            tls_server_name=get("EXO_REMOTE_TLS_SERVER_NAME"),
            deadline_s=DEFAULT_DEADLINE_S if deadline is None else float(deadline),
            multiplex=(get("EXO_REMOTE_MULTIPLEX") or "1") != "0",
            disabled=(get("EXO_REMOTE_DISABLE") or "0") != "0",
            log_level=get("EXO_REMOTE_LOG_LEVEL"),
        )
