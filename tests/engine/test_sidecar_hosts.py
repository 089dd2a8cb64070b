"""Several sidecar hosts behind one target: gRPC's round_robin spreads calls, a killed or
draining host stops getting them, one that returns gets them again.

Real processes: three ``exo-remote-sidecar`` on 127.0.0.2, 127.0.0.3 and 127.0.0.4, each
with a bearer token and its own OpenAI-compatible upstream on 127.0.0.1 (so the upstream
that recorded a request names the host that served it), and one exo-side
:class:`SidecarClient` pointed at all three as ``127.0.0.2:p,127.0.0.3:q,127.0.0.4:r``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from exo_remote_engine.cli.connection_hints import sidecar_hint
from exo_remote_engine.contract.addresses import TargetKind
from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient, list_models_blocking
from exo_remote_engine.engine.connection.target import RetryPolicy, SidecarTarget
from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config
from exo_remote_engine.sidecar.control.auth import ServerTLS
from tests.conftest import PLANTED_KEY
from tests.support.certs import make_pki, openssl_skip_reason
from tests.support.configs import KEY_ENV, write_config
from tests.support.dns_server import DnsServer
from tests.support.harness import chat_request, drain
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import SidecarProcess, start_sidecar_process, stop_process

TOKEN = "hosts-test-token-0123456789"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
LONG = [f"w{i} " for i in range(40)]  # 40 deltas, 50 ms apart: a stream lasts ~2 s
SHORT = ["one ", "two"]
NO_RETRY = RetryPolicy(attempts=1)

pytestmark = pytest.mark.timeout(120)


@dataclass
class Host:
    """One sidecar host: its process, its own upstream and how to start it again."""

    name: str
    upstream: OpenAIUpstream
    config: Path
    log: Path
    extra: list[str]
    process: SidecarProcess | None = None

    @property
    def address(self) -> str:
        assert self.process is not None
        return f"{self.name}:{self.process.port}"

    def start(self, port: int = 0) -> None:
        env = {KEY_ENV: PLANTED_KEY, "EXO_REMOTE_DISCOVER": "0"}
        self.process = start_sidecar_process(self.config, self.log, env, f"{self.name}:{port}", self.extra)

    def served(self, model: str, after: float = 0.0) -> int:
        """Requests for ``model`` this host's upstream received after ``after`` (monotonic)."""
        return sum(1 for r in list(self.upstream.requests) if r.model == model and r.received_at > after)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[Host]]:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"node-a {TOKEN}\n")
    scenarios = {"long": Scenario(chunks=LONG, interval_s=0.05), "short": Scenario(chunks=SHORT)}
    with contextlib.ExitStack() as stack:
        found = []
        for i, name in enumerate(HOSTS):
            upstream = stack.enter_context(OpenAIUpstream.in_thread(dict(scenarios)))
            config = write_config(tmp_path / f"host{i}.yaml", upstream.url, ["long", "short"], "  num_retries: 0\n")
            extra = ["--token-file", str(tokens), "--grace-s", "20"]
            found.append(Host(name, upstream, config, tmp_path / f"host{i}.log", extra))
        # Started side by side: each start is a LiteLLM import.
        with concurrent.futures.ThreadPoolExecutor(len(found)) as pool:
            for started in [pool.submit(h.start) for h in found]:
                started.result(90)
        try:
            yield found
        finally:
            for host in found:
                if host.process is not None:
                    stop_process(host.process.process, grace_s=2)


def _target(hosts: list[Host]) -> SidecarTarget:
    return SidecarTarget.from_env({"EXO_REMOTE_SIDECAR": ",".join(h.address for h in hosts), "EXO_REMOTE_TOKEN": TOKEN})


@contextlib.asynccontextmanager
async def _client(target: SidecarTarget, retry: RetryPolicy) -> AsyncIterator[SidecarClient]:
    client = SidecarClient(replace(target, retry=retry))
    try:
        yield client
    finally:
        await client.close()


async def _text(client: SidecarClient, model: str, i: int) -> str:
    request = chat_request(model, f"hello {i}", request_id=f"h-{model}-{i}")
    return (await drain(client, request, catch=False)).text


async def _warm(client: SidecarClient, hosts: list[Host]) -> float:
    """Short calls until every host served one: round_robin picks among the hosts whose
    connection is READY, and right after the channel is made some are still connecting."""
    deadline = time.monotonic() + 15
    i = 0
    while not all(h.served("short") for h in hosts):
        assert time.monotonic() < deadline, [h.served("short") for h in hosts]
        i += 1
        await _text(client, "short", -i)
    return time.monotonic()


