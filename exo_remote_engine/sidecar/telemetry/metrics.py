"""Prometheus metrics of the sidecar, served on their own port (never the gRPC port).

Labels are model aliases, node identities and status codes only: nothing a request
carries, nothing secret. Without prometheus_client installed every recorder is a no-op.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from exo_remote_engine.contract.redaction import redact

try:
    import prometheus_client as prom
except ImportError:  # pragma: no cover - the sidecar extra ships it
    prom = None  # type: ignore[assignment]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per sidecar, so tests can run several sidecars in one process."""

    def __init__(self) -> None:
        self.registry: Any = prom.CollectorRegistry() if prom else None
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

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once per label set."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def serve(self, host: str, port: int) -> int:
        """Start the scrape endpoint; returns the bound port."""
        if prom is None:
            raise RuntimeError("prometheus_client is not installed (pip install 'exo-remote-engine[sidecar]')")
        server, _thread = prom.start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)

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

    def stream(self, model: str, node: str) -> StreamRecorder:
        # Labels are ours (aliases, node names), but an alias may come from a provider's
        # listing: redacted like everything else that leaves the process.
        return StreamRecorder(self, redact(model), redact(node))


@dataclass
class StreamRecorder:
    metrics: Metrics
    model: str
    node: str
    started: float = field(default_factory=time.perf_counter)
    last: float | None = None
    _gap: Any = None  # this model's inter-delta histogram, looked up once per stream

    def delta_written(self) -> None:
        if prom is None:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.child(self.metrics.ttft, self.model, self.node).observe(now - self.started)
            self._gap = self.metrics.child(self.metrics.gap, self.model)
        else:
            self._gap.observe(now - self.last)
        self.last = now

    def finished(self, code: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if prom is None:
            return
        metrics = self.metrics
        metrics.child(metrics.requests, self.model, self.node, code).inc()
        if prompt_tokens:
            metrics.child(metrics.tokens_in, self.model, self.node).inc(prompt_tokens)
        if completion_tokens:
            metrics.child(metrics.tokens_out, self.model, self.node).inc(completion_tokens)
