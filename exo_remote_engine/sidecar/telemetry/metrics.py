"""Prometheus metrics of the sidecar, served on their own port (never the gRPC port) by
:mod:`~exo_remote_engine.sidecar.status.server`, with the status page.

Labels are model aliases, node identities and status codes only: nothing a request
carries, nothing secret. Without prometheus_client installed every recorder is a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exo_remote_engine.contract.redaction import redact
from exo_remote_engine.sidecar.telemetry.recent import OK, RecentOutcomes

try:
    import prometheus_client as prom
except ImportError:  # pragma: no cover - the sidecar extra ships it
    prom = None  # type: ignore[assignment]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per sidecar, so tests can run several sidecars in one process."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.registry: Any = prom.CollectorRegistry() if prom else None
        self.recent = RecentOutcomes(clock)  # the status page's last hour (no Prometheus needed)
        # (metric, label values) -> its child: prometheus_client's labels() validates and
        # takes a lock on every call, and a short request asked it six times.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        if prom is None:
            return
        labels = ("model", "node")
        self.requests = prom.Counter(
            "exo_remote_requests", "Generate calls by final status code", (*labels, "code"), registry=self.registry
        )
        self.tokens_in = prom.Counter("exo_remote_prompt_tokens", "Prompt tokens", labels, registry=self.registry)
        self.tokens_out = prom.Counter(
            "exo_remote_completion_tokens", "Completion tokens", labels, registry=self.registry
        )
        self.ttft = prom.Histogram(
            "exo_remote_time_to_first_token_seconds",
            "Call start to first delta written",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.gap = prom.Histogram(
            "exo_remote_inter_token_delay_seconds",
            "Time between consecutive deltas written",
            ("model",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.spend = prom.Counter(
            "exo_remote_spend_usd",
            "Cost of finished requests in USD (known prices only)",
            labels,
            registry=self.registry,
        )
        self.unpriced = prom.Counter(
            "exo_remote_unpriced_requests",
            "Requests whose price is unknown (no cost counted)",
            labels,
            registry=self.registry,
        )
        self.limit_hits = prom.Counter(
            "exo_remote_limit_hits",
            "Requests refused by a limit: rpm, tpm, deployment (every deployment at its limit) or budget",
            ("node", "limit"),
            registry=self.registry,
        )
        self.active = prom.Gauge("exo_remote_active_streams", "Streams in flight", registry=self.registry)
        self.errors = prom.Counter(
            "exo_remote_request_errors",
            "Admitted Generate calls that failed, by error reason (the error table's)",
            (*labels, "reason"),
            registry=self.registry,
        )
        self.deployment_ttft = prom.Histogram(
            "exo_remote_deployment_time_to_first_token_seconds",
            "Call start to first delta written, by the deployment that produced it",
            ("model", "deployment"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queued = prom.Gauge(
            "exo_remote_queue_depth",
            "Requests waiting for capacity (control/queueing.py)",
            ("node",),
            registry=self.registry,
        )
        self.queue_wait = prom.Histogram(
            "exo_remote_queue_wait_seconds",
            "Time a request waited for capacity, by outcome (admitted or refused: timed out or cancelled)",
            ("node", "outcome"),
            buckets=(*_LATENCY_BUCKETS, 120, 300),
            registry=self.registry,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def charged(self, model: str, node: str, cost_usd: float | None) -> None:
        if prom is None:
            return
        if cost_usd is None:
            self.child(self.unpriced, model, node).inc()
        elif cost_usd:
            self.child(self.spend, model, node).inc(cost_usd)

    def limit_hit(self, node: str, limit: str) -> None:
        if prom is not None:
            self.child(self.limit_hits, node, limit).inc()

    def refused(self, node: str, reason: str) -> None:
        """A request refused at admission (a limit or budget): in the last hour's tally."""
        self.recent.add(redact(node), reason)

    def queue_depth(self, node: str, change: int) -> None:
        if prom is not None:
            self.queued.labels(node).inc(change)

    def queue_waited(self, node: str, seconds: float, admitted: bool) -> None:
        if prom is not None:
            self.queue_wait.labels(node, "admitted" if admitted else "refused").observe(max(0.0, seconds))

    def stream(self, model: str, node: str, deployment: Callable[[], str] | None = None) -> StreamRecorder:
        # Labels are ours (aliases, node names), but an alias may come from a provider's
        # listing: redacted like everything else that leaves the process. ``deployment``
        # says which member of the model's group is serving (asked at the first delta).
        return StreamRecorder(self, redact(model), redact(node), deployment)


@dataclass
class StreamRecorder:
    metrics: Metrics
    model: str
    node: str
    deployment: Callable[[], str] | None = None
    started: float = field(default_factory=time.perf_counter)
    last: float | None = None
    reason: str = ""  # the error reason when the call failed (set by the servicer)
    _gap: Any = None  # this model's inter-delta histogram, looked up once per stream

    def delta_written(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self._first_delta(now - self.started)
        elif self._gap is not None:
            self._gap.observe(now - self.last)
        self.last = now

    def _first_delta(self, ttft: float) -> None:
        deployment = redact(self.deployment()) if self.deployment is not None else self.model
        self.metrics.recent.first_token(self.model, deployment, ttft)
        if prom is None:
            return
        metrics = self.metrics
        metrics.child(metrics.ttft, self.model, self.node).observe(ttft)
        metrics.child(metrics.deployment_ttft, self.model, deployment).observe(ttft)
        self._gap = metrics.child(metrics.gap, self.model)

    def finished(self, code: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        reason = self.reason or ("CANCELLED" if code == "CANCELLED" else "") or ("" if code == OK else code)
        self.metrics.recent.add(self.node, reason or OK, self.model)
        if prom is None:
            return
        metrics = self.metrics
        if reason:
            metrics.child(metrics.errors, self.model, self.node, reason).inc()
        metrics.child(metrics.requests, self.model, self.node, code).inc()
        if prompt_tokens:
            metrics.child(metrics.tokens_in, self.model, self.node).inc(prompt_tokens)
        if completion_tokens:
            metrics.child(metrics.tokens_out, self.model, self.node).inc(completion_tokens)
