"""exo's /v1/topology as the CLI's topology view reads it: a remote node's entry, a fake exo
API serving a topology on 127.0.0.1, and the box of one node in the drawn text."""

from __future__ import annotations

from typing import Any

from aiohttp import web


def remote_node(address: str, chip: str = "remote: 1/1 models ready (x)") -> dict[str, Any]:
    """A remote node as the add-on describes it: ``remote LLM``, its sidecar in ``chip``."""
    models = chip.removeprefix("remote: ")
    return {"model": "remote LLM", "chip": f"sidecar {address}: {models}", "memory": 24105, "flops": {"fp16": 0.0}}


def box_of(text: str, node_id: str) -> str:
    """The column of boxes holding ``node_id``'s title, as text (boxes may sit side by side)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        col = line.find(f" {node_id} ")
        if col > 1 and line[col - 2] in "┌+":
            start = col - 2
            end = line.index("┐" if line[start] == "┌" else "+", start + 1) + 1
            return "\n".join(row[start:end] for row in lines[i : i + 6])
    raise AssertionError(f"no box for {node_id}:\n{text}")


async def serve_topology(topology: dict[str, Any]) -> tuple[web.AppRunner, str]:
    """An exo API on a free 127.0.0.1 port answering ``/v1/topology`` with ``topology``;
    the runner (clean it up) and the base URL."""

    async def handler(_: web.Request) -> web.Response:
        return web.json_response(topology)

    app = web.Application()
    app.router.add_get("/v1/topology", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"
