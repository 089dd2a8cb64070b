"""``python -m exo_remote_engine.cli``: the same as ``exo-remote``."""

from exo_remote_engine.cli.main import main

raise SystemExit(main())
