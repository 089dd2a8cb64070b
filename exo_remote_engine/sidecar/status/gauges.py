"""Gauges set from a status snapshot at every scrape: what counters cannot say (a node's
budget and what it spent in the window, this minute's rpm/tpm use against the limits, a
deployment cooling down, the spend copy's lag). The alert rules in ``deploy/prometheus/``
read them; the status page shows the same snapshot, so page and metrics agree.

A series whose value is unknown now (the spend database is down) is removed rather than
left at its last value: an alert must not fire, or stay quiet, on a stale number.
"""

from __future__ import annotations

from typing import Any

from exo_remote_engine.sidecar.status.snapshot import Snapshot

try:
    import prometheus_client as prom
except ImportError:  # pragma: no cover - the sidecar extra ships it
    prom = None  # type: ignore[assignment]


class StatusGauges:
    def __init__(self, registry: Any) -> None:
        self.enabled = prom is not None and registry is not None
        if not self.enabled:
            return

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
            return prom.Gauge(name, doc, labels, registry=registry)

        self.budget = gauge("exo_remote_node_budget_usd", "A node's max_budget (USD per budget window)", ("node",))
        self.budget_spent = gauge(
            "exo_remote_node_budget_spent_usd", "What a node spent in its current budget window (USD)", ("node",)
        )
        self.requests_minute = gauge(
            "exo_remote_node_requests_this_minute", "A node's requests in the current rpm window", ("node",)
        )
        self.tokens_minute = gauge(
            "exo_remote_node_tokens_this_minute", "A node's tokens in the current tpm window", ("node",)
        )
        self.rpm_limit = gauge("exo_remote_node_rpm_limit", "A node's rpm limit (nodes with one)", ("node",))
        self.tpm_limit = gauge("exo_remote_node_tpm_limit", "A node's tpm limit (nodes with one)", ("node",))
        self.cooling = gauge(
            "exo_remote_deployment_cooling_down",
            "1 while a deployment cools down after failures, else 0",
            ("model", "deployment"),
        )
        self.ready = gauge("exo_remote_model_ready", "1 when a listed model can be called, else 0", ("model", "source"))
        self.copy_pending = gauge(
            "exo_remote_spend_copy_pending_rows", "Ledger rows not yet copied to the shared spend database"
        )
        self.copy_lag = gauge(
            "exo_remote_spend_copy_lag_seconds",
            "Age of the oldest ledger row not yet copied to the shared spend database (0: none waiting)",
        )

    def update(self, snapshot: Snapshot) -> None:
        if not self.enabled:
            return
        for gauge in (self.budget, self.budget_spent, self.requests_minute, self.tokens_minute):
            gauge.clear()
        for gauge in (self.rpm_limit, self.tpm_limit, self.cooling, self.ready):
            gauge.clear()
        for node in snapshot.nodes:
            if node.rpm.used is not None and node.tpm.used is not None:
                self.requests_minute.labels(node.node).set(node.rpm.used)
                self.tokens_minute.labels(node.node).set(node.tpm.used)
            if node.rpm.limit is not None:
                self.rpm_limit.labels(node.node).set(node.rpm.limit)
            if node.tpm.limit is not None:
                self.tpm_limit.labels(node.node).set(node.tpm.limit)
            if node.budget_usd is not None:
                self.budget.labels(node.node).set(node.budget_usd)
                if node.budget_spent_usd is not None:
                    self.budget_spent.labels(node.node).set(node.budget_spent_usd)
        for model in snapshot.models:
            self.ready.labels(model.model, model.source).set(1 if model.ready else 0)
            for member in model.deployments:
                self.cooling.labels(model.model, member.deployment).set(1 if member.cooling_down else 0)
        if snapshot.spend_copy_pending_rows is not None and snapshot.spend_copy_lag_s is not None:
            self.copy_pending.set(snapshot.spend_copy_pending_rows)
            self.copy_lag.set(snapshot.spend_copy_lag_s)
