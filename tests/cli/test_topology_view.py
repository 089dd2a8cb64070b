"""``exo-remote topology``: the pure rendering, and the command against a real sidecar and HTTP server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from exo_remote_engine.cli.main import main
from exo_remote_engine.cli.topology_view import (
    NOT_PROBED,
    NOT_SERVING,
    SERVING,
    UNREACHABLE,
    SidecarInfo,
    collect_sidecars,
    render_topology,
)
from exo_remote_engine.engine.connection.target import SidecarTarget
from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from tests.support.topology import box_of, remote_node, serve_topology

API = "http://127.0.0.1:52415"


MIXED: dict[str, Any] = {
    "nodes": {
        "node-alpha": remote_node("10.0.0.5:50505", "remote: 2/3 models ready (echo-model, tools-model)"),
        "node-beta": remote_node("10.0.0.6:50506", "remote: 1/1 models ready (gpt-4o-mini)"),
        "node-local": {
            "model": "Linux Box (Device: CLANG)",
            "chip": "Unknown Chip (Device: CLANG)",
            "memory": 24105,
            "flops": {"fp32": 1.2, "fp16": 2.4, "int8": 4.8},
        },
    },
    "peer_graph": {
        "node-alpha": [{"from_id": "node-alpha", "to_id": "node-local", "description": "Direct connection"}],
        "node-local": [
            {"from_id": "node-local", "to_id": "node-alpha", "description": "Direct connection"},
            "node-beta",
        ],
    },
    "active_node_id": "node-local",
}
SIDECARS = {
    "10.0.0.5:50505": SidecarInfo("10.0.0.5:50505", SERVING, ("echo-model", "tools-model"), not_ready=1),
    "10.0.0.6:50506": SidecarInfo("10.0.0.6:50506", NOT_SERVING, ("gpt-4o-mini",)),
}


def test_mixed_topology_names_every_node_and_its_sidecar() -> None:
    text = render_topology(MIXED, SIDECARS, API)
    assert text.splitlines()[0] == f"exo cluster at {API} — 3 nodes (2 remote, 1 local)"
    alpha, beta, local = (box_of(text, n) for n in ("node-alpha", "node-beta", "node-local"))
    assert "REMOTE" in alpha and "10.0.0.5:50505" in alpha
    assert "echo-model, tools-model" in alpha and "2/3 ready" in alpha and "SERVING" in alpha
    assert "REMOTE" in beta and "10.0.0.6:50506" in beta and "gpt-4o-mini" in beta and "NOT SERVING" in beta
    assert "LOCAL" in local and "Linux Box (CLANG)" in local and "23.5 GB" in local and "fp16 2.4" in local
    assert "(active)" in local and "(active)" not in alpha + beta
    assert "GB" not in alpha + beta  # remote capacity is its models, not memory
    assert "  node-alpha ── node-local  (Direct connection)" in text
    assert "  node-local ─▶ node-beta" in text
    assert all(len(line) <= 100 for line in text.splitlines())


def test_unreachable_sidecar_shows_what_exo_reports() -> None:
    sidecars = {**SIDECARS, "10.0.0.6:50506": SidecarInfo("10.0.0.6:50506", UNREACHABLE, detail="connection refused")}
    beta = box_of(render_topology(MIXED, sidecars, API), "node-beta")
    assert "unreachable: connection refused" in beta
    assert "exo says: 1/1 models ready (gpt-4o-mini)" in beta


def test_empty_topology_says_no_nodes() -> None:
    empties: list[dict[str, Any]] = [{}, {"nodes": {}, "peer_graph": {}, "active_node_id": None}]
    for empty in empties:
        text = render_topology(empty, {}, API)
        assert text == f"exo cluster at {API} — no nodes in the topology (exo may still be discovering)"


def test_ascii_has_only_ascii() -> None:
    text = render_topology(MIXED, SIDECARS, API, ascii_only=True)
    assert text.isascii()
    assert "+- node-alpha " in text and "| REMOTE  sidecar 10.0.0.5:50505  *" in text
    assert "  node-alpha -- node-local" in text


@pytest.mark.parametrize("width", [40, 60, 80, 100, 140])
def test_long_model_lists_fit_the_width(width: int) -> None:
    many = tuple(f"provider/very-long-model-name-number-{i}" for i in range(30))
    sidecars = {**SIDECARS, "10.0.0.5:50505": SidecarInfo("10.0.0.5:50505", SERVING, many, not_ready=4)}
    text = render_topology(MIXED, sidecars, API, width=width)
    assert all(len(line) <= width for line in text.splitlines()), text
    alpha = box_of(text, "node-alpha")
    assert "models: provider/very-" in alpha and " more" in alpha and "30/34 ready" in alpha


def test_many_nodes_wrap_onto_rows() -> None:
    topology = {"nodes": {f"n{i}": remote_node(f"10.0.1.{i}:50505") for i in range(7)}}
    text = render_topology(topology, {}, API)
    assert all(len(line) <= 100 for line in text.splitlines())
    assert sum(line.count("┌─") for line in text.splitlines()) == 7
    assert sum(1 for line in text.splitlines() if "┌─" in line) > 1  # more than one row
    assert "links: none reported" in text


def test_tolerates_odd_shapes() -> None:
    topology = {
        "nodes": {"a": {}, "b": "not a dict", "c": {"model": None, "memory": "lots"}},
        "peer_graph": {"a": "b", "b": None, "c": [{"to_id": "a"}, {"from_id": "c"}, 7]},
        "active_node_id": "zz",
    }
    text = render_topology(topology, {}, API)
    for node_id in ("a", "b", "c"):
        assert box_of(text, node_id)
    assert "a ─▶ b" in text and "c ─▶ a" in text
    assert "active node: zz" in text


def test_escapes_from_the_network_are_not_printed() -> None:
    topology = {"nodes": {"evil\x1b[2J": remote_node("10.0.0.9:1\nx", "remote: \x07")}}
    text = render_topology(topology, {}, API)
    assert "\x1b" not in text and "\x07" not in text and "1\nx" not in text


# --- end to end: a real sidecar, a real HTTP server, the real command -------------------------
@pytest.fixture
async def sidecar() -> AsyncIterator[RunningSidecar]:
    running = await start_sidecar(SidecarSettings(listen="127.0.0.1:0"))
    yield running
    await running.stop(grace_s=None)


@pytest.fixture
def dead_address() -> Iterator[str]:
    """A port that is bound (so nobody else takes it) but refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.timeout(20)
