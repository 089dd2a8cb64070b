"""``exo-remote usage``: spend, tokens and requests per node and model.

Three sources, one table: this host's ledger file (read directly, so it works while the
sidecar is down), every host's spend from the sidecars' shared PostgreSQL
(``--database``), or a sidecar's own ledger over the admin-only ``GetUsage`` RPC
(``--sidecar``; the token must be that sidecar's master key: a node's token must not read
every node's spend).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from exo_remote_engine.contract.redaction import redact
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import SidecarTarget
from exo_remote_engine.generated import remote_inference_pb2 as pb

if TYPE_CHECKING:  # the sidecar's modules are imported inside the commands (cli/__init__.py)
    from exo_remote_engine.sidecar.ledger.spend import UsageRow


def render_usage(
    state_dir: Path, node: str | None, since: str | None, now: float | None = None, database: str | None = None
) -> str:
    """Spend, tokens and requests per node and model, read from the ledger file itself:
    operators run this on the sidecar host, and it works while the sidecar is down. With
    ``database`` (the sidecars' ``--database``), every host's spend from PostgreSQL."""
    from exo_remote_engine.sidecar.config.loader import duration_seconds

    start = (now or time.time()) - duration_seconds(since) if since else 0.0
    if database is not None:
        from exo_remote_engine.sidecar.ledger.shared_services import display_url
        from exo_remote_engine.sidecar.ledger.spend_database import check_database_url, fetch_usage

        found = asyncio.run(fetch_usage(check_database_url(database), start, node))
        source = display_url(database)
    else:
        from exo_remote_engine.sidecar.ledger.spend import Ledger

        ledger = Ledger.open(state_dir, readonly=True)
        try:
            found = ledger.usage(start, node)
        finally:
            ledger.close()
        source = str(ledger.path)
    return usage_table(found, since, source)


def usage_table(found: Sequence[UsageRow], since: str | None, source: str) -> str:
    header = ("NODE", "MODEL", "REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "SPEND USD")
    rows = [header]
    unpriced = 0
    for r in found:
        if r.unpriced_requests == r.requests:
            spend = "unknown"  # never shown as 0: nothing says those requests were free
        else:
            spend = f"{r.cost_usd:.6f}" + (f" (+{r.unpriced_requests} unpriced)" if r.unpriced_requests else "")
        unpriced += r.unpriced_requests
        rows.append((r.node, r.alias, f"{r.requests:,}", f"{r.prompt_tokens:,}", f"{r.completion_tokens:,}", spend))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    total = sum(r.cost_usd for r in found)
    lines.append(f"(total ${total:.6f} since {'the start' if not since else since + ' ago'}; {source})")
    if unpriced:
        lines.append(f"{unpriced} requests used models without a known price: their cost is not in these sums")
    return "\n".join(lines)


def run_local_usage(args: argparse.Namespace) -> int:
    """This host's ledger (or ``--database``); exit status 0, or 1 with the reason."""
    from exo_remote_engine.sidecar.config.loader import ConfigError
    from exo_remote_engine.sidecar.config.variables import Environment
    from exo_remote_engine.sidecar.ledger.spend import default_state_dir

    database = args.database or (None if args.state_dir else Environment().get("EXO_REMOTE_DATABASE"))
    try:
        print(render_usage(args.state_dir or default_state_dir(), args.node, args.since, database=database))
    except (OSError, ValueError, sqlite3.Error, ConfigError) as exc:
        print(f"exo-remote: usage: {redact(str(exc))}", file=sys.stderr)
        return 1
    except Exception as exc:  # the database driver's errors (asyncpg is imported lazily)
        print(f"exo-remote: usage: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr)
        return 1
    return 0


async def run_remote_usage(target: SidecarTarget, args: argparse.Namespace) -> int:
    """A sidecar's ledger over GetUsage; RemoteError (e.g. PERMISSION_DENIED) goes to the caller."""
    from exo_remote_engine.sidecar.config.loader import ConfigError, duration_seconds

    if args.state_dir or args.database:
        print("exo-remote: usage: --sidecar asks that sidecar; --state-dir and --database read here", file=sys.stderr)
        return 2
    try:
        since_s = duration_seconds(args.since) if args.since else 0.0
    except ConfigError as exc:
        print(f"exo-remote: usage: {exc}", file=sys.stderr)
        return 2
    client = SidecarClient(target)
    try:
        response = await client.get_usage(args.node or "", since_s)
    finally:
        await client.close()
    print(redact(usage_table([_row(r) for r in response.rows], args.since, f"{target.address}: {response.source}")))
    return 0


def _row(row: pb.UsageRow) -> UsageRow:
    from exo_remote_engine.sidecar.ledger.spend import UsageRow

    return UsageRow(
        row.node, row.model, row.requests, row.prompt_tokens, row.completion_tokens, row.cost_usd, row.unpriced_requests
    )
