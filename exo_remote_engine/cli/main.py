"""``exo-remote``: check a sidecar without exo.

``exo-remote models`` prints the sidecar's models as a table (and the asking node's budget);
``exo-remote chat "Hi"`` streams a reply to stdout and the finish reason and usage to stderr;
``exo-remote topology`` draws an exo cluster's nodes from its API, asking each remote node's
sidecar directly; ``exo-remote usage`` prints spend, tokens and requests per node and model
from the sidecar's ledger; ``exo-remote doctor`` checks a node or (``--host``) the sidecar
host, each failure with its fix. The sidecar address, token and TLS files come from the same
environment variables the exo side reads.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from exo_remote_engine.cli.connection_hints import sidecar_hint
from exo_remote_engine.cli.doctor import add_arguments as add_doctor_arguments
from exo_remote_engine.cli.doctor import run as run_doctor
from exo_remote_engine.cli.topology_view import DEFAULT_API, positive_seconds
from exo_remote_engine.cli.topology_view import run as run_topology
from exo_remote_engine.cli.usage_view import render_usage as render_usage
from exo_remote_engine.cli.usage_view import run_local_usage, run_remote_usage
from exo_remote_engine.contract.addresses import AddressError, sidecar_target
from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.contract.openai_chat import FINISH_REASON_NAMES, chat_body_to_request
from exo_remote_engine.contract.redaction import SECRETS, redact
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import SidecarTarget
from exo_remote_engine.generated import remote_inference_pb2 as pb


def _yes_no(model: pb.Model, name: str) -> str:
    return ("yes" if getattr(model, name) else "no") if model.HasField(name) else "?"


def _tokens(model: pb.Model, name: str) -> str:
    return f"{getattr(model, name):,}" if model.HasField(name) else "?"


def render_models(response: pb.ListModelsResponse, show_all: bool = False) -> str:
    """The sidecar's warnings, ready models as a table, and the others as one line per
    reason (what would make them ready) with a count; ``show_all`` lists each of them."""
    header = ("MODEL", "PROVIDER", "CONTEXT", "MAX OUT", "TOOLS", "IMAGES")
    rows = [header]
    waiting: dict[str, list[str]] = {}
    for m in response.models:
        if not m.ready:
            waiting.setdefault(m.not_ready_reason or "not ready", []).append(m.alias)
            continue
        rows.append(
            (
                m.alias + (" *" if m.alias == response.default_model else ""),
                m.provider,
                _tokens(m, "context_window"),
                _tokens(m, "max_output_tokens"),
                _yes_no(m, "supports_tools"),
                _yes_no(m, "supports_images"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    # The sidecar's own warnings first (e.g. it serves anyone without authentication).
    lines = [f"WARNING: {warning}" for warning in response.warnings]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"({len(rows) - 1} ready; * default model; ? unknown)")
    # The echo stands in for a model; say so where a newcomer looks first.
    lines += [f"{m.alias}: {m.display_name}" for m in response.models if m.provider == "embedded" and m.display_name]
    if response.HasField("budget"):
        b = response.budget
        resets = f", resets in {_span(b.resets_in_seconds)}" if b.HasField("resets_in_seconds") else ""
        lines.append(
            f"budget of node {b.node}: ${b.remaining_usd:.6f} left of ${b.max_usd:g} (spent ${b.spent_usd:.6f}{resets})"
        )
    if waiting:
        total = sum(len(aliases) for aliases in waiting.values())
        by_size = sorted(waiting.items(), key=lambda item: -len(item[1]))
        lines.append("")
        if show_all:
            lines.append(f"{total} not ready:")
            for reason, aliases in by_size:
                lines.append(f"  {reason}:")
                lines += [f"    {alias}" for alias in aliases]
        else:
            lines.append(f"{total} more not ready (exo-remote models --all lists them):")
            lines += [f"  {reason}: {_count(len(aliases), 'model')}" for reason, aliases in by_size]
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _span(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if days else f"{hours}h {minutes}m"


async def _models(target: SidecarTarget, refresh: bool, show_all: bool) -> int:
    client = SidecarClient(target)
    try:
        print(redact(render_models(await client.list_models(refresh=refresh), show_all)))
    finally:
        await client.close()
    return 0


SPINNER = "|/-\\"
SPINNER_PERIOD_S = 0.1


async def _show_waiting(stream: TextIO, model: list[str]) -> None:
    """A one-line spinner on a terminal until cancelled (at the first token); the caller
    clears the line. ``model`` is read each frame: it is known once the sidecar said it."""
    started = time.monotonic()
    for frame in itertools.cycle(SPINNER):
        what = f"{model[0]}'s" if model else "the"
        stream.write(f"\r{frame} waiting for {what} first token... {time.monotonic() - started:.1f}s")
        stream.flush()
        await asyncio.sleep(SPINNER_PERIOD_S)


async def _chat(target: SidecarTarget, args: argparse.Namespace) -> int:
    client = SidecarClient(target)
    known_model: list[str] = [args.model] if args.model else []
    waiting = asyncio.create_task(_show_waiting(sys.stderr, known_model)) if sys.stderr.isatty() else None

    def stop_waiting() -> None:
        nonlocal waiting
        if waiting is not None:
            waiting.cancel()
            waiting = None
            sys.stderr.write("\r\x1b[K")  # erase the spinner's line
            sys.stderr.flush()

    try:
        model = args.model or (await client.list_models()).default_model
        known_model[:] = [model]
        body: dict[str, object] = {"messages": [{"role": "user", "content": args.prompt}]}
        if args.system:
            body["messages"] = [{"role": "system", "content": args.system}, *body["messages"]]  # type: ignore[misc]
        if args.max_tokens > 0:
            body["max_tokens"] = args.max_tokens
        if args.temperature is not None:
            body["temperature"] = args.temperature
        request = chat_body_to_request(body, request_id=str(uuid.uuid4()), model=model)
        last_text = ""
        async for event in client.generate(request):
            stop_waiting()
            if event.HasField("delta"):
                if event.delta.text:
                    last_text = event.delta.text
                sys.stdout.write(event.delta.text)
                sys.stdout.flush()
            elif event.HasField("finished"):
                f = event.finished
                # The summary goes on its own line: end the reply's line (unless the reply did)
                # and flush it before stderr writes, also when both go to one pipe.
                if last_text and not last_text.endswith("\n"):
                    sys.stdout.write("\n")
                sys.stdout.flush()
                print(
                    f"[{model} -> {f.model}: finish_reason={FINISH_REASON_NAMES.get(f.finish_reason, '?')}"
                    f" prompt_tokens={f.usage.prompt_tokens} completion_tokens={f.usage.completion_tokens}]",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        stop_waiting()
        await client.close()
    return 0


ENVIRONMENT = """\
environment (the same variables the exo side reads):
  EXO_REMOTE_SIDECAR        sidecar host[:port] when --sidecar is not given (default: 127.0.0.1:50505);
                            several hosts: IP:port,IP:port or dns:///name:port
  EXO_REMOTE_TOKEN          bearer token the sidecar expects (default: none)
  EXO_REMOTE_TOKEN_FILE     file holding that token, instead of EXO_REMOTE_TOKEN
  EXO_REMOTE_TLS_CA         CA file that signed the sidecar's certificate; set it for a TLS sidecar
  EXO_REMOTE_TLS_CERT, EXO_REMOTE_TLS_KEY
                            client certificate and key, for a sidecar that requires mTLS
  EXO_REMOTE_TLS_SERVER_NAME
                            name to check the sidecar's certificate against, if not its host
  EXO_REMOTE_DEADLINE_S     deadline of one chat call in seconds (default: 900)
