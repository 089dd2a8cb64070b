"""The status page's data against what the sidecar recorded: the ledger (what
``exo-remote usage`` prints), the Prometheus metrics and the traffic that was sent, on a
real sidecar with a real upstream; and the page itself (self-contained, escaped)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exo_remote_engine.cli.main import render_usage
from exo_remote_engine.sidecar.ledger.spend import Ledger
from tests.support.harness import assert_no_key, metrics_text_of
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.status_scene import drive, start_scene
from tests.support.traffic import Sidecars


async def get(port: int, path: str, **kwargs: Any) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}{path}", **kwargs) as response:
            return response.status, await response.text(), dict(response.headers)


def metric_values(text: str, name: str) -> dict[str, float]:
    """``name``'s samples as {labels: value} from an exposition text."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(\{{.*\}})? (\S+)", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def usage_spend(text: str) -> dict[str, float]:
    """Spend per node summed over the rows ``exo-remote usage`` prints ("unknown": unpriced)."""
    spend: dict[str, float] = {}
    for match in re.finditer(r"^(\S+)\s+\S+\s+[\d,]+\s+[\d,]+\s+[\d,]+\s+([\d.]+|unknown)", text, re.MULTILINE):
        if match.group(2) != "unknown":
            spend[match.group(1)] = spend.get(match.group(1), 0.0) + float(match.group(2))
    return spend


async def test_status_json_equals_ledger_usage_and_metrics(
    sidecars: Sidecars, upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    sidecar, _ = await start_scene(sidecars, upstream, metrics_listen="127.0.0.1:0")
    expected = await drive(sidecar)
    assert sidecar.metrics_port is not None
    status, body, headers = await get(sidecar.metrics_port, "/status.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(body)
    nodes = {n["node"]: n for n in data["nodes"]}
    assert set(nodes) >= {"node-a", "node-b", "ops"}

    ledger = Ledger.open(tmp_path / "state", readonly=True)
    try:
        ledger_spend = {row.node: 0.0 for row in ledger.usage(0)}
        for row in ledger.usage(0):
            ledger_spend[row.node] += row.cost_usd
    finally:
        ledger.close()
    printed = usage_spend(render_usage(tmp_path / "state", None, None))
    metrics = await get(sidecar.metrics_port, "/metrics")
    counted = metric_values(metrics[1], "exo_remote_spend_usd_total")
    for node, spend in expected.spend.items():
        assert nodes[node]["spend_today_usd"] == pytest.approx(spend, rel=1e-9)
        assert nodes[node]["spend_30d_usd"] == pytest.approx(spend, rel=1e-9)
        assert data["daily_spend"][node][-1] == pytest.approx(spend, rel=1e-9)
        assert ledger_spend[node] == pytest.approx(spend, rel=1e-9)
        assert printed[node] == pytest.approx(spend, abs=1e-6)  # usage prints 6 decimals
        from_metrics = sum(v for labels, v in counted.items() if f'node="{node}"' in labels)
        assert from_metrics == pytest.approx(spend, rel=1e-9)
        assert nodes[node]["last_hour_requests"] == expected.requests[node]
        assert nodes[node]["last_hour_errors"] == expected.errors[node]

    a = nodes["node-a"]
    assert (a["budget_usd"], a["budget_duration"]) == (1.0, "1d")
    assert a["budget_spent_usd"] == pytest.approx(expected.spend["node-a"], rel=1e-9)
    assert a["rpm"] == {"used": expected.requests["node-a"], "limit": 50}
    assert a["tpm"] == {"used": expected.tokens["node-a"], "limit": 100000}
    assert nodes["node-b"]["rpm"] == {"used": None, "limit": None}  # no limit: not counted
    assert (nodes["node-a"]["unpriced_today"], nodes["node-b"]["unpriced_today"]) == (0, 1)  # "free": no price

    gauges = metrics[1]
    assert metric_values(gauges, "exo_remote_node_budget_usd") == {'{node="node-a"}': 1.0}
    spent_gauge = metric_values(gauges, "exo_remote_node_budget_spent_usd")['{node="node-a"}']
    assert spent_gauge == pytest.approx(expected.spend["node-a"], rel=1e-9)
    assert metric_values(gauges, "exo_remote_node_requests_this_minute")['{node="node-a"}'] == 6
    errors = metric_values(gauges, "exo_remote_request_errors_total")
    assert errors == {'{model="flaky",node="node-a",reason="PROVIDER_UNAVAILABLE"}': 1.0}

    models = {m["model"]: m for m in data["models"]}
    for model, samples in expected.ttft_samples.items():
        assert models[model]["ttft_samples"] == samples
    assert models["cheap"]["ttft_p50_s"] > 0 and models["cheap"]["ttft_p90_s"] >= models["cheap"]["ttft_p50_s"]
    assert (models["flaky"]["last_hour_requests"], models["flaky"]["last_hour_errors"]) == (
        1,
        {"PROVIDER_UNAVAILABLE": 1},
    )
    assert (models["cheap"]["last_hour_requests"], models["cheap"]["last_hour_errors"]) == (
        6,
        {},
    )  # a refusal at admission is the node's, not the model's
    group = {d["deployment"]: d for d in models["grp"]["deployments"]}
    assert group["grp#2"]["cooling_down"] and group["grp#2"]["cooldown_left_s"] == pytest.approx(3600)
    assert not group["grp#1"]["cooling_down"] and group["grp#1"]["ttft_samples"] == 2
    cooling = metric_values(gauges, "exo_remote_deployment_cooling_down")
    assert cooling['{deployment="grp#2",model="grp"}'] == 1 and cooling['{deployment="grp#1",model="grp"}'] == 0
    assert data["spend_copy_pending_rows"] is None  # no spend database


async def test_page_is_self_contained_and_escapes(sidecars: Sidecars, upstream: OpenAIUpstream) -> None:
    sidecar, _ = await start_scene(sidecars, upstream, metrics_listen="127.0.0.1:0")
    await drive(sidecar)
    assert sidecar.metrics_port is not None
    status, html, headers = await get(sidecar.metrics_port, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    # Nothing from outside: no script, no external URL, no stylesheet link; the chart is inline SVG.
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "<link" not in html
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in html and "<rect" in html
    assert 'data-node="node-a"' in html and "cooling down" in html
    assert_no_key(html, metrics_text_of(sidecar), where="the status page")
    status, _, _ = await get(sidecar.metrics_port, "/anything-else")
    assert status == 404


def test_page_escapes_hostile_names() -> None:
    from exo_remote_engine.sidecar.status.page import render
    from exo_remote_engine.sidecar.status.snapshot import NodeView, Snapshot

    hostile = '<img src=x onerror="alert(1)">'
    node = NodeView(hostile, 0.5, 0, 0.5, 1, last_hour_requests=1, last_hour_errors={hostile: 1})
    days = [f"2026-01-{d:02d}" for d in range(1, 31)]
    snapshot = Snapshot(
        0.0, hostile, "ledger", [node], [], 0, [], [], None, None, days, {hostile: [0.5] * 30}, [hostile]
    )
    html = render(snapshot)
    assert "<img" not in html and "&lt;img src=x" in html
