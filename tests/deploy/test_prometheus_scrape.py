"""A real Prometheus (Debian's package) scrapes a real sidecar with deploy/'s scrape config
(HTTPS, the admin node's bearer token from a credentials file) and evaluates deploy/'s
alert rules; a PromQL query for spend per node returns the ledger's figure."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from exo_remote_engine.engine.connection.target import ClientTLS
from exo_remote_engine.sidecar.control.auth import ServerTLS
from exo_remote_engine.sidecar.ledger.spend import Ledger
from tests.support.certs import Pki, make_pki, openssl_skip_reason
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.processes import free_port, stop_process
from tests.support.status_scene import TOKENS, drive, start_scene
from tests.support.traffic import Sidecars

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMETHEUS = shutil.which("prometheus")
WAIT_S = 90.0  # Prometheus start, first scrapes and rule evaluations on a busy 2-core box

pytestmark = [
    pytest.mark.skipif(
        PROMETHEUS is None, reason="prometheus not found: run scripts/bootstrap.sh (Debian's prometheus)"
    ),
    pytest.mark.skipif(openssl_skip_reason() is not None, reason=str(openssl_skip_reason())),
    pytest.mark.timeout(240),
]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(metrics_port: int, pki: Pki) -> int:
        """deploy/prometheus/prometheus.yml pointed at this sidecar: its job, scheme,
        authorization and TLS as shipped; only the paths, the target and the intervals change."""
        config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
        token = tmp_path / "exo-remote-admin-token"
        token.write_text(TOKENS["ops"] + "\n")
        token.chmod(0o600)
        job = config["scrape_configs"][0]
        job["authorization"]["credentials_file"] = str(token)
        job["tls_config"]["ca_file"] = str(pki.ca)
        job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(DEPLOY / "exo-remote-rules.yml")]
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        port = free_port()
        assert PROMETHEUS is not None
        log = (tmp_path / "prometheus.log").open("wb")
        started.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        return port

    yield start
    for process in started:
        stop_process(process, grace_s=10)


async def until(what: str, check: Any, timeout_s: float = WAIT_S) -> Any:
    """Poll ``check`` (async, returns a value or None) until it answers; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except aiohttp.ClientError as exc:
            last = exc
        else:
            if last is not None:
                return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s:g}s (last: {last!r})")


async def api(port: int, path: str, **params: str) -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/api/v1/{path}", params=params) as response:
            body = await response.json()
    assert body["status"] == "success", body
    return body["data"]


async def test_prometheus_scrapes_the_sidecar_and_spend_per_node_is_the_ledgers(
    sidecars: Sidecars, upstream: OpenAIUpstream, pki: Pki, prometheus_for: Any, tmp_path: Path
) -> None:
    tls = ServerTLS(pki.server.cert, pki.server.key)
    sidecar, _ = await start_scene(sidecars, upstream, metrics_listen="0.0.0.0:0", tls=tls)  # off loopback: admin only
    await drive(sidecar, tls=ClientTLS(ca_file=pki.ca))
    assert sidecar.metrics_port is not None
    port = prometheus_for(sidecar.metrics_port, pki)

    async def target_up() -> Any:
        targets = (await api(port, "targets"))["activeTargets"]
        return targets if targets and targets[0]["health"] == "up" else None

    targets = await until("Prometheus scraping the sidecar", target_up)
    assert targets[0]["labels"]["job"] == "exo-remote-sidecar"

    query = "sum by (node) (exo_remote_spend_usd_total)"

    async def spend_per_node() -> dict[str, float] | None:
        result = (await api(port, "query", query=query))["result"]
        found = {r["metric"]["node"]: float(r["value"][1]) for r in result}
        return found if len(found) >= 3 else None

    from_prometheus = await until(f"a result for {query}", spend_per_node)
    ledger = Ledger.open(tmp_path / "state", readonly=True)
    try:
        from_ledger: dict[str, float] = {}
        for row in ledger.usage(0):
            from_ledger[row.node] = from_ledger.get(row.node, 0.0) + row.cost_usd
    finally:
        ledger.close()
    assert set(from_prometheus) == {n for n, spend in from_ledger.items() if spend > 0}
    for node, spend in from_prometheus.items():
        assert spend == pytest.approx(from_ledger[node], rel=1e-9), node

    budget = await api(port, "query", query='exo_remote_node_budget_spent_usd{node="node-a"}')
    assert float(budget["result"][0]["value"][1]) == pytest.approx(from_ledger["node-a"], rel=1e-9)

    async def rules_evaluated() -> Any:
        rules = [r for g in (await api(port, "rules"))["groups"] for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None

    rules = await until("deploy/'s alert rules evaluated without error", rules_evaluated)
    assert len(rules) == 7