async def test_three_hundred_requests_spread_evenly_over_three_hosts(hosts: list[Host]) -> None:
    target = _target(hosts)
    assert target.address.startswith("ipv4:") and len(target.parsed.hosts) == 3
    async with _client(target, NO_RETRY) as client:
        warm = await _warm(client, hosts)
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> str:
            async with gate:
                return await _text(client, "short", i)

        texts = await asyncio.gather(*(one(i) for i in range(300)))
        assert texts == ["one two"] * 300
        served = [h.served("short", after=warm) for h in hosts]
        assert sum(served) == 300, served
        assert all(85 <= n <= 115 for n in served), f"round robin should give ~100 each: {served}"
        # The other calls work against the list too, including the blocking one exo makes at import.
        assert {m.alias for m in (await client.list_models()).models} >= {"long", "short"}
        assert await client.health()
        assert await client.host_health() == {h.address: True for h in hosts}
    listing = await asyncio.to_thread(list_models_blocking, target)
    assert {m.alias for m in listing.models} >= {"long", "short"}


async def _stream(client: SidecarClient, i: int, first: asyncio.Event) -> tuple[str, RemoteError | None]:
    text = ""
    try:
        async for event in client.generate(chat_request("long", f"s {i}", request_id=f"h-long-{i}")):
            text += event.delta.text
            first.set()
    except RemoteError as exc:
        return text, exc
    return text, None


async def _keep_calling(client: SidecarClient, until: asyncio.Event, log: list[tuple[float, str | Exception]]) -> None:
    """New short calls, one after another, each logged with its start time and outcome."""
    i = 0
    while not until.is_set():
        i += 1
        started = time.monotonic()
        try:
            outcome: str | Exception = await _text(client, "short", 10_000 + i)
        except RemoteError as exc:
            outcome = exc
        log.append((started, outcome))
        await asyncio.sleep(0.02)


