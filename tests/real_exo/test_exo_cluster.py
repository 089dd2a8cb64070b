"""Mixed clusters on real classic exo: remote nodes beside a local (dummy-engine) node,
all on 127.0.0.1 with manual discovery, the add-on installed on every node.
Skipped with the reason when EXO_SRC is not set."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.openai_upstream import OpenAIUpstream
from tests.support.processes import (
    ExoNode,
    SidecarProcess,
    exo_skip_reason,
    free_port,
    start_exo_node,
    start_sidecar_process,
    write_peers,
)

pytestmark = [pytest.mark.exo, pytest.mark.skipif(exo_skip_reason() is not None, reason=str(exo_skip_reason()))]

DUMMY_REPLY = "dummy" * 10  # exo's dummy engine: ten "dummy" tokens, then EOS


def _chat(node: ExoNode, model: str, text: str = "hello", timeout: float = 60) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}]}).encode()
    request = urllib.request.Request(f"{node.api}/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read() or b"{}"
        try:
            return exc.code, json.loads(raw)
        except ValueError:  # exo's own 500s are plain text
            return exc.code, {"non_json_body": raw.decode(errors="replace")[:2000]}


def _wait_models(node: ExoNode, models: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = {m["id"] for m in node.get_json("/v1/models")["data"]}
        if set(models) <= listed:
            return
        time.sleep(0.3)
    raise AssertionError(f"{node.node_id} never listed {models}")


def _chat_when_announced(
    node: ExoNode, model: str, text: str = "hello", timeout: float = 30
) -> tuple[int, dict[str, Any]]:
    """Chat, retrying only the documented transient answer: a peer that serves ``model``
    joined but has not announced itself yet (503 MODEL_NOT_READY with Retry-After)."""
    deadline = time.monotonic() + timeout
    while True:
        status, reply = _chat(node, model, text)
        waiting = status == 503 and "has not announced" in str(reply)
        if not waiting or time.monotonic() > deadline:
            return status, reply
        time.sleep(0.5)


def _wait_topology(node: ExoNode, count: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    topology: dict[str, Any] = {}
    while time.monotonic() < deadline:
        topology = node.get_json("/v1/topology")
        if len(topology.get("nodes", {})) == count:
            return topology
        time.sleep(0.3)
    raise AssertionError(f"{node.node_id} topology never had {count} nodes: {topology}")


class Cluster:
    def __init__(self, workdir: Path, upstream: OpenAIUpstream) -> None:
        self.workdir = workdir
        self.upstream = upstream
        self.sidecars: dict[str, SidecarProcess] = {}
        self.nodes: dict[str, ExoNode] = {}
        self.ports: dict[str, tuple[int, int]] = {}

    def sidecar(self, name: str, aliases: list[str]) -> SidecarProcess:
        config = self.workdir / f"{name}.json"
        config.write_text(
            json.dumps(
                {
                    alias: {"model": f"openai/{alias}", "api_base": f"{self.upstream.url}/v1", "api_key": "unused"}
                    for alias in aliases
                }
            )
        )
        self.sidecars[name] = start_sidecar_process(config, self.workdir / f"{name}.log")
        return self.sidecars[name]

    def plan(self, node_ids: list[str]) -> Path:
        for node_id in node_ids:
            self.ports[node_id] = (free_port(), free_port())
        return write_peers(self.workdir / "peers.json", {n: p[0] for n, p in self.ports.items()})

    def start(self, node_id: str, engine: str, sidecar: str | None = None) -> ExoNode:
        node_port, api_port = self.ports[node_id]
        env = {"EXO_REMOTE_SIDECAR": self.sidecars[sidecar].address} if sidecar else {}
        if os.environ.get("EXO_REMOTE_LOG_LEVEL"):  # debugging a cluster test: verbose nodes
            env["EXO_REMOTE_LOG_LEVEL"] = os.environ["EXO_REMOTE_LOG_LEVEL"]
        self.nodes[node_id] = start_exo_node(
            self.workdir, node_id, node_port, api_port, self.workdir / "peers.json", engine=engine, env=env
        )
        return self.nodes[node_id]

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        for sidecar in self.sidecars.values():
            sidecar.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with OpenAIUpstream.in_thread() as upstream:  # echo mode: "echo: " + the last user message
        c = Cluster(tmp_path, upstream)
        try:
            yield c
        finally:
            c.stop()


def test_remote_and_dummy_nodes_serve_both_models_from_both_apis(cluster: Cluster) -> None:
    cluster.sidecar("s1", ["echo-model"])
    cluster.plan(["r", "d"])
    remote = cluster.start("r", "remote", "s1")
    local = cluster.start("d", "dummy")
    _wait_topology(remote, 2)
    _wait_models(local, ["echo-model"])
    for node in (remote, local):
        status, reply = _chat(node, "echo-model", f"via {node.node_id}")
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == f"echo: via {node.node_id}"
        status, reply = _chat_when_announced(node, "dummy")
        assert status == 200, reply
        assert reply["choices"][0]["message"]["content"] == DUMMY_REPLY
        assert reply["choices"][0]["finish_reason"] == "stop"
    # tinychat on the dummy node shows the relayed remote model ready at once
    relayed = local.get_json("/initial_models")["echo-model"]
    assert relayed["loading"] is False and relayed["downloaded"] is True, relayed
    # No layer of the local model ever ran on the remote node.
    assert "which this node does not serve" not in remote.log_text()
    assert "Traceback" not in remote.log_text() and "Traceback" not in local.log_text()


def test_two_sidecars_and_a_dummy_every_model_from_every_node(cluster: Cluster) -> None:
    cluster.sidecar("s1", ["echo-model"])
    cluster.sidecar("s2", ["other-model"])
    cluster.plan(["r1", "r2", "d"])
    nodes = [cluster.start("r1", "remote", "s1"), cluster.start("r2", "remote", "s2"), cluster.start("d", "dummy")]
    for node in nodes:
        _wait_topology(node, 3)
        _wait_models(node, ["echo-model", "other-model"])
    for node in nodes:
        for model in ("echo-model", "other-model"):
            status, reply = _chat(node, model, f"{model} at {node.node_id}")
            assert status == 200, (node.node_id, model, reply)
            assert reply["choices"][0]["message"]["content"] == f"echo: {model} at {node.node_id}"
        status, reply = _chat_when_announced(node, "dummy")
        assert status == 200 and reply["choices"][0]["message"]["content"] == DUMMY_REPLY, reply
    described = _wait_topology(nodes[2], 3)["nodes"]
    assert described["r1"]["model"] == described["r2"]["model"] == "remote LLM"
    assert described["r1"]["chip"].startswith(f"sidecar {cluster.sidecars['s1'].address}: ")
    assert described["r2"]["chip"].startswith(f"sidecar {cluster.sidecars['s2'].address}: ")
    assert "echo-model" in described["r1"]["chip"] and "other-model" in described["r2"]["chip"]
    assert described["d"]["model"] != "remote LLM"
    assert all(d["memory"] >= 1024 for d in described.values()), "no node shows 0GB"


def test_a_remote_node_leaves_and_comes_back(cluster: Cluster) -> None:
    cluster.sidecar("s1", ["echo-model"])
    cluster.plan(["r", "d"])
    cluster.start("r", "remote", "s1")
    local = cluster.start("d", "dummy")
    _wait_models(local, ["echo-model"])
    _wait_topology(local, 2)
    status, reply = _chat(local, "echo-model")
    assert status == 200, reply
    cluster.nodes.pop("r").stop()
    deadline = time.monotonic() + 30
    status, reply = 200, {}
    while time.monotonic() < deadline:
        status, reply = _chat(local, "echo-model", timeout=30)
        if status != 200:
            break
        time.sleep(0.5)
    assert status == 503, reply
    assert "echo-model" in reply["error"]["message"] and "not reachable" in reply["error"]["message"]
    status, reply = _chat(local, "dummy")
    assert status == 200 and reply["choices"][0]["message"]["content"] == DUMMY_REPLY, "local models unaffected"
    cluster.start("r", "remote", "s1")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, reply = _chat(local, "echo-model", "back", timeout=30)
        if status == 200:
            break
        time.sleep(0.5)
    assert status == 200 and reply["choices"][0]["message"]["content"] == "echo: back", reply
    assert _chat(local, "dummy")[1]["choices"][0]["message"]["content"] == DUMMY_REPLY


def test_a_node_without_the_addon_is_reported(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    from exo_remote_engine.cli.main import main as cli_main

    cluster.sidecar("s1", ["echo-model"])
    cluster.plan(["r", "plain"])
    remote = cluster.start("r", "remote", "s1")
    node_port, api_port = cluster.ports["plain"]
    cluster.nodes["plain"] = start_exo_node(  # the stock exo, add-on switched off
        cluster.workdir,
        "plain",
        node_port,
        api_port,
        cluster.workdir / "peers.json",
        engine="dummy",
        env={"EXO_REMOTE_DISABLE": "1"},
    )
    deadline = time.monotonic() + 40
    missing: list[str] = []
    while time.monotonic() < deadline and not missing:
        missing = remote.get_json("/v1/topology").get("exo_remote", {}).get("nodes_without_addon", [])
        time.sleep(0.5)
    assert missing == ["plain"]
    assert "node plain runs without the exo-remote-engine add-on" in remote.log_text()
    assert cli_main(["topology", "--api", remote.api, "--ascii"]) == 0
    assert "WARNING: without the exo-remote-engine add-on: plain" in capsys.readouterr().out
    status, reply = _chat(remote, "echo-model")
    assert status == 200 and reply["choices"][0]["message"]["content"] == "echo: hello"


def test_tui_of_a_mixed_cluster_shows_remote_nodes(cluster: Cluster) -> None:
    import shutil
    import subprocess

    from tests.support.processes import PINS_VENV

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    cluster.sidecar("s1", ["echo-model"])
    cluster.plan(["r", "d"])
    remote = cluster.start("r", "remote", "s1")
    node_port, api_port = cluster.ports["d"]
    home = cluster.workdir / "home-tui"
    home.mkdir()
    command = (
        f"cd {home} && COLUMNS=200 LINES=90 HOME={home} EXO_HOME={home} TMPDIR={home} "
        f"{PINS_VENV}/bin/exo --inference-engine dummy "
        f"--discovery-module manual --discovery-config-path {cluster.workdir}/peers.json --node-id d "
        f"--node-host 127.0.0.1 --node-port {node_port} --chatgpt-api-port {api_port}"
    )
    session = f"exo-tui-{node_port}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "90", command], check=True)
    try:
        deadline = time.monotonic() + 40
        screen = ""
        while time.monotonic() < deadline:
            time.sleep(1)
            screen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True
            ).stdout
            if re.search(r"remote LLM \d+GB", screen) and "[1.00-1.00]" in screen:
                break
        (cluster.workdir / "tui.txt").write_text(screen)
        print(f"TUI capture: {cluster.workdir / 'tui.txt'}")
        # exo's TUI draws on a 100-column canvas and clips long labels: the remote node's
        # whole label (name and memory) fits, and both nodes sit on the ring.
        assert re.search(r"remote LLM \d+GB", screen), screen
        assert "Exo Cluster (2 nodes)" in screen
        assert remote.process.poll() is None
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
