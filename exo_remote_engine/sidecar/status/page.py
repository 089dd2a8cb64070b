"""The status page: one HTML document with its style inline and its chart drawn as SVG on
the server, so it needs nothing from outside (no CDN, no script; it works offline and
behind any proxy). Every value shown comes from :class:`~.snapshot.Snapshot`, the same
object ``/status.json`` serialises; every string from it is HTML-escaped (aliases and
reasons may come from a provider's listing)."""

from __future__ import annotations

import datetime as dt
from html import escape

from exo_remote_engine.sidecar.status.chart import spend_chart
from exo_remote_engine.sidecar.status.snapshot import Limit, ModelView, NodeView, Snapshot

REFRESH_S = 30
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111827;background:#f9fafb}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.meta{color:#6b7280;font-size:12px}table{border-collapse:collapse;background:#fff;min-width:60%}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6;font-weight:600}tr>td:first-child{white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{width:160px;height:10px;background:#e5e7eb;border-radius:5px;overflow:hidden;display:inline-block}
.bar>span{display:block;height:100%;background:#10b981}.bar.warn>span{background:#f59e0b}
.bar.over>span{background:#ef4444}.bad{color:#b91c1c;font-weight:600}.ok{color:#047857}
.note{background:#fef3c7;border:1px solid #f59e0b;padding:6px 10px;margin:8px 0}
"""


def usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.6f}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"


def _when(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _bar(used: float, limit: float) -> str:
    fraction = used / limit if limit > 0 else 1.0
    level = "over" if fraction >= 1 else "warn" if fraction >= 0.8 else ""
    return (
        f'<span class="bar {level}" title="{fraction:.0%}"><span style="width:{min(fraction, 1) * 100:.1f}%">'
        f"</span></span> {fraction:.0%}"
    )


def _limit(name: str, limit: Limit) -> str:
    if limit.used is None:
        return f'<td class="num {name}"><span class="meta">no limit</span></td>'
    if limit.limit is None:
        return f'<td class="num {name}" data-used="{limit.used}">{limit.used:,} <span class="meta">no limit</span></td>'
    shown = f"{limit.used:,} / {limit.limit:,} {_bar(limit.used, limit.limit)}"
    return f'<td class="num {name}" data-used="{limit.used}">{shown}</td>'


def _budget(node: NodeView) -> str:
    if node.budget_usd is None:
        return '<td class="budget">no budget</td>'
    if node.budget_spent_usd is None:
        return f'<td class="budget bad">{usd(node.budget_usd)} budget; spent unknown: {escape(node.budget_error)}</td>'
    window = f"per {escape(node.budget_duration)}" if node.budget_duration else "for good"
    resets = f", resets in {node.budget_resets_in_s / 3600:.1f} h" if node.budget_resets_in_s is not None else ""
    return (
        f'<td class="budget" data-spent-usd="{node.budget_spent_usd!r}">{usd(node.budget_spent_usd)} of '
        f"{usd(node.budget_usd)} {window}{resets}<br>{_bar(node.budget_spent_usd, node.budget_usd)}</td>"
    )


def _node_row(node: NodeView) -> str:
    errors = ", ".join(f"{escape(k)} {v:,}" for k, v in node.last_hour_errors.items()) or "none"
    spend = f'data-usd="{node.spend_today_usd!r}"' if node.spend_today_usd is not None else ""
    total = f'data-usd="{node.spend_30d_usd!r}"' if node.spend_30d_usd is not None else ""
    return (
        f'<tr data-node="{escape(node.node)}"><td>{escape(node.node)}</td>'
        f'<td class="num spend-today" {spend}>{usd(node.spend_today_usd)}'
        + (f' <span class="meta">+{node.unpriced_today} unpriced</span>' if node.unpriced_today else "")
        + f'</td><td class="num spend-30d" {total}>{usd(node.spend_30d_usd)}</td>'
        f'<td class="num requests-30d">{node.requests_30d:,}</td>{_budget(node)}'
        f"{_limit('rpm', node.rpm)}{_limit('tpm', node.tpm)}"
        f'<td class="num last-hour">{node.last_hour_requests:,}</td>'
        f'<td class="errors">{errors}</td></tr>'
    )


def _model_rows(model: ModelView) -> str:
    state = '<span class="ok">ready</span>'
    if not model.ready:
        state = f'<span class="bad">not ready</span>: {escape(model.not_ready_reason)}'
    failed = sum(model.last_hour_errors.values())
    if failed:
        reasons = ", ".join(f"{escape(k)} {v:,}" for k, v in model.last_hour_errors.items())
        level = "bad" if failed == model.last_hour_requests else "meta"
        share = f"{failed:,} of {model.last_hour_requests:,}"
        state += f'<br><span class="{level}">{share} failed in the last hour: {reasons}</span>'
    rows = [
        f'<tr data-model="{escape(model.model)}"><td><b>{escape(model.model)}</b></td><td>{escape(model.provider)}</td>'
        f'<td>{state}</td><td class="num ttft-p50">{seconds(model.ttft_p50_s)}</td>'
        f'<td class="num ttft-p90">{seconds(model.ttft_p90_s)}</td><td class="num">{model.ttft_samples:,}</td></tr>'
    ]
    if len(model.deployments) > 1 or model.deployments[0].deployment != model.model:
        for member in model.deployments:
            health = (
                f'<span class="bad">cooling down, {member.cooldown_left_s:.0f} s left</span>'
                if member.cooling_down
                else '<span class="ok">healthy</span>'
            )
            rows.append(
                f'<tr data-deployment="{escape(member.deployment)}"><td>&nbsp;&nbsp;↳ {escape(member.deployment)}</td>'
                f'<td>{escape(member.provider)}</td><td>{health}</td><td class="num">{seconds(member.ttft_p50_s)}</td>'
                f'<td class="num">{seconds(member.ttft_p90_s)}</td><td class="num">{member.ttft_samples:,}</td></tr>'
            )
    return "".join(rows)


def render(snapshot: Snapshot) -> str:
    notes = "".join(f'<div class="note">{escape(n)}</div>' for n in snapshot.notes)
    nodes = "".join(_node_row(n) for n in snapshot.nodes) or '<tr><td colspan="9">no node has called yet</td></tr>'
    models = "".join(_model_rows(m) for m in snapshot.models)
    hidden = (
        f'<p class="meta">{snapshot.not_ready_discovered} discovered models are not ready (no key or server); '
        "<code>exo-remote models</code> lists them with the reason.</p>"
        if snapshot.not_ready_discovered
        else ""
    )
    hosts = ""
    if len(snapshot.hosts) > 1 or snapshot.worker_ports:
        rows = "".join(
            f'<tr data-host="{escape(h.host)}" data-ledger="{escape(h.ledger)}"><td>{escape(h.host)} '
            f'<span class="meta">ledger {escape(h.ledger)}{", this sidecar" if h.this_sidecar else ""}</span>'
            f'</td><td class="num">{h.requests:,}</td><td class="num">{usd(h.spend_usd)}</td>'
            f"<td>{_when(h.last_request_at)}</td></tr>"
            for h in snapshot.hosts
        )
        workers = ", ".join(str(p) for p in snapshot.worker_ports) or "none"
        hosts = (
            '<h2>Sidecar hosts</h2><table id="hosts"><tr><th>host</th><th>requests</th><th>spend</th>'
            "<th>last request</th></tr>"
            f'{rows}</table><p class="meta">worker ports of this host: {escape(workers)}</p>'
        )
    copy = ""
    if snapshot.spend_copy_pending_rows is not None and snapshot.spend_copy_lag_s is not None:
        copy = (
            f'<p class="meta">spend copy to {escape(snapshot.spend_source)}: '
            f"{snapshot.spend_copy_pending_rows:,} rows waiting, "
            f"oldest {snapshot.spend_copy_lag_s:.0f} s old</p>"
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_S}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>exo-remote sidecar status - {escape(snapshot.host)}</title><style>{_STYLE}</style></head>
<body><h1>exo-remote sidecar: {escape(snapshot.host)}</h1>
<div class="meta">at {_when(snapshot.generated_at)}; spend from {escape(snapshot.spend_source)};
refreshes every {REFRESH_S} s; data: <a href="status.json">status.json</a>, <a href="metrics">metrics</a></div>
{notes}
<h2>Nodes</h2>
<table id="nodes"><tr><th>node</th><th>spend today (UTC)</th><th>spend, 30 days</th><th>charged requests, 30 days</th>
<th>budget window</th><th>requests this minute</th><th>tokens this minute</th><th>requests, last hour</th>
<th>errors by reason, last hour</th></tr>{nodes}</table>
<h2>Spend per node per day, last 30 days</h2>{spend_chart(snapshot.days, snapshot.daily_spend)}
<h2>Models and deployments</h2>
<table id="models"><tr><th>model / deployment</th><th>provider</th><th>health</th><th>TTFT p50</th><th>TTFT p90</th>
<th>first tokens seen</th></tr>{models}</table>{hidden}
{hosts}{copy}
</body></html>
"""