"""


DEFAULT_CHAT_MAX_TOKENS = 1024  # a reply is never left to run to the context limit


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def sidecar_flag(text: str) -> str:
    """argparse type for ``--sidecar``: host[:port] (the port defaulting to 50505), a list
    of IP addresses, an ipv4:/ipv6: list or dns:///name:port."""
    try:
        return sidecar_target(text).target
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--sidecar ")) from None


def build_parser() -> argparse.ArgumentParser:
    """exo-remote's flags; ``--sidecar`` is accepted before or after the command."""
    sidecar_help = (
        "sidecar host[:port] (no port means 50505), or several hosts: IP:port,IP:port or dns:///name:port "
        "(default: EXO_REMOTE_SIDECAR, else 127.0.0.1:50505)"
    )
    parser = argparse.ArgumentParser(
        prog="exo-remote",
        description="Check an exo-remote sidecar without exo: list its models, stream a reply,\n"
        "or draw an exo cluster's nodes with their sidecars.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sidecar", type=sidecar_flag, help=sidecar_help)
    # The same flag after the command; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sidecar", type=sidecar_flag, default=argparse.SUPPRESS, help=sidecar_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{models,chat,usage,topology,doctor}")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            parents=[common],
            epilog=ENVIRONMENT,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    models = command("models", "list the sidecar's models, ready ones first")
    models.add_argument(
        "--refresh", action="store_true", help="ask the sidecar to rediscover its models first (default: off)"
    )
    models.add_argument(
        "--all", action="store_true", help="list every model that is not ready, not one line per reason (default: off)"
    )
    chat = command("chat", "stream one reply to stdout; finish reason and usage go to stderr")
    chat.add_argument("prompt", help="the user message")
    chat.add_argument("--model", help="model alias (default: the sidecar's default model)")
    chat.add_argument("--system", help="a system message sent before the prompt (default: none)")
    chat.add_argument(
        "--max-tokens",
        type=_non_negative,
        default=DEFAULT_CHAT_MAX_TOKENS,
        help=f"cap on the reply's tokens; 0 leaves it to the provider, which may run to the model's context "
        f"limit (default: {DEFAULT_CHAT_MAX_TOKENS})",
    )
    chat.add_argument("--temperature", type=float, help="sampling temperature (default: the provider's)")
    usage = command(
        "usage",
        "spend, tokens and requests per node and model: this host's ledger, every host's with --database, "
        "or with --sidecar that sidecar's (admin only: EXO_REMOTE_TOKEN must be its master_key)",
    )
    usage.add_argument("--node", help="only this node (default: every node)")
    usage.add_argument("--since", help="only the last DURATION, e.g. 24h, 7d, 1mo (default: everything)")
    usage.add_argument(
        "--state-dir",
        type=Path,
        help="the sidecar's --state-dir (default: EXO_REMOTE_STATE_DIR, else $XDG_DATA_HOME/exo-remote-engine)",
    )
    usage.add_argument(
        "--database",
        metavar="URL",
        help="the sidecars' --database: every host's spend from PostgreSQL (default: EXO_REMOTE_DATABASE, "
        "else the local ledger)",
    )
    topology = command("topology", "draw an exo cluster's nodes and ask each remote node's sidecar directly")
    topology.add_argument("--api", default=DEFAULT_API, help=f"exo's HTTP API (default: {DEFAULT_API})")
    topology.add_argument(
        "--timeout", type=positive_seconds, default=3.0, help="seconds for each HTTP or sidecar call (default: 3)"
    )
    topology.add_argument("--ascii", action="store_true", help="plain ASCII boxes (default: off)")
    topology.add_argument("--width", type=int, help="columns (default: the terminal's, else 100)")
    doctor = command(
        "doctor", "check this node's way to the sidecar (or, with --host, the sidecar host); exit 1 on a failure"
    )
    add_doctor_arguments(doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "usage" and not getattr(args, "sidecar", None):
        return run_local_usage(args)
    # The sidecar redacts what it sends; this process redacts against its own keys too
    # (it often runs where they are) before printing an error or a listing.
    SECRETS.add_environment(os.environ)
    try:
        target = SidecarTarget.from_env()
    except (AddressError, OSError) as exc:
        if args.command == "doctor":
            return run_doctor(args, None, str(exc))
        print(f"exo-remote: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "sidecar", None):
        target = replace(target, address=args.sidecar)
    if args.command == "doctor":
        return run_doctor(args, target, None)
    try:
        if args.command == "usage":
            return asyncio.run(run_remote_usage(target, args))
        if args.command == "topology":
            # Each remote node names its own sidecar; the environment gives token and TLS.
            return run_topology(args.api, args.timeout, target, ascii_only=args.ascii, width=args.width)
        if args.command == "models":
            return asyncio.run(_models(target, args.refresh, args.all))
        return asyncio.run(_chat(target, args))
    except RemoteError as exc:
        print(f"exo-remote: {exc.reason.value}: {redact(str(exc))}", file=sys.stderr)
        hint = sidecar_hint(exc, target)
        if hint:
            print(f"exo-remote: {hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
