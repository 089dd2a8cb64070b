"""One look at the sidecar for the status page, its JSON and the scrape-time gauges: read
from the same objects that admit, route and charge requests, so the page says what the
sidecar does, never a copy of it.

Spend comes from where budgets read it: the shared spend database with ``--database``
(every host's requests), else this host's ledger. Figures the sidecar cannot know now
(the database is down) are ``None`` with the reason, never 0.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.contract.redaction import redact
from exo_remote_engine.sidecar.config.loader import ModelEntry, SidecarConfig
from exo_remote_engine.sidecar.control.accounting import Accounting
from exo_remote_engine.sidecar.control.routing import Router
from exo_remote_engine.sidecar.ledger.history import (
    CopyLag,
    DaySpend,
    LedgerHistory,
    database_daily,
    database_hosts,
    first_day,
)
from exo_remote_engine.sidecar.telemetry.metrics import Metrics
from exo_remote_engine.sidecar.telemetry.recent import OK, percentile
from exo_remote_engine.sidecar.telemetry.safe_logging import safe_logger

log = safe_logger("exo_remote_engine.sidecar")

HISTORY_DAYS = 30
DATABASE_ERRORS_NOTE = "the spend database is unreachable"


@dataclass(frozen=True)
class ListedModel:
    """A model as discovery lists it (handed over by the server: status never imports discovery)."""

    entry: ModelEntry
    ready: bool
    not_ready_reason: str = ""


@dataclass
class StatusSources:
    """What the page reads; built by :mod:`~exo_remote_engine.sidecar.serving.lifecycle`."""

    config: SidecarConfig
    accounting: Accounting
    router: Router
    metrics: Metrics
    models: Callable[[], Awaitable[Sequence[ListedModel]]]
    nodes: Sequence[str] = ()  # named in the token file (or the master key)
    worker_ports: Callable[[], Sequence[int]] = tuple
    history: LedgerHistory | None = None
    ledger_path: str = ""
    database_url: str | None = field(default=None, repr=False)
    database_name: str | None = None  # the URL without its password, as logs show it
    origin: str = ""  # this sidecar's ledger identity (rows in the shared database carry it)
    host: str = field(default_factory=socket.gethostname)


@dataclass
class Limit:
    """This minute's use against a node's limit; ``used`` None: no limit, so not counted."""

    used: int | None
    limit: int | None


@dataclass
class NodeView:
    node: str
    spend_today_usd: float | None
    unpriced_today: int
    spend_30d_usd: float | None
    requests_30d: int
    budget_usd: float | None = None
    budget_spent_usd: float | None = None  # in the current window
    budget_duration: str | None = None
    budget_resets_in_s: float | None = None
    budget_error: str = ""
    rpm: Limit = field(default_factory=lambda: Limit(None, None))
    tpm: Limit = field(default_factory=lambda: Limit(None, None))
    last_hour_requests: int = 0
    last_hour_errors: dict[str, int] = field(default_factory=dict)


@dataclass
class DeploymentView:
    deployment: str
    provider: str
    cooling_down: bool
    cooldown_left_s: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_samples: int


@dataclass
class ModelView:
    model: str
    provider: str
    source: str
    ready: bool
    not_ready_reason: str
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_samples: int
    deployments: list[DeploymentView]
    last_hour_requests: int = 0  # admitted calls of this model in the last hour
    last_hour_errors: dict[str, int] = field(default_factory=dict)


@dataclass
class HostView:
    host: str
    ledger: str  # the first 8 characters of the sidecar's ledger identity
    this_sidecar: bool
    requests: int
    spend_usd: float
    last_request_at: float


@dataclass
class Snapshot:
    generated_at: float
    host: str
    spend_source: str
    nodes: list[NodeView]
    models: list[ModelView]
    not_ready_discovered: int
    hosts: list[HostView]
    worker_ports: list[int]
    spend_copy_pending_rows: int | None
    spend_copy_lag_s: float | None
    days: list[str]
    daily_spend: dict[str, list[float]]  # node -> USD per day, aligned with ``days``
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def collect(sources: StatusSources, with_history: bool = True) -> Snapshot:
    """The sidecar now. ``with_history`` False skips the 30-day chart and the hosts (a scrape
    needs neither)."""
    accounting = sources.accounting
    now = accounting.clock()
    notes: list[str] = []
    days = _days(now)
    daily = await _daily(sources, days[0], notes) if with_history else None
    hosts = await _hosts(sources, notes) if with_history and sources.database_url is not None else []
    recent = sources.metrics.recent.last_hour()
    nodes = await _nodes(sources, daily, days, recent)
    models, hidden = await _models(sources)
    lag = _copy_lag(sources, notes)
    chart: dict[str, list[float]] = {}
    for row in daily or ():
        series = chart.setdefault(row.node, [0.0] * len(days))
        if row.day in days:
            series[days.index(row.day)] += row.cost_usd
    return Snapshot(
        generated_at=now,
        host=sources.host,
        spend_source=sources.database_name or sources.ledger_path or "accounting off",
        nodes=nodes,
        models=models,
        not_ready_discovered=hidden,
        hosts=hosts,
        worker_ports=list(sources.worker_ports()),
        spend_copy_pending_rows=lag.pending_rows if lag is not None else None,
        spend_copy_lag_s=_lag_s(lag, now),
        days=days,
        daily_spend=chart,
        notes=notes,
    )


def _lag_s(lag: CopyLag | None, now: float) -> float | None:
    """How old the oldest row waiting for the copy is (0: none waits; None: no copy)."""
    if lag is None:
        return None
    return 0.0 if lag.oldest_pending_at is None else max(0.0, now - lag.oldest_pending_at)


def _days(now: float) -> list[str]:
    start = dt.date.fromisoformat(first_day(now, HISTORY_DAYS))
    return [(start + dt.timedelta(days=i)).isoformat() for i in range(HISTORY_DAYS)]


async def _daily(sources: StatusSources, since_day: str, notes: list[str]) -> list[DaySpend] | None:
    if sources.database_url is not None:
        try:
            return await database_daily(sources.database_url, since_day)
        except Exception as exc:  # the database's driver errors, timeouts, a refused connection
            notes.append(f"{DATABASE_ERRORS_NOTE} ({type(exc).__name__}): spend per day is unknown")
            return None
    if sources.history is None:
        notes.append("accounting is off (--no-accounting): no spend is recorded")
        return []
    return await asyncio.to_thread(sources.history.daily, since_day)


async def _hosts(sources: StatusSources, notes: list[str]) -> list[HostView]:
    assert sources.database_url is not None
    try:
        found = await database_hosts(sources.database_url)
    except Exception as exc:
        notes.append(f"{DATABASE_ERRORS_NOTE} ({type(exc).__name__}): the hosts are unknown")
        return []
    return [
        HostView(h.host, h.origin[:8], h.origin == sources.origin, h.requests, h.cost_usd, h.last_ended_at)
        for h in found
    ]


def _copy_lag(sources: StatusSources, notes: list[str]) -> CopyLag | None:
    if sources.history is None or sources.database_name is None:
        return None
    try:
        return sources.history.copy_lag(sources.database_name)
    except Exception as exc:  # sqlite3 errors: a busy or unreadable ledger
        notes.append(f"the ledger could not be read ({type(exc).__name__}): the spend copy's lag is unknown")
        return None


async def _nodes(
    sources: StatusSources,
    daily: list[DaySpend] | None,
    days: list[str],
    recent: dict[str, dict[str, int]],
) -> list[NodeView]:
    """Every node's row in one pass: its spend, this minute's rpm/tpm use, the last hour
    and its budget, each read once."""
    config, accounting = sources.config, sources.accounting
    names = set(sources.nodes) | set(config.node_policies) | set(config.node_quotas) | set(recent)
    names |= {row.node for row in daily or ()}
    # Only nodes with an rpm or tpm limit are counted (accounting.admit): the others' use
    # is unknown here, and shown as such rather than as 0. Their windows are read together
    # (one Redis round trip when shared).
    keys = [f"node:{name}" for name, q in config.node_quotas.items() if q.rpm or q.tpm]
    shared = accounting.shared_windows
    counts = await shared.counts(keys) if shared is not None and keys else accounting.windows.counts(keys)
    views: list[NodeView] = []
    today = days[-1]
    for name in sorted(names):
        rows = [r for r in daily or () if r.node == name]
        outcomes = recent.get(name, {})
        view = NodeView(
            node=name,
            spend_today_usd=sum(r.cost_usd for r in rows if r.day == today) if daily is not None else None,
            unpriced_today=sum(r.unpriced_requests for r in rows if r.day == today),
            spend_30d_usd=sum(r.cost_usd for r in rows) if daily is not None else None,
            requests_30d=sum(r.requests for r in rows),
            last_hour_requests=sum(outcomes.values()),
            last_hour_errors={k: v for k, v in sorted(outcomes.items()) if k != OK},
        )
        quota = config.node_quotas.get(name)
        if quota is not None:
            window = counts.get(f"node:{name}")
            if window is not None:
                view.rpm, view.tpm = Limit(window[0], quota.rpm), Limit(window[1], quota.tpm)
            if quota.max_budget is not None:
                view.budget_usd, view.budget_duration = quota.max_budget, quota.budget_duration
                await _budget(accounting, view)
        views.append(view)
    return views


async def _budget(accounting: Accounting, view: NodeView) -> None:
    if accounting.budgets is None:
        view.budget_error = "accounting is off"
        return
    try:
        status = await accounting.budgets.status(view.node)
    except RemoteError as exc:
        view.budget_error = redact(exc.message)
        return
    if status is not None:
        view.budget_spent_usd, view.budget_resets_in_s = status.spent_usd, status.resets_in_s


async def _models(sources: StatusSources) -> tuple[list[ModelView], int]:
    samples = sources.metrics.recent.ttft_samples()
    recent = sources.metrics.recent.models.last_hour()
    views: list[ModelView] = []
    hidden = 0
    for listed in await sources.models():
        entry = listed.entry
        if not listed.ready and entry.source == "discovered":
            hidden += 1  # a provider without a key lists samples: counted, not drawn
            continue
        deployments: list[DeploymentView] = []
        pooled: list[float] = []
        for member in sources.config.deployments(entry):
            own = samples.get((entry.alias, member.deployment_name), [])
            pooled += own
            left = sources.router.cooldown_left_s(member)
            deployments.append(
                DeploymentView(
                    deployment=redact(member.deployment_name),
                    provider=member.provider,
                    cooling_down=left > 0,
                    cooldown_left_s=left,
                    ttft_p50_s=percentile(own, 0.5),
                    ttft_p90_s=percentile(own, 0.9),
                    ttft_samples=len(own),
                )
            )
        views.append(
            ModelView(
                model=redact(entry.alias),  # an alias may come from a provider's listing
                provider=entry.provider,
                source=entry.source,
                ready=listed.ready,
                not_ready_reason=redact(listed.not_ready_reason),
                ttft_p50_s=percentile(pooled, 0.5),
                ttft_p90_s=percentile(pooled, 0.9),
                ttft_samples=len(pooled),
                deployments=deployments,
                last_hour_requests=sum(recent.get(redact(entry.alias), {}).values()),
                last_hour_errors={k: v for k, v in sorted(recent.get(redact(entry.alias), {}).items()) if k != OK},
            )
        )
    return views, hidden
