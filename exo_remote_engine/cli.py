"""``exo-remote``: check a sidecar without exo.

``exo-remote models`` prints the sidecar's models as a table; ``exo-remote chat "Hi"``
streams a reply to stdout and the finish reason and usage to stderr; ``exo-remote topology``
draws an exo cluster's nodes from its API, asking each remote node's sidecar directly. The
sidecar address, token and TLS files come from the same environment variables the exo side reads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import replace

from exo_remote_engine.engine.client import SidecarClient, SidecarTarget
from exo_remote_engine.errors import RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.openai_wire import FINISH_REASON_NAMES, chat_body_to_request
from exo_remote_engine.redaction import SECRETS, redact
from exo_remote_engine.topology_view import DEFAULT_API, positive_seconds
from exo_remote_engine.topology_view import run as run_topology


def _yes_no(model: pb.Model, name: str) -> str:
    return ("yes" if getattr(model, name) else "no") if model.HasField(name) else "?"


def _tokens(model: pb.Model, name: str) -> str:
    return f"{getattr(model, name):,}" if model.HasField(name) else "?"


def render_models(response: pb.ListModelsResponse) -> str:
    """Ready models as a table; the others grouped under what would make them ready."""
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
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"({len(rows) - 1} ready; * default model; ? unknown)")
    if waiting:
        lines.append("")
        lines.append("not ready:")
        for reason, aliases in waiting.items():
            shown = ", ".join(aliases[:4]) + (f", ... ({len(aliases)} models)" if len(aliases) > 4 else "")
            lines.append(f"  {reason}: {shown}")
    return "\n".join(lines)


async def _models(target: SidecarTarget, refresh: bool) -> int:
    client = SidecarClient(target)
    try:
        print(redact(render_models(await client.list_models(refresh=refresh))))
    finally:
        await client.close()
    return 0


async def _chat(target: SidecarTarget, args: argparse.Namespace) -> int:
    client = SidecarClient(target)
    try:
        model = args.model or (await client.list_models()).default_model
        body: dict[str, object] = {"messages": [{"role": "user", "content": args.prompt}]}
        if args.system:
            body["messages"] = [{"role": "system", "content": args.system}, *body["messages"]]  # type: ignore[misc]
        if args.max_tokens:
            body["max_tokens"] = args.max_tokens
        if args.temperature is not None:
            body["temperature"] = args.temperature
        request = chat_body_to_request(body, request_id=str(uuid.uuid4()), model=model)
        async for event in client.generate(request):
            if event.HasField("delta"):
                sys.stdout.write(event.delta.text)
                sys.stdout.flush()
            elif event.HasField("finished"):
                f = event.finished
                print()
                print(
                    f"[{model} -> {f.model}: finish_reason={FINISH_REASON_NAMES.get(f.finish_reason, '?')}"
                    f" prompt_tokens={f.usage.prompt_tokens} completion_tokens={f.usage.completion_tokens}]",
                    file=sys.stderr,
                )
    finally:
        await client.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exo-remote", description=__doc__.splitlines()[0])
    parser.add_argument("--sidecar", help="host:port (default: EXO_REMOTE_SIDECAR or 127.0.0.1:50505)")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list the sidecar's models")
    models.add_argument("--refresh", action="store_true", help="ask the sidecar to rediscover first")
    chat = sub.add_parser("chat", help="stream one reply")
    chat.add_argument("prompt")
    chat.add_argument("--model", help="alias (default: the sidecar's default model)")
    chat.add_argument("--system")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    topology = sub.add_parser("topology", help="draw an exo cluster's nodes and their sidecars")
    topology.add_argument("--api", default=DEFAULT_API, help=f"exo's API (default: {DEFAULT_API})")
    topology.add_argument(
        "--timeout", type=positive_seconds, default=3.0, help="seconds for each HTTP or sidecar call (default: 3)"
    )
    topology.add_argument("--ascii", action="store_true", help="plain ASCII boxes")
    topology.add_argument("--width", type=int, help="columns (default: the terminal's, else 100)")
    args = parser.parse_args(argv)
    # The sidecar redacts what it sends; this process redacts against its own keys too
    # (it often runs where they are) before printing an error or a listing.
    SECRETS.add_environment(os.environ)
    target = SidecarTarget.from_env()
    if args.sidecar:
        target = replace(target, address=args.sidecar)
    try:
        if args.command == "topology":
            # Each remote node names its own sidecar; the environment gives token and TLS.
            return run_topology(args.api, args.timeout, target, ascii_only=args.ascii, width=args.width)
        if args.command == "models":
            return asyncio.run(_models(target, args.refresh))
        return asyncio.run(_chat(target, args))
    except RemoteError as exc:
        print(f"exo-remote: {exc.reason.value}: {redact(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
