"""The add-on's own command-line flags, taken out of argv before exo's argparse runs
(exo rejects flags it does not know), and the engine the command line asks for."""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence

ENGINE_NAME = "remote"
# flag -> the environment variable it sets (the engine reads only the environment)
ADDON_FLAGS = {
    "--sidecar": "EXO_REMOTE_SIDECAR",
    "--sidecar-token-file": "EXO_REMOTE_TOKEN_FILE",
    "--sidecar-tls-ca": "EXO_REMOTE_TLS_CA",
    "--sidecar-tls-cert": "EXO_REMOTE_TLS_CERT",
    "--sidecar-tls-key": "EXO_REMOTE_TLS_KEY",
}


def strip_addon_flags(argv: list[str], environ: MutableMapping[str, str] | os._Environ[str]) -> None:
    """Move ``--sidecar X`` / ``--sidecar=X`` style flags from argv into the environment,
    in place; a flag without its value stops the program with a clear message."""
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name in ADDON_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"exo-remote: {name} needs a value")
                value = argv[i + 1]
                del argv[i : i + 2]
            else:
                del argv[i]
            environ[ADDON_FLAGS[name]] = value
            continue
        i += 1


def engine_requested(argv: Sequence[str]) -> str | None:
    """The value of ``--inference-engine`` (either spelling), or None when absent."""
    for i, arg in enumerate(argv):
        if arg == "--inference-engine" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--inference-engine="):
            return arg.split("=", 1)[1]
    return None