async def test_sigkill_of_a_host_under_32_streams_then_its_return(hosts: list[Host]) -> None:
    # No client retries: a call that reached the dead host fails, so a call that succeeds
    # after the kill was not sent there.
    async with _client(_target(hosts), NO_RETRY) as client:
        await _warm(client, hosts)
        firsts = [asyncio.Event() for _ in range(32)]
        streams = [asyncio.create_task(_stream(client, i, firsts[i])) for i in range(32)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 30)
        victim = hosts[1]
        assert victim.served("long") > 0, "round robin gave the victim some of the streams"
        assert victim.process is not None
        calls: list[tuple[float, str | Exception]] = []
        stop_calling = asyncio.Event()
        caller = asyncio.create_task(_keep_calling(client, stop_calling, calls))
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        victim.process.process.send_signal(signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
        expected = "".join(LONG)
        failed = 0
        for text, error in results:
            assert expected.startswith(text), f"duplicated or reordered text: {text!r}"
            if error is None:
                assert text == expected
            else:
                assert error.reason is Reason.SIDECAR_UNAVAILABLE, error
                failed += 1
        assert 0 < failed < 32, f"{failed} streams failed: those of the killed host, and only those"
        await asyncio.sleep(max(0.0, killed_at + 3.0 - time.monotonic()))

        # New calls stop reaching it within 1 s: every call started later succeeded.
        failed_new = [t - killed_at for t, o in calls if t > killed_at and not isinstance(o, str)]
        print(
            f"\n[hosts] new calls after the kill that failed (no retries): {len(failed_new)}, the last one "
            f"started {max(failed_new, default=0.0) * 1000:.0f} ms after the kill"
        )
        late = [(t - killed_at, o) for t, o in calls if t > killed_at + 1.0]
        assert len(late) >= 5, calls
        assert all(isinstance(o, str) for _, o in late), [o for _, o in late if not isinstance(o, str)][:3]

        # Back on the same address and port: it gets traffic again within 5 s.
        await asyncio.to_thread(victim.process.process.wait, 10)
        port = victim.process.port
        await asyncio.to_thread(victim.start, port)
        assert victim.process.port == port
        back_at = time.monotonic()
        while victim.served("short", after=back_at) == 0 and time.monotonic() - back_at < 5.0:
            await asyncio.sleep(0.05)
        returned_after = time.monotonic() - back_at
        stop_calling.set()
        await caller
        assert victim.served("short", after=back_at) > 0, "the returning host got no call within 5 s"
        print(f"\n[hosts] killed host's calls moved away; it served again {returned_after:.2f} s after its return")
        assert all(isinstance(o, str) for t, o in calls if t > back_at), "calls failed after the host returned"


async def test_sigterm_drain_finishes_streams_and_moves_new_calls(hosts: list[Host]) -> None:
    async with _client(_target(hosts), RetryPolicy()) as client:
        await _warm(client, hosts)
        firsts = [asyncio.Event() for _ in range(12)]
        streams = [asyncio.create_task(_stream(client, i, firsts[i])) for i in range(12)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 30)
        draining = hosts[2]
        assert draining.process is not None and draining.served("long") > 0
        calls: list[tuple[float, str | Exception]] = []
        stop_calling = asyncio.Event()
        caller = asyncio.create_task(_keep_calling(client, stop_calling, calls))
        await asyncio.sleep(0.3)
        drained_at = time.monotonic()
        draining.process.process.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert all(error is None and text == "".join(LONG) for text, error in results), [
            (t[-10:], e) for t, e in results if e is not None
        ]
        await asyncio.sleep(max(0.0, drained_at + 2.0 - time.monotonic()))
        stop_calling.set()
        await caller
        after = [o for t, o in calls if t > drained_at]
        print(f"\n[hosts] drain: {len(after)} new calls during the drain, all served by the other hosts")
        assert len(after) >= 5 and all(isinstance(o, str) for o in after), after[:3]
        assert draining.served("short", after=drained_at + 0.5) == 0, "a draining host got new calls"
        assert await asyncio.to_thread(draining.process.process.wait, 30) == 0
        health = await client.host_health()
        assert health[draining.address] is None and sum(1 for v in health.values() if v) == 2, health


async def test_a_dns_target_reaches_a_sidecar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``dns:///localhost:port`` through gRPC's DNS resolver (the system's), and its addresses
    resolved for display. A name with several records: the next test, with a name server."""
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    async with OpenAIUpstream({"short": Scenario(chunks=SHORT)}) as upstream:
        config = load_config(write_config(tmp_path / "dns.yaml", upstream.url, ["short"]))
        sidecar = await start_sidecar(SidecarSettings(listen="127.0.0.1:0", tokens=[TOKEN]), config)
        try:
            env = {"EXO_REMOTE_SIDECAR": f"dns:///localhost:{sidecar.port}", "EXO_REMOTE_TOKEN": TOKEN}
            target = SidecarTarget.from_env(env)
            assert target.parsed.dns_name == f"localhost:{sidecar.port}" and target.parsed.several
            async with _client(target, RetryPolicy()) as client:
                assert [await _text(client, "short", i) for i in range(5)] == ["one two"] * 5
                health = await client.host_health()
                assert health.get(f"127.0.0.1:{sidecar.port}") is True, health
            assert len(upstream.requests_for("short")) == 5
        finally:
            await sidecar.stop(grace_s=None)


@pytest.mark.skipif(openssl_skip_reason() is not None, reason=openssl_skip_reason() or "")
async def test_under_mtls_health_checking_takes_a_not_serving_host_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a client certificate and no token the subchannels' health Watch is authenticated,
    so gRPC's client-side health checking is on: a host that says NOT_SERVING while still
    listening gets no new calls, and gets them again once it says SERVING."""
    pki = make_pki(tmp_path / "pki")
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    tls = ServerTLS(pki.server.cert, pki.server.key, pki.ca)
    async with (
        OpenAIUpstream({"short": Scenario(chunks=SHORT)}) as one,
        OpenAIUpstream({"short": Scenario(chunks=SHORT)}) as two,
    ):
        sidecars = []
        for i, upstream in enumerate((one, two)):
            config = load_config(write_config(tmp_path / f"mtls{i}.yaml", upstream.url, ["short"]))
            sidecars.append(await start_sidecar(SidecarSettings(listen="127.0.0.1:0", tls=tls), config))
        try:
            env = {
                "EXO_REMOTE_SIDECAR": ",".join(f"127.0.0.1:{s.port}" for s in sidecars),
                "EXO_REMOTE_TLS_CA": str(pki.ca),
                "EXO_REMOTE_TLS_CERT": str(pki.client.cert),
                "EXO_REMOTE_TLS_KEY": str(pki.client.key),
                "EXO_REMOTE_TLS_SERVER_NAME": "localhost",
            }
            # Without EXO_REMOTE_TLS_SERVER_NAME a list has no name to check certificates
            # against: refused, with a hint naming the setting.
            nameless = SidecarTarget.from_env({k: v for k, v in env.items() if k != "EXO_REMOTE_TLS_SERVER_NAME"})
            async with _client(nameless, NO_RETRY) as client:
                with pytest.raises(RemoteError) as caught:
                    await client.list_models(timeout_s=5)
            assert "EXO_REMOTE_TLS_SERVER_NAME" in (sidecar_hint(caught.value, nameless) or ""), caught.value
            target = SidecarTarget.from_env(env)
            assert target.health_checked and target.parsed.several
            async with _client(target, NO_RETRY) as client:

                async def calls_reaching_two(n: int) -> int:
                    before = len(two.requests_for("short"))
                    assert [await _text(client, "short", i) for i in range(n)] == ["one two"] * n
                    return len(two.requests_for("short")) - before

                deadline = time.monotonic() + 15
                while not (one.requests_for("short") and two.requests_for("short")):
                    assert time.monotonic() < deadline, "both hosts serve"
                    await _text(client, "short", 0)
                sidecars[1].health.set_all(False)
                await asyncio.sleep(1.0)  # the Watch streams the change at once; a wide margin
                assert await calls_reaching_two(20) == 0, "a NOT_SERVING host got new calls"
                sidecars[1].health.set_all(True)
                deadline = time.monotonic() + 5
                while await calls_reaching_two(2) == 0:
                    assert time.monotonic() < deadline, "the host serving again got no calls within 5 s"
        finally:
            for sidecar in sidecars:
                await sidecar.stop(grace_s=None)


def _port_free_on_all(hosts: Sequence[str]) -> int:
    """A port that is free on every one of ``hosts`` (for sidecars sharing one DNS name)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every host")


async def test_a_dns_name_with_three_address_records_spreads_over_three_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dns://127.0.0.1:N/sidecars.test:P``: gRPC's resolver asks our name server, which
    answers three A records (127.0.0.2-4, one sidecar each on port P); round_robin uses all."""
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    port = _port_free_on_all(HOSTS)
    async with contextlib.AsyncExitStack() as stack:
        upstreams, sidecars = [], []
        for i, host in enumerate(HOSTS):
            upstream = await stack.enter_async_context(OpenAIUpstream({"short": Scenario(chunks=SHORT)}))
            config = load_config(write_config(tmp_path / f"dns{i}.yaml", upstream.url, ["short"]))
            sidecar = await start_sidecar(SidecarSettings(listen=f"{host}:{port}", tokens=[TOKEN]), config)
            stack.push_async_callback(sidecar.stop, None)
            upstreams.append(upstream)
            sidecars.append(sidecar)
        dns = await stack.enter_async_context(DnsServer("sidecars.test", HOSTS))
        env = {"EXO_REMOTE_SIDECAR": f"dns://127.0.0.1:{dns.port}/sidecars.test:{port}", "EXO_REMOTE_TOKEN": TOKEN}
        target = SidecarTarget.from_env(env)
        assert target.parsed.kind is TargetKind.DNS
        async with _client(target, RetryPolicy()) as client:
            deadline = time.monotonic() + 15
            while not all(u.requests_for("short") for u in upstreams):
                assert time.monotonic() < deadline, [len(u.requests_for("short")) for u in upstreams]
                await _text(client, "short", 0)
            before = [len(u.requests_for("short")) for u in upstreams]
            assert [await _text(client, "short", i) for i in range(30)] == ["one two"] * 30
            served = [len(u.requests_for("short")) - b for u, b in zip(upstreams, before, strict=True)]
            assert all(5 <= n <= 15 for n in served), f"round robin over the name's three records: {served}"
        assert ("sidecars.test", 1) in dns.questions


async def test_a_host_list_spreads_calls_over_every_hosts_workers(tmp_path: Path) -> None:
    """Each listed host's ListWorkers, asked over a channel to that host, adds its worker
    ports to the round_robin list: two hosts x (main + 1 worker) all serve calls."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"node-a {TOKEN}\n")
    extra = ["--workers", "2", "--token-file", str(tokens)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        starting = [
            pool.submit(start_sidecar_process, None, tmp_path / f"w{i}.log", None, f"{h}:0", extra)
            for i, h in enumerate(HOSTS[:2])
        ]
        processes = [s.result(120) for s in starting]
    try:
        listed = ",".join(f"{h}:{p.port}" for h, p in zip(HOSTS[:2], processes, strict=True))
        target = SidecarTarget.from_env({"EXO_REMOTE_SIDECAR": listed, "EXO_REMOTE_TOKEN": TOKEN})
        async with _client(target, RetryPolicy()) as client:
            gate = asyncio.Semaphore(8)

            async def one(i: int) -> str:
                async with gate:
                    request = chat_request("embedded-echo", f"hello {i}", request_id=f"w-{i}")
                    return (await drain(client, request, catch=False)).text

            texts = await asyncio.gather(*(one(i) for i in range(40)))
            assert all(f"hello {i}" in t for i, t in enumerate(texts))
        for process in processes:
            pattern = r"exo_remote_engine\.sidecar(\[worker \d+\])? request_id=w-\d+ .* end code=OK"
            starts = re.findall(pattern, process.log.read_text())
            served = Counter(tag.strip("[]") or "main" for tag in starts)
            assert served["main"] > 0 and served["worker 1"] > 0, f"{process.log.name}: {served}"
    finally:
        for process in processes:
            process.stop()
