"""``python -m benchmarks.tenants``: a victim node's service while an attacker node (or an
anonymous caller) attacks the same key holder, measured as the attacker would (issue 21).

A sidecar process with two nodes' tokens serves a shared two-member group over the
scriptable upstream (in this process, its own thread). For each attack the victim streams
``--requests`` completions, ``--concurrency`` at a time, while the attacker runs its attack
without pause; printed: the victim's success rate and TTFT p50/p99, and what the attack
got. Attacks: none (the baseline); cooldown poisoning (requests the provider refuses as too
long); fallback escalation (a forbidden model, and an outage of its own that may not fall
back to it); ListModels(refresh=true) spam; 15 MiB request ids. Then, on a fresh sidecar:
RSS under 96 concurrent anonymous 30 MiB health calls (before, peak, after), and the time
to refuse a 15 MiB request id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from benchmarks.health_flood import anonymous_memory_flood
from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import RetryPolicy, SidecarTarget
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import start_sidecar_process
from tests.support.tenants import ATTACKER, CONTEXT_ERROR, TOKENS, VICTIM, tenant_config

OVERSIZED = "OVERSIZED-PROMPT"
BIG_ID = "r" * (15 * 1024 * 1024)
SECTIONS = (
    "router_settings:\n  allowed_fails: 1\n  cooldown_time: 60\n"
    "litellm_settings:\n  fallbacks: [{cheap: [expensive]}]\n"
)
GROUPS = {"shared": ["shared-1", "shared-2"], "cheap": ["cheap"], "expensive": ["expensive"]}
RULES = {ATTACKER: ["shared", "cheap"], VICTIM: ["shared", "cheap", "expensive"]}


def _request(model: str, text: str, request_id: str) -> pb.GenerateRequest:
    content = [pb.ContentPart(text=text)]
    return pb.GenerateRequest(
        request_id=request_id, model=model, messages=[pb.Message(role=pb.ROLE_USER, content=content)]
    )


def _client(address: str, node: str) -> SidecarClient:
    return SidecarClient(
        SidecarTarget(address=address, token=TOKENS[node], retry=RetryPolicy(attempts=1), deadline_s=60)
    )


async def _victim(address: str, requests: int, concurrency: int) -> tuple[int, list[float]]:
    """Successes and TTFTs (ms) of the victim's streams on the shared group."""
    client = _client(address, VICTIM)
    ttfts: list[float] = []
    ok = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal ok
        async with gate:
            started = time.monotonic()
            first = None
            try:
                async for event in client.generate(_request("shared", f"victim {i}", f"v-{i}")):
                    if first is None and event.HasField("delta"):
                        first = time.monotonic() - started
                ok += 1
                ttfts.append((first or 0.0) * 1000)
            except RemoteError:
                pass

    try:
        await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        await client.close()
    return ok, ttfts


async def _forever(step: Callable[[int], Awaitable[object]], tally: dict[str, int]) -> None:
    i = 0
    while True:
        try:
            outcome = await step(i)
            key = "ok" if outcome is None else str(outcome)
        except RemoteError as exc:
            key = exc.reason.value
        except grpc.aio.AioRpcError as exc:
            key = exc.code().name
        tally[key] = tally.get(key, 0) + 1
        i += 1
        await asyncio.sleep(0)


def _attacks(
    address: str, upstream: OpenAIUpstream, client: SidecarClient
) -> dict[str, Callable[[int], Awaitable[object]]]:
    async def poison(i: int) -> None:
        async for _ in client.generate(_request("shared", f"{OVERSIZED} {i}", f"a-{i}")):
            pass

    async def escalate(i: int) -> None:
        async for _ in client.generate(_request("expensive" if i % 2 else "cheap", "give me the big one", f"e-{i}")):
            pass

    async def refresh(i: int) -> None:
        await client.list_models(refresh=True)

    async def big_ids(i: int) -> str:
        async with grpc.aio.insecure_channel(address) as channel:
            call = pb_grpc.RemoteInferenceServiceStub(channel).Generate(
                _request("shared", "x", BIG_ID), timeout=30, metadata=(("authorization", f"Bearer {TOKENS[ATTACKER]}"),)
            )
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
        return "OK"

    return {
        "cooldown poisoning": poison,
        "fallback escalation": escalate,
        "refresh spam": refresh,
        "15 MiB ids": big_ids,
    }


def _q(data: list[float], q: float) -> float:
    ordered = sorted(data) or [float("nan")]
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _under_attacks(address: str, upstream: OpenAIUpstream, args: argparse.Namespace) -> list[str]:
    rows = []
    attacker = _client(address, ATTACKER)
    try:
        await _victim(address, args.concurrency, args.concurrency)  # warm: connections, transports
        attacks = {"none": None, **_attacks(address, upstream, attacker)}
        for name, step in attacks.items():
            upstream.clear()
            tally: dict[str, int] = {}
            running = asyncio.ensure_future(_forever(step, tally)) if step is not None else None
            await asyncio.sleep(0.5 if step is not None else 0)
            ok, ttfts = await _victim(address, args.requests, args.concurrency)
            if running is not None:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
            listings = sum(1 for r in upstream.requests if r.path.endswith("/models"))
            expensive = len(upstream.requests_for("expensive"))
            got = ", ".join(f"{k} x{v}" for k, v in sorted(tally.items())) or "-"
            rows.append(
                f"| {name} | {100 * ok / args.requests:.1f}% ({ok}/{args.requests}) | {_q(ttfts, 0.5):.1f} / "
                f"{_q(ttfts, 0.99):.1f} | {got} | {expensive} | {listings} |"
            )
    finally:
        await attacker.close()
    return rows


