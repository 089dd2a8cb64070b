"""The sidecar's token file (``--token-file``), parsed strictly.

The file decides who may spend the provider keys, so nothing in it is guessed. Grammar,
one line at a time::

    # a comment (a line whose first non-blank character is #)
    node-a  tokA-0123456789abcdef
    node-b  tokB-0123456789abcdef   # a trailing comment, after blanks

Blank lines are ignored. A token line is a node name (letters, digits, ``.``, ``_``, ``-``,
``@``; it becomes the node's identity in rules, logs and metrics), blanks, the token
(visible ASCII, what an HTTP header carries unchanged), and optionally blanks and a
comment starting with ``#``. Anything else is a startup error naming the file and the
line (never the line's text: it may hold a secret). So are a repeated name, a repeated
token and a file without any token (which would otherwise mean "no authentication").
Like ssh with a private key, a file that group or others may read is reported.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from exo_remote_engine.sidecar.config.loader import ConfigError
from exo_remote_engine.sidecar.config.types import MASTER_KEY_NODE, read_operator_file

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_TOKEN = re.compile(r"[!-~]+")
ENV_TOKEN_NAME = "token-1"  # noqa: S105 - the node name of a token given as EXO_REMOTE_TOKEN


def load_token_file(path: Path) -> dict[str, str]:
    """Node name -> token from ``path``; ConfigError for anything but the grammar above."""
    text = read_operator_file(path, "token file")
    _warn_if_readable_by_others(path)
    tokens: dict[str, str] = {}
    name_line: dict[str, int] = {}
    token_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}: line {number}"
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) >= 2 and fields[1].startswith("#"):
            raise ConfigError(f"{where}: a node name without a token (expected `name token`)")
        if len(fields) > 2 and not fields[2].startswith("#"):
            raise ConfigError(
                f"{where}: {len(fields)} fields where `name token` was expected "
                "(a comment after the token must start with #)"
            )
        if len(fields) == 1:
            raise ConfigError(f"{where}: one field where `name token` was expected")
        name, token = fields[0], fields[1]
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: the node name must be 1-64 letters, digits, '.', '_', '-' or '@', "
                "starting with a letter or digit"
            )
        if not _TOKEN.fullmatch(token):
            raise ConfigError(f"{where}: the token must be visible ASCII characters only")
        if name == MASTER_KEY_NODE:
            raise ConfigError(
                f"{where}: the node name {MASTER_KEY_NODE!r} is reserved for general_settings.master_key; "
                "choose another name"
            )
        if name in name_line:
            raise ConfigError(f"{where}: node name {name!r} already has a token on line {name_line[name]}")
        if token in token_line:
            raise ConfigError(
                f"{where}: the same token as line {token_line[token]} (each node needs its own, "
                "or it cannot be told apart)"
            )
        name_line[name], token_line[token] = number, number
        tokens[name] = token
    if not tokens:
        raise ConfigError(
            f"{path}: no tokens in the token file (only comments or blank lines); an empty token set "
            "would turn authentication off. Add `name token` lines, or drop --token-file"
        )
    return tokens


def token_from_env(value: str) -> dict[str, str]:
    """``EXO_REMOTE_TOKEN`` as a one-node token set."""
    token = value.strip()
    if not _TOKEN.fullmatch(token):
        raise ConfigError("EXO_REMOTE_TOKEN: the token must be visible ASCII characters only")
    return {ENV_TOKEN_NAME: token}


def _warn_if_readable_by_others(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning(
            "WARNING: UNPROTECTED TOKEN FILE: permissions %04o for %s are too open; anyone who can "
            "read it can use this sidecar's provider keys. Run: chmod 600 %s",
            mode,
            path,
            path,
        )
