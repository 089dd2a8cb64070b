"""``exo-remote-node``: run classic exo with the remote engine, hooks installed explicitly.

The explicit twin of the ``.pth`` trigger, for environments where startup files are
disabled (``python -S``, some packagers). Every exo flag works as usual; ``--sidecar``
and the other add-on flags are consumed here; ``--inference-engine remote`` is implied.
"""

from __future__ import annotations

import runpy
import sys

from exo_remote_engine.engine.exo_hooks import ENGINE_NAME, engine_requested, install


def main() -> None:
    argv = sys.argv
    argv[0] = "exo"
    if engine_requested(argv) is None:
        argv[1:1] = ["--inference-engine", ENGINE_NAME]
    install(argv)
    runpy.run_module("exo.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