async def test_topology_command_end_to_end(
    sidecar: RunningSidecar, dead_address: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("EXO_REMOTE_SIDECAR", "EXO_REMOTE_TOKEN", "EXO_REMOTE_TOKEN_FILE", "EXO_REMOTE_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    topology = {
        "nodes": {
            "live": remote_node(sidecar.address, "remote: 1/1 models ready (embedded-echo)"),
            "dead": remote_node(dead_address, "remote: 1/1 models ready (gone-model)"),
            "box": {"model": "Linux Box (Device: CLANG)", "chip": "Unknown Chip", "memory": 8192, "flops": {}},
        },
        "peer_graph": {"live": [{"from_id": "live", "to_id": "box", "description": "Direct connection"}]},
        "active_node_id": None,
    }
    runner, url = await serve_topology(topology)
    try:
        # main() runs its own event loop: give it a thread, keep this loop serving HTTP and gRPC.
        started = asyncio.get_running_loop().time()
        code = await asyncio.to_thread(main, ["topology", "--api", url, "--timeout", "3", "--width", "100"])
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        await runner.cleanup()
    out, err = capsys.readouterr()
    assert code == 0, err
    assert elapsed < 5
    assert f"exo cluster at {url}" in out and "3 nodes (2 remote, 1 local)" in out
    live, dead = box_of(out, "live"), box_of(out, "dead")
    assert sidecar.address in live and "SERVING" in live and "NOT SERVING" not in live
    assert "models: embedded-echo" in live and "1/1 ready" in live
    assert dead_address in dead and "unreachable" in dead and "Traceback" not in out + err
    assert "exo says: 1/1 models ready (gone-model)" in dead
    assert "LOCAL" in box_of(out, "box") and "8.0 GB" in out
    assert "live ─▶ box" in out or "live -> box" in out


async def test_topology_command_when_exo_is_away(dead_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = await asyncio.to_thread(main, ["topology", "--api", dead_address, "--timeout", "2"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert f"cannot reach exo at http://{dead_address}/v1/topology" in err and "Traceback" not in err


async def test_loopback_sidecars_of_another_machine_are_not_probed() -> None:
    topology = {"nodes": {"far": remote_node("127.0.0.1:50505", "remote: 1/1 models ready (x)")}}
    # TEST-NET-1: certainly not this machine, and never contacted (loopback is skipped first).
    sidecars = await collect_sidecars(topology, "http://192.0.2.1:52415", SidecarTarget(), timeout_s=1)
    assert sidecars["127.0.0.1:50505"].status == NOT_PROBED
    far = box_of(render_topology(topology, sidecars, "http://192.0.2.1:52415"), "far")
    assert "not probed: loopback of that node's machine" in far and "exo says: 1/1 models ready (x)" in far


@pytest.mark.timeout(30)
async def test_every_host_of_a_several_host_sidecar_is_shown_with_its_health(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote node pointed at three sidecar hosts (real ones on 127.0.0.2 and 127.0.0.3,
    one of them draining, and a refusing port on 127.0.0.4): one box, each host's state."""
    for name in ("EXO_REMOTE_SIDECAR", "EXO_REMOTE_TOKEN", "EXO_REMOTE_TOKEN_FILE", "EXO_REMOTE_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    up = await start_sidecar(SidecarSettings(listen="127.0.0.2:0"))
    draining = await start_sidecar(SidecarSettings(listen="127.0.0.3:0"))
    draining.health.set_all(False)  # what a draining sidecar says (it then stops listening)
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.4", 0))
        away = f"127.0.0.4:{refusing.getsockname()[1]}"
        hosts = [f"127.0.0.2:{up.port}", f"127.0.0.3:{draining.port}", away]
        target = "ipv4:" + ",".join(hosts)
        topology = {"nodes": {"multi": remote_node(target, "remote: 1/1 models ready (embedded-echo)")}}
        runner, url = await serve_topology(topology)
        try:
            code = await asyncio.to_thread(main, ["topology", "--api", url, "--timeout", "3", "--width", "120"])
            sidecars = await collect_sidecars(topology, url, SidecarTarget(), timeout_s=3)
        finally:
            await runner.cleanup()
            await up.stop(grace_s=None)
            await draining.stop(grace_s=None)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert sidecars[target].hosts == ((hosts[0], SERVING), (hosts[1], NOT_SERVING), (away, UNREACHABLE))
    box = "\n".join(line for line in out.splitlines() if "sidecar hosts" in line or "127.0.0." in line)
    assert "1/3 sidecar hosts serving" in box, out
    for host, status in zip(hosts, ("SERVING", "NOT SERVING", "unreachable"), strict=True):
        assert any(host in line and line.rstrip(" │|").endswith(status) for line in out.splitlines()), (host, out)
