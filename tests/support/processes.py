"""Real processes for end-to-end tests: a sidecar process and classic exo nodes.

Everything binds 127.0.0.1. exo is found through ``EXO_SRC`` (a classic exo source tree,
commit e4238f9ef) and runs from the pinned environment scripts/bootstrap.sh builds,
``.venvs/exo-pins``, where it is installed with its own pins and without tinygrad.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.real_parts import EXO_SRC_UNSET

REPO = Path(__file__).resolve().parents[2]
PINS_VENV = REPO / ".venvs" / "exo-pins"


def exo_skip_reason() -> str | None:
    """Why real-exo tests cannot run here, or None when they can."""
    if not os.environ.get("EXO_SRC"):
        return f"{EXO_SRC_UNSET} real classic exo not available; set EXO_SRC to an exo source tree (commit e4238f9ef)"
    if not (PINS_VENV / "bin" / "exo").exists():
        return f"EXO_SRC is set but {PINS_VENV}/bin/exo is missing: run scripts/bootstrap.sh with EXO_SRC"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(process: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """SIGINT (a clean drain), then SIGKILL after ``grace_s``."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@dataclass
class SidecarProcess:
    process: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)


def start_sidecar_process(
    config: Path | None,
    log: Path,
    env: dict[str, str] | None = None,
    listen: str = "127.0.0.1:0",
    extra_args: list[str] | None = None,
    discover: bool = False,
    embedded_model: bool = False,
) -> SidecarProcess:
    """``exo-remote-sidecar`` in its own process; returns once it listens. Discovery is off
    unless asked for, so no test ever lists a real provider with a developer's own keys.
    Without a config it serves the echo unless ``embedded_model`` asks for the real local
    model (which costs a model load and ~450 MB)."""
    args = [sys.executable, "-m", "exo_remote_engine.server", "--listen", listen, *(extra_args or [])]
    if not discover:
        args.append("--no-discover")
    if config is None and not embedded_model:
        args.append("--embedded-echo")
    if config is not None:
        args += ["--config", str(config)]
    full_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})}
    out = log.open("w")
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=out, text=True, env=full_env, cwd=REPO)
    assert process.stdout is not None
    deadline = time.monotonic() + (180 if embedded_model else 60)
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = re.match(r"exo-remote-sidecar listening on port (\d+)", line)
        if match:
            return SidecarProcess(process, int(match.group(1)), log)
        if not line and process.poll() is not None:
            break
    stop_process(process)
    raise RuntimeError(f"sidecar did not start:\n{log.read_text()[-3000:]}")


@dataclass
class ExoNode:
    process: subprocess.Popen[bytes]
    node_id: str
    node_port: int
    api_port: int
    home: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def get_json(self, path: str, timeout: float = 10) -> Any:
        with urllib.request.urlopen(self.api + path, timeout=timeout) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        stop_process(self.process)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def write_peers(path: Path, nodes: dict[str, int]) -> Path:
    peers = {
        node_id: {
            "address": "127.0.0.1",
            "port": port,
            "device_capabilities": {
                "model": "x",
                "chip": "x",
                "memory": 0,
                "flops": {"fp32": 0, "fp16": 0, "int8": 0},
            },
        }
        for node_id, port in nodes.items()
    }
    path.write_text(json.dumps({"peers": peers}))
    return path


def start_exo_node(
    workdir: Path,
    node_id: str,
    node_port: int,
    api_port: int,
    peers: Path,
    engine: str = "remote",
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    wait_models: list[str] | None = None,
    executable: str = "exo",
) -> ExoNode:
    """The stock ``exo`` command of the pinned environment (or another of its commands,
    e.g. the ``exo-remote-node`` launcher), headless, manual discovery."""
    home = workdir / f"home-{node_id}"
    home.mkdir(parents=True, exist_ok=True)
    log = workdir / f"exo-{node_id}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("EXO_REMOTE_", "PYTEST", "VIRTUAL_ENV"))}
    full_env.update({"HOME": str(home), "EXO_HOME": str(home), "TMPDIR": str(home), **(env or {})})
    args = [
        str(PINS_VENV / "bin" / executable),
        *(["--inference-engine", engine] if engine else []),
        "--disable-tui",
        "--discovery-module",
        "manual",
        "--discovery-config-path",
        str(peers),
        "--node-id",
        node_id,
        "--node-host",
        "127.0.0.1",
        "--node-port",
        str(node_port),
        "--chatgpt-api-port",
        str(api_port),
        *(extra_args or []),
    ]
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=full_env, cwd=home)
    node = ExoNode(process, node_id, node_port, api_port, home, log, full_env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exo node {node_id} exited:\n{node.log_text()[-4000:]}")
        try:
            ids = {m["id"] for m in node.get_json("/v1/models", timeout=2)["data"]}
            if not wait_models or set(wait_models) <= ids:
                return node
        except OSError:
            pass
        time.sleep(0.2)
    node.stop()
    raise RuntimeError(f"exo node {node_id} did not come up:\n{node.log_text()[-4000:]}")


def start_lone_exo_node(
    workdir: Path, node_id: str, sidecar: str, env: dict[str, str] | None = None, **options: Any
) -> ExoNode:
    """One exo node alone in its cluster (its peers file lists only itself) on fresh ports,
    its remote engine pointed at ``sidecar`` (EXO_REMOTE_SIDECAR); ``options`` as for
    :func:`start_exo_node`."""
    node_port, api_port = free_port(), free_port()
    peers = write_peers(workdir / f"peers-{node_id}.json", {node_id: node_port})
    merged = {"EXO_REMOTE_SIDECAR": sidecar, **(env or {})}
    return start_exo_node(workdir, node_id, node_port, api_port, peers, env=merged, **options)
