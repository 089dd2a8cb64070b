"""Spend against budget under attack: ``python -m benchmarks.budgets [--runs 3] [--hosts 1 3]``.

An attacker node with a budget of 10.5 replies opens 8, 32 and 128 concurrent streams at
once (with ``max_tokens: 20``, and without ``max_tokens``, when each stream reserves the
model's maximum output clamped to what is left); then a node with a $0.001 budget asks a
provider that ignores ``max_tokens`` for one 20,000-token reply. Each run uses fresh nodes,
against one in-process sidecar (SQLite ledger) and against three sidecar processes on
127.0.0.2-4 sharing a real Redis and PostgreSQL (Debian's packages, as the tests start
them). Prints, per case, the spend read back from the ledger (or the shared table) against
the budget, with the requests served and refused; the target is spend <= budget, every run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncpg
import litellm

from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config
from exo_remote_engine.sidecar.ledger.spend import DB_NAME
from tests.support.harness import chat_request, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import SidecarProcess, start_sidecar_process
from tests.support.servers import PostgresServer, RedisServer, postgres_skip_reason, redis_skip_reason
from tests.support.traffic import KEY_ENV

WIDTHS = (8, 32, 128)
INFO = litellm.model_cost["gpt-4o-mini"]
PER_REQUEST = 20 * INFO["input_cost_per_token"] + 20 * INFO["output_cost_per_token"]
SWARM_BUDGET = round(10.5 * PER_REQUEST, 12)
HOG_BUDGET = 0.001
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
SCENARIOS = {
    "gpt-4o-mini": Scenario(chunks=["tok "] * 20, usage=(20, 20), interval_s=0.01),
    "runaway-model": Scenario(chunks=["word "] * 20_000, usage=(20, 20_000)),
}
Spent = Callable[[str], Awaitable[float]]


def _node(case: str, run: int) -> str:
    return f"{case}-r{run}"


def cases() -> list[tuple[str, int, dict[str, int]]]:
    """(name, concurrent streams, request params) of the swarm cases."""
    found = []
    for width in WIDTHS:
        found.append((f"w{width}-max20", width, {"max_tokens": 20}))
        found.append((f"w{width}-nomax", width, {}))
    return found


def config_text(url: str, runs: int) -> str:
    text = "model_list:\n"
    for alias, model, price in (("mini", "gpt-4o-mini", ""), ("runaway", "runaway-model", "1.0e-6/1.0e-5")):
        text += f"  - model_name: {alias}\n    litellm_params:\n      model: openai/{model}\n"
        text += f"      api_base: {url}/v1\n      api_key: os.environ/{KEY_ENV}\n"
        if price:
            p_in, p_out = price.split("/")
            text += f"      input_cost_per_token: {p_in}\n      output_cost_per_token: {p_out}\n"
    text += "exo_remote_settings:\n  nodes:\n"
    for run in range(runs):
        for name, _, _ in cases():
            text += f"    {_node(name, run)}: {{max_budget: {SWARM_BUDGET:.12f}, allowed_models: [mini]}}\n"
        text += f"    {_node('hog', run)}: {{max_budget: {HOG_BUDGET}, allowed_models: [runaway]}}\n"
    return text


def tokens_of(runs: int) -> dict[str, str]:
    names = [_node(n, r) for r in range(runs) for n in [*(c[0] for c in cases()), "hog"]]
    return {name: f"bench-token-{i:04d}-5f3a9c" for i, name in enumerate(names)}


async def _one(client: SidecarClient, model: str, **params: int) -> str:
    try:
        async for _ in client.generate(chat_request(model, "hi", **params)):
            pass
    except RemoteError as exc:
        return exc.reason.value
    return "served"


async def measure(addresses: list[str], tokens: dict[str, str], runs: int, spent: Spent) -> bool:
    within = True
    for run in range(runs):
        for name, width, params in [*cases(), ("hog", 1, {})]:
            node = _node(name, run)
            clients = [sidecar_client(a, token=tokens[node]) for a in addresses]
            model = "runaway" if name == "hog" else "mini"
            try:
                outcomes = await asyncio.gather(
                    *(_one(clients[i % len(clients)], model, **params) for i in range(width))
                )
            finally:
                for client in clients:
                    await client.close()
            budget = HOG_BUDGET if name == "hog" else SWARM_BUDGET
            total = await spent(node)
            ok = total <= budget * (1 + 1e-9)
            within &= ok
            refused = len(outcomes) - outcomes.count("served")
            asked = "max_tokens 20" if params else "no max_tokens"
            label = "1 large reply" if name == "hog" else f"{width:>3} streams {asked}"
            print(
                f"  run {run + 1}  {label:<28} spent ${total:.8f} of ${budget:.8f} "
                f"({total / budget:6.1%})  served {outcomes.count('served'):>3}  refused {refused:>3}"
                f"  {'ok' if ok else 'OVER BUDGET'}"
            )
    return within


async def one_host(runs: int) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[KEY_ENV] = "sk-bench-upstream-000000"
        async with OpenAIUpstream(dict(SCENARIOS)) as upstream:
            path = Path(tmp, "config.yaml")
            path.write_text(config_text(upstream.url, runs))
            tokens = tokens_of(runs)
            settings = SidecarSettings(listen="127.0.0.1:0", state_dir=Path(tmp, "state"), named_tokens=tokens)
            sidecar = await start_sidecar(settings, load_config(path))
            ledger = Path(tmp, "state", DB_NAME)

            async def spent(node: str) -> float:
                with sqlite3.connect(ledger) as db:
                    return float(
                        db.execute(
                            "SELECT COALESCE(SUM(cost_usd), 0) FROM requests WHERE node = ?", (node,)
                        ).fetchone()[0]
                    )

            try:
                print("one sidecar (SQLite ledger):")
                return await measure([sidecar.address], tokens, runs, spent)
            finally:
                await sidecar.stop(grace_s=None)


def three_hosts(runs: int) -> bool:
    reason = postgres_skip_reason() or redis_skip_reason()
    if reason is not None:
        print(f"three hosts: skipped ({reason})")
        return True
    postgres, redis = PostgresServer(), RedisServer()
    postgres.start()
    redis.start()
    hosts: list[SidecarProcess] = []
    try:
        database = postgres.create_database("bench_budgets")
        with tempfile.TemporaryDirectory() as tmp, OpenAIUpstream.in_thread(dict(SCENARIOS)) as upstream:
            config = Path(tmp, "config.yaml")
            config.write_text(config_text(upstream.url, runs))
            tokens = tokens_of(runs)
            token_file = Path(tmp, "tokens")
            token_file.write_text("".join(f"{n} {t}\n" for n, t in tokens.items()))
            token_file.chmod(0o600)
            env = {KEY_ENV: "sk-bench-upstream-000000", "EXO_REMOTE_DISCOVER": "0"}

            def start(i: int) -> SidecarProcess:
                args = ["--token-file", str(token_file), "--state-dir", str(Path(tmp, f"state-{i}")),
                        "--redis", redis.url, "--database", database]  # fmt: skip
                return start_sidecar_process(config, Path(tmp, f"host-{i}.log"), env, f"{HOSTS[i]}:0", args)

            with concurrent.futures.ThreadPoolExecutor(len(HOSTS)) as pool:
                hosts = list(pool.map(start, range(len(HOSTS))))

            async def spent(node: str) -> float:
                await asyncio.sleep(1.5)  # cancelled rows are copied at the next poll (<= 1 s)
                connection = await asyncpg.connect(database)
                try:
                    query = "SELECT COALESCE(SUM(cost_usd), 0) FROM exo_remote_requests WHERE node = $1"
                    return float(await connection.fetchval(query, node))
                finally:
                    await connection.close()

            print("three sidecar hosts (shared Redis and PostgreSQL):")
            addresses = [f"{h}:{p.port}" for h, p in zip(HOSTS, hosts, strict=True)]
            return asyncio.run(measure(addresses, tokens, runs, spent))
    finally:
        for host in hosts:
            host.stop()
        postgres.close()
        redis.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hosts", type=int, nargs="+", choices=(1, 3), default=[1, 3])
    args = parser.parse_args(argv)
    logging.getLogger("exo_remote_engine").setLevel(logging.ERROR)  # refusals are the point, not news
    began = time.monotonic()
    within = True
    if 1 in args.hosts:
        within &= asyncio.run(one_host(args.runs))
    if 3 in args.hosts:
        within &= three_hosts(args.runs)
    print(f"target spend <= budget in every run: {'met' if within else 'MISSED'} ({time.monotonic() - began:.0f}s)")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
