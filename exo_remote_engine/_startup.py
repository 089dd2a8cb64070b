"""Interpreter-startup trigger: installs the exo hooks just before ``exo.main`` loads.

Run from ``exo_remote_engine.pth`` (and ``exo_remote_engine.start`` on Python 3.15+,
PEP 829). It must stay cheap and can never break an interpreter: it imports nothing
heavy, only adds a meta-path finder, and swallows its own failures. The finder acts only
when ``exo.main`` is imported, so every other Python program is untouched.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

_TARGET = "exo.main"


class _ExoMainFinder(MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != _TARGET:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _ExoMainFinder)]
        try:
            from exo_remote_engine.engine.settings import EngineSettings  # standard library only

            if EngineSettings.from_env().disabled:
                return None  # the escape hatch: run this exo exactly as it ships
            from exo_remote_engine.engine.exo_hooks import install

            install()
        except SystemExit:
            raise
        except Exception as exc:  # never take exo down because of the add-on
            print(f"exo-remote: hooks not installed: {exc!r}", file=sys.stderr)
        return None  # let the normal finders load exo.main, now with hooks in place


def install_trigger() -> None:
    """Entry point for the .pth line and the PEP 829 .start file; idempotent."""
    try:
        if not any(isinstance(f, _ExoMainFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _ExoMainFinder())
    except Exception:  # noqa: S110 - startup must never fail
        pass