async def _refusal_ms(address: str, tries: int) -> tuple[list[float], list[float]]:
    """Milliseconds from sending to the refusal, end to end, of a request with a 15 MiB id
    (INVALID_ARGUMENT) and, interleaved, of one as large with a short id to an unknown model
    (NOT_FOUND, after the id check): the second is what moving 15 MiB through grpc costs."""
    big_id = _request("shared", "x", BIG_ID)
    same_size = _request("no-such-model", BIG_ID, "short-id")
    times: tuple[list[float], list[float]] = ([], [])
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RemoteInferenceServiceStub(channel)
        metadata = (("authorization", f"Bearer {TOKENS[ATTACKER]}"),)
        for i in range(2 * tries):
            refused_id = i % 2 == 0
            request, code = (
                (big_id, grpc.StatusCode.INVALID_ARGUMENT) if refused_id else (same_size, grpc.StatusCode.NOT_FOUND)
            )
            started = time.monotonic()
            try:
                async for _ in stub.Generate(request, timeout=30, metadata=metadata):
                    pass
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is code, exc
            times[0 if refused_id else 1].append((time.monotonic() - started) * 1000)
    return times


def _check_us(tries: int = 1000) -> float:
    """Microseconds the sidecar's own check of a 15 MiB request id takes (the rest of the
    end-to-end time is moving 15 MiB through grpc)."""
    from exo_remote_engine.contract.openai_chat import check_request_id

    started = time.perf_counter()
    for _ in range(tries):
        with contextlib.suppress(RemoteError):
            check_request_id(BIG_ID)
    return (time.perf_counter() - started) / tries * 1e6


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp, OpenAIUpstream.in_thread() as upstream:
        workdir = Path(tmp)
        upstream.scenarios.update(
            {name: Scenario(chunks=["one ", "two ", "three"]) for name in ("shared-1", "shared-2")}
        )
        upstream.scenarios["cheap"] = Scenario(status=503)
        upstream.by_prompt.append((None, OVERSIZED, Scenario(status=400, error_message=CONTEXT_ERROR)))
        config = workdir / "config.yaml"
        config.write_text(tenant_config(upstream.url, GROUPS, RULES, SECTIONS))
        tokens = workdir / "tokens"
        tokens.write_text("".join(f"{n} {t}\n" for n, t in TOKENS.items()))
        tokens.chmod(0o600)
        extra = ["--token-file", str(tokens), "--server", f"openai={upstream.url}/v1", "--state-dir", str(workdir)]
        env = {"TEST_UPSTREAM_KEY": "sk-bench-upstream-key-0000"}
        sidecar = start_sidecar_process(config, workdir / "sidecar.log", env, extra_args=extra, discover=True)
        try:
            rows = asyncio.run(_under_attacks(sidecar.address, upstream, args))
            refusals, transfer = asyncio.run(_refusal_ms(sidecar.address, args.refusals))
        finally:
            sidecar.stop()
        tokens_only = ["--token-file", str(tokens)]
        fresh = start_sidecar_process(None, workdir / "memory.log", extra_args=tokens_only)
        try:
            memory = asyncio.run(anonymous_memory_flood(fresh.address, fresh.process.pid, 96, 30))
        finally:
            fresh.stop()
    print(f"victim: {args.requests} streams on a shared two-member group, {args.concurrency} at a time, per attack")
    print()
    print("| attack | victim success | victim TTFT p50 / p99 ms | attacker got | served by expensive | listings |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    added, kept = memory["peak"] - memory["before"], memory["after"] - memory["before"]
    print(
        f"96 anonymous 30 MiB health calls: RSS {memory['before']:.0f} MiB before, peak {memory['peak']:.0f} MiB "
        f"(+{added:.0f}, target +256), after {memory['after']:.0f} MiB ({kept:+.0f})"
    )
    print(
        f"15 MiB request_id refused in {_q(refusals, 0.5):.1f} ms p50, {_q(refusals, 0.99):.1f} ms p99 end to end "
        f"({len(refusals)} tries; a 15 MiB prompt refused as NOT_FOUND: {_q(transfer, 0.5):.1f} / "
        f"{_q(transfer, 0.99):.1f} ms, i.e. moving the bytes); the sidecar's check itself: {_check_us():.2f} us "
        "(target < 10 ms; 8.6 s on 5b4b1cc)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tenants", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="victim streams per attack (default 200)")
    parser.add_argument("--concurrency", type=int, default=8, help="victim streams at a time (default 8)")
    parser.add_argument("--refusals", type=int, default=20, help="15 MiB request ids timed (default 20)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
