"""Every metric the Grafana dashboard and the alert rules query is one a real sidecar
exports (after the status scene's traffic, so labelled series exist), except Prometheus's
own ``up`` in the host-down alert. A dashboard panel on a metric nobody exports would
stay empty without anyone noticing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import aiohttp
import yaml

from tests.support.openai_upstream import OpenAIUpstream
from tests.support.status_scene import drive, start_scene
from tests.support.traffic import Sidecars

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metrics_in(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and
    grouping clauses left out)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = _GROUPING.sub("", expr)
    found = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        rest = expr[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in _KEYWORDS:
            continue  # a function or aggregation
        found.add(match.group())
    return found


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "exo-remote-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        definition = variable.get("definition", "")
        if definition.startswith("label_values("):
            queries.append(definition[len("label_values(") :].split(",")[0])
    return queries


def rule_queries() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "exo-remote-rules.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_metric_names_are_read_from_promql() -> None:
    expr = 'histogram_quantile(0.9, sum by (le, model) (rate(exo_remote_x_bucket{node=~"$node"}[5m]))) / on (model) y'
    assert metrics_in(expr) == {"exo_remote_x_bucket", "y"}


async def test_every_metric_queried_is_exported(sidecars: Sidecars, upstream: OpenAIUpstream) -> None:
    sidecar, _ = await start_scene(sidecars, upstream, metrics_listen="127.0.0.1:0")
    await drive(sidecar)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{sidecar.metrics_port}/metrics") as response:
            text = await response.text()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    dashboard = set().union(*(metrics_in(q) for q in dashboard_queries()))
    rules = set().union(*(metrics_in(q) for q in rule_queries()))
    assert len(dashboard) >= 15, dashboard  # the parser found the panels' metrics
    assert dashboard - exported == set(), f"the dashboard queries metrics no sidecar exports: {dashboard - exported}"
    assert rules - exported == {"up"}, f"the alert rules query metrics no sidecar exports: {rules - exported - {'up'}}"
