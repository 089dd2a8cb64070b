"""The spend ledger's directory and files, private to the user running the sidecar.

The ledger names every node, model and request; its directory is the sidecar's state.
Opened for writing, the directory is made (or tightened to) ``0700`` and the database,
with SQLite's ``-wal`` and ``-shm`` files, ``0600``. A directory or file another user owns
is refused, not adopted: a world-writable ledger planted by someone else would let them
rewrite what budgets read. Looser modes on our own files are tightened, with a warning.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
_COMPANIONS = ("", "-wal", "-shm", "-journal")


class ForeignStateError(PermissionError):
    """A state directory or ledger file that another user owns, or that is not a plain
    directory or file."""


def secure_state(state_dir: Path, db_name: str) -> Path:
    """Make ``state_dir`` and its ledger files private (see the module doc); returns the
    database's path, created ``0600`` when it did not exist."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    _own(state_dir, stat.S_ISDIR, "directory", DIR_MODE)
    path = state_dir / db_name
    for suffix in _COMPANIONS:
        companion = path.with_name(path.name + suffix)
        if companion.is_symlink() or companion.exists():
            _own(companion, stat.S_ISREG, "file", FILE_MODE)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), FILE_MODE))
    return path


def _own(path: Path, kind: Callable[[int], bool], noun: str, mode: int) -> None:
    info = path.lstat()
    if not kind(info.st_mode):
        raise ForeignStateError(f"{path}: not a plain {noun} (a link or something else); refusing to use it")
    if os.name == "posix" and info.st_uid != os.getuid():
        raise ForeignStateError(
            f"{path}: owned by user id {info.st_uid}, not by this sidecar's user ({os.getuid()}); "
            "refusing to adopt another user's spend ledger. Use a --state-dir of your own"
        )
    loose = stat.S_IMODE(info.st_mode) & ~mode
    if loose:
        os.chmod(path, mode)
        was = stat.S_IMODE(info.st_mode)
        log.warning("%s was mode %04o: tightened to %04o (the ledger is private)", path, was, mode)
