"""exo's own TUI on a remote node, read from a real terminal (tmux) running the stock
``exo --inference-engine remote`` with two sidecar hosts (127.0.0.2 and 127.0.0.3, one
target naming both): after one request the prompt panel shows the user's text (not the
add-on's envelope) and the node's entry on the ring lists each sidecar host with its
health, as docs/hosts.md says (issue #27). Skipped with the reason when EXO_SRC is not set
or tmux is missing."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.processes import (
    PINS_VENV,
    SidecarProcess,
    exo_skip_reason,
    free_port,
    start_sidecar_process,
    write_peers,
)

pytestmark = [
    pytest.mark.exo,
    pytest.mark.skipif(exo_skip_reason() is not None, reason=str(exo_skip_reason())),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (bootstrap installs it, EXO_SRC)"),
]

HOSTS = ("127.0.0.2", "127.0.0.3")
QUESTION = "What is the capital of France, asked from the TUI test?"
PASSED_ENV = ("PATH", "PYTHONPATH", "LITELLM_LOCAL_MODEL_COST_MAP", "LANG", "LC_ALL")


@pytest.fixture
def sidecars(tmp_path: Path) -> Iterator[list[str]]:
    """Two sidecar hosts on their own upstreams; their addresses."""
    with contextlib.ExitStack() as stack:
        addresses = []
        for host in HOSTS:
            upstream = stack.enter_context(OpenAIUpstream.in_thread())
            config = write_proxy_config(tmp_path / f"config-{host}.yaml", upstream.url, ["echo-model"])
            sidecar: SidecarProcess = start_sidecar_process(
                config, tmp_path / f"sidecar-{host}.log", env={"TEST_UPSTREAM_KEY": PLANTED_KEY}, listen=f"{host}:0"
            )
            stack.callback(sidecar.stop)
            addresses.append(f"{host}:{sidecar.port}")
        yield addresses


def _screen(socket: str, session: str) -> str:
    return subprocess.run(
        ["tmux", "-L", socket, "capture-pane", "-p", "-t", session], capture_output=True, text=True, check=True
    ).stdout


def _wait_screen(socket: str, session: str, done: Callable[[str], bool], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    screen = _screen(socket, session)
    while not done(screen) and time.monotonic() < deadline:
        time.sleep(0.5)
        screen = _screen(socket, session)
    return screen


def test_tui_shows_the_users_prompt_and_each_sidecar_host(tmp_path: Path, sidecars: list[str]) -> None:
    node_port, api_port = free_port(), free_port()
    peers = write_peers(tmp_path / "peers.json", {"r": node_port})
    home = tmp_path / "home-r"
    home.mkdir()
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env.update(HOME=str(home), EXO_HOME=str(home), TMPDIR=str(home), COLUMNS="200", LINES="90")
    env["EXO_REMOTE_SIDECAR"] = ",".join(sidecars)
    command = shlex.join(
        [
            "env", "-i", *(f"{k}={v}" for k, v in env.items()),
            str(PINS_VENV / "bin" / "exo"), "--inference-engine", "remote",
            "--discovery-module", "manual", "--discovery-config-path", str(peers), "--node-id", "r",
            "--node-host", "127.0.0.1", "--node-port", str(node_port), "--chatgpt-api-port", str(api_port),
        ]
    )  # fmt: skip
    socket, session = f"exo-tui-{node_port}", "exo"  # a tmux server of our own
    subprocess.run(
        ["tmux", "-L", socket, "new-session", "-d", "-s", session, "-x", "200", "-y", "90", f"cd {home} && {command}"],
        check=True,
    )
    try:
        api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{api}/v1/models", timeout=2) as response:
                    if "echo-model" in {m["id"] for m in json.load(response)["data"]}:
                        break
            assert time.monotonic() < deadline, _screen(socket, session)
            time.sleep(0.5)
        body = json.dumps({"model": "echo-model", "messages": [{"role": "user", "content": QUESTION}]}).encode()
        request = urllib.request.Request(f"{api}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.load(response)["choices"][0]["message"]["content"] == f"echo: {QUESTION}"

        def shown(screen: str) -> bool:
            return "capital of France" in screen and "2/2 sidecar hosts serving:" in screen

        screen = _wait_screen(socket, session, shown, 30)
        (tmp_path / "tui.txt").write_text(screen)
        print(f"TUI capture ({tmp_path / 'tui.txt'}):\n{screen}")
        assert f"💬️ {QUESTION}" in screen, screen
        assert "capital of France" in screen and "echo: What is the capital" in screen, screen
        assert "exo-remote/v1" not in screen and '"messages"' not in screen, "the envelope is not shown"
        assert "2/2 sidecar hosts serving:" in screen, screen
        for address in sidecars:
            assert f"● {address} SERVING" in screen, screen
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], check=False)
