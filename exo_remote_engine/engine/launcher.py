"""``exo-remote-node``: run classic exo with the remote engine, hooks installed explicitly.

The explicit twin of the ``.pth`` trigger, for environments where startup files are
disabled (``python -S``, some packagers). Every exo flag works as usual; ``--sidecar``
and the other add-on flags are consumed here; ``--inference-engine remote`` is implied.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import sys

from exo_remote_engine.contract.addresses import AddressError
from exo_remote_engine.engine.connection.target import SidecarTarget
from exo_remote_engine.engine.exo_hooks import ADDON_FLAGS, ENGINE_NAME, engine_requested, install, strip_addon_flags

# Help for the add-on's own flags (exo's come from exo's own --help).
_FLAG_HELP = {
    "--sidecar": "sidecar host[:port]; no port means 50505 (default: 127.0.0.1:50505)",
    "--sidecar-token-file": "file holding the bearer token the sidecar expects (default: none)",
    "--sidecar-tls-ca": "CA file that signed the sidecar's certificate, for a TLS sidecar (default: none, plaintext)",
    "--sidecar-tls-cert": "client certificate, for a sidecar that requires mTLS (default: none)",
    "--sidecar-tls-key": "key of --sidecar-tls-cert (default: none)",
}
NO_EXO = (
    "exo-remote-node: classic exo is not installed in this Python ({python}); install exo first "
    "(pip install -e <exo checkout>), then this package into the same environment"
)


def build_parser() -> argparse.ArgumentParser:
    """The add-on's flags, for --help; at run time they are taken out of argv by exo_hooks."""
    parser = argparse.ArgumentParser(
        prog="exo-remote-node",
        usage="exo-remote-node [add-on flags] [exo flags]",
        description="Run classic exo with the remote inference engine (--inference-engine remote is implied). "
        "Any exo flag works as with exo itself; exo's own flags follow below when exo is installed.",
        epilog="Each add-on flag sets the environment variable named in brackets; EXO_REMOTE_TOKEN may hold "
        "the token itself, EXO_REMOTE_DEADLINE_S bounds one Generate call (default: 900).",
    )
    for flag, variable in ADDON_FLAGS.items():
        parser.add_argument(flag, metavar=variable, help=f"{_FLAG_HELP.get(flag, '')} [{variable}]")
    return parser


def main() -> None:
    argv = sys.argv
    argv[0] = "exo"
    exo_installed = importlib.util.find_spec("exo") is not None
    if "-h" in argv[1:] or "--help" in argv[1:]:
        build_parser().print_help()
        if not exo_installed:
            print("\n" + NO_EXO.format(python=sys.executable), file=sys.stderr)
            sys.exit(0)
        print("\nexo's own flags:\n")
        sys.stdout.flush()
    elif not exo_installed:
        sys.exit(NO_EXO.format(python=sys.executable))
    strip_addon_flags(argv, os.environ)
    try:
        SidecarTarget.from_env()  # a malformed address or unreadable token file: say so before exo starts
    except (AddressError, OSError) as exc:
        sys.exit(f"exo-remote-node: {exc}")
    if engine_requested(argv) is None:
        argv[1:1] = ["--inference-engine", ENGINE_NAME]
    install(argv)
    runpy.run_module("exo.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
