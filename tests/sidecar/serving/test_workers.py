"""Sidecar worker processes: one public port, every worker on an exclusive port of its own.

Real processes on 127.0.0.1: ``exo-remote-sidecar --workers 3`` with the embedded model,
read by the engine's client, which spreads Generate calls over the ports ListWorkers names.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import SidecarTarget
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from tests.support.harness import chat_request, drain
from tests.support.processes import SidecarProcess, start_sidecar_process
from tests.support.waits import eventually

TOKEN = "worker-test-token-0123456789"


def _start(tmp_path: Path) -> SidecarProcess:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"node-a {TOKEN}\n")
    return start_sidecar_process(
        None, tmp_path / "sidecar.log", extra_args=["--workers", "3", "--token-file", str(tokens)]
    )


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[SidecarProcess]:
    """A sidecar of its own, for tests that kill a part of it."""
    process = _start(tmp_path)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def shared_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    process = _start(tmp_path_factory.mktemp("workers"))
    yield process
    process.stop()


async def _text(client: SidecarClient, i: int) -> str:
    request = chat_request("embedded-echo", f"hello {i}", request_id=f"w-{i}")
    return (await drain(client, request, catch=False)).text


def _worker_ports(sidecar: SidecarProcess, token: str | None = TOKEN) -> list[int]:
    with grpc.insecure_channel(sidecar.address) as channel:
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        response = pb_grpc.RemoteInferenceServiceStub(channel).ListWorkers(
            pb.ListWorkersRequest(), timeout=5, metadata=metadata
        )
    return list(response.worker_ports)


def _serving_processes(log: Path) -> Counter[str]:
    """Which process logged each request's end: "main" or "worker N"."""
    starts = re.findall(r"exo_remote_engine\.sidecar(\[worker \d+\])? request_id=w-\d+ .* end code=OK", log.read_text())
    return Counter(tag.strip("[]") or "main" for tag in starts)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.timeout(120)
async def test_generate_calls_spread_over_every_worker_and_each_port_is_exclusive(
    shared_sidecar: SidecarProcess,
) -> None:
    sidecar = shared_sidecar
    ports = _worker_ports(sidecar)
    assert len(ports) == 2 and sidecar.port not in ports and len(set(ports)) == 2

    client = SidecarClient(SidecarTarget(address=sidecar.address, token=TOKEN))
    try:
        texts = await asyncio.gather(*(_text(client, i) for i in range(12)))
    finally:
        await client.close()
    assert texts == [f"Echo from the embedded model: hello {i}" for i in range(12)]
    served = _serving_processes(sidecar.log)
    assert set(served) == {"main", "worker 1", "worker 2"}, served
    assert sum(served.values()) == 12

    for port in [sidecar.port, *ports]:  # no SO_REUSEPORT anywhere: nobody can share a port
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError) as caught:
                s.bind(("127.0.0.1", port))
            assert caught.value.errno == errno.EADDRINUSE


@pytest.mark.timeout(120)
async def test_workers_ask_for_the_same_token(shared_sidecar: SidecarProcess) -> None:
    sidecar = shared_sidecar
    with pytest.raises(grpc.RpcError) as caught:
        _worker_ports(sidecar, token=None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    port = _worker_ports(sidecar)[0]
    client = SidecarClient(SidecarTarget(address=f"127.0.0.1:{port}", token="wrong-token"))
    try:
        with pytest.raises(RemoteError) as error:
            await _text(client, 0)
        assert error.value.reason is Reason.UNAUTHENTICATED
    finally:
        await client.close()


@pytest.mark.timeout(120)
async def test_a_killed_worker_costs_no_request_and_comes_back_on_a_new_port(sidecar: SidecarProcess) -> None:
    client = SidecarClient(SidecarTarget(address=sidecar.address, token=TOKEN))
    try:
        await asyncio.gather(*(_text(client, i) for i in range(3)))  # the client knows the workers
        before = _worker_ports(sidecar)
        victim = _children(sidecar.process.pid)[0]
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: not _alive(victim), "the killed worker is gone")
        texts = await asyncio.gather(*(_text(client, i) for i in range(3, 15)))
        assert texts == [f"Echo from the embedded model: hello {i}" for i in range(3, 15)]

        def replaced() -> list[int] | None:
            after = _worker_ports(sidecar)
            return after if len(after) == 2 and set(after) != set(before) else None

        await eventually(replaced, "a new worker on a new port", timeout_s=60, poll_s=0.5)
    finally:
        await client.close()
    assert "exited with code -9; restarting it" in sidecar.log.read_text()


@pytest.mark.timeout(120)
async def test_workers_leave_with_the_main_process_however_it_ends(sidecar: SidecarProcess) -> None:
    workers = _children(sidecar.process.pid)
    assert len(workers) == 2
    sidecar.process.send_signal(signal.SIGKILL)  # no chance to clean up: stdin EOF must do it
    sidecar.process.wait(15)
    await eventually(lambda: not any(_alive(pid) for pid in workers), "the workers left", timeout_s=30, poll_s=0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    return bool(stat) and stat.split(") ", 1)[1][0] != "Z"
