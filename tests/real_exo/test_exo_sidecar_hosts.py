"""Real classic exo with one remote node served by two sidecar hosts (127.0.0.2 and
127.0.0.3, one target naming both): calls spread over both, and killing one host leaves
the node serving through the other. Skipped with the reason when EXO_SRC is not set."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PLANTED_KEY
from tests.support.configs import write_proxy_config
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.processes import ExoNode, SidecarProcess, exo_skip_reason, start_lone_exo_node, start_sidecar_process

pytestmark = [pytest.mark.exo, pytest.mark.skipif(exo_skip_reason() is not None, reason=str(exo_skip_reason()))]

HOSTS = ("127.0.0.2", "127.0.0.3")


def _complete(node: ExoNode, text: str) -> str:
    body = json.dumps({"model": "echo-model", "messages": [{"role": "user", "content": text}]}).encode()
    request = urllib.request.Request(f"{node.api}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: str = json.load(response)["choices"][0]["message"]["content"]
    return answer


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[list[OpenAIUpstream], list[SidecarProcess], list[str]]]:
    """Two sidecar hosts, each reading its own upstream, so each request's host is known."""
    with contextlib.ExitStack() as stack:
        upstreams = [stack.enter_context(OpenAIUpstream.in_thread()) for _ in HOSTS]
        sidecars: list[SidecarProcess] = []
        for host, upstream in zip(HOSTS, upstreams, strict=True):
            config = write_proxy_config(tmp_path / f"config-{host}.yaml", upstream.url, ["echo-model"])
            sidecar = start_sidecar_process(
                config, tmp_path / f"sidecar-{host}.log", env={"TEST_UPSTREAM_KEY": PLANTED_KEY}, listen=f"{host}:0"
            )
            stack.callback(sidecar.stop)
            sidecars.append(sidecar)
        addresses = [f"{host}:{sidecar.port}" for host, sidecar in zip(HOSTS, sidecars, strict=True)]
        yield upstreams, sidecars, addresses


def test_a_remote_node_keeps_serving_when_one_of_its_two_sidecar_hosts_dies(
    tmp_path: Path, two_hosts: tuple[list[OpenAIUpstream], list[SidecarProcess], list[str]]
) -> None:
    upstreams, sidecars, addresses = two_hosts
    node = start_lone_exo_node(tmp_path, "r", ",".join(addresses), wait_models=["echo-model"])
    try:
        for i in range(10):
            assert _complete(node, f"before {i}") == f"echo: before {i}"
        served = [len(u.requests_for("echo-model")) for u in upstreams]
        assert all(n >= 2 for n in served), f"both hosts take calls (round_robin): {served}"

        hosts = _wait_hosts(node, {addresses[0]: "SERVING", addresses[1]: "SERVING"})
        assert hosts == {addresses[0]: "SERVING", addresses[1]: "SERVING"}, "/v1/topology shows both hosts"

        sidecars[0].process.kill()  # SIGKILL: no drain, no goodbye
        sidecars[0].process.wait(10)
        before = len(upstreams[1].requests_for("echo-model"))
        for i in range(10):
            assert _complete(node, f"after {i}") == f"echo: after {i}", "the node serves through the other host"
        assert len(upstreams[1].requests_for("echo-model")) == before + 10

        # /v1/topology tells which host is down: the node checks each host it was given.
        hosts = _wait_hosts(node, {addresses[0]: "unreachable", addresses[1]: "SERVING"})
        assert hosts == {addresses[0]: "unreachable", addresses[1]: "SERVING"}, hosts
        assert node.process.poll() is None
    finally:
        node.stop()


def _wait_hosts(node: ExoNode, wanted: dict[str, str], timeout_s: float = 30.0) -> dict[str, str]:
    """The node's sidecar hosts and their health as ``/v1/topology`` shows them, once they
    are ``wanted`` (or whatever they are after ``timeout_s``): announcements come every 2 s."""
    deadline = time.monotonic() + timeout_s
    while True:
        entry: dict[str, Any] = node.get_json("/v1/topology").get("exo_remote", {}).get("nodes", {}).get("r", {})
        hosts = {h["address"]: h["status"] for h in entry.get("sidecar_hosts", [])}
        if hosts == wanted or time.monotonic() > deadline:
            return hosts
        time.sleep(0.5)
