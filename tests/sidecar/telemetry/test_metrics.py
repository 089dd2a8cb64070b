"""Metric series are looked up once per label set (issue #23) and still count every request."""

from __future__ import annotations

from exo_remote_engine.sidecar.telemetry.metrics import Metrics


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_repeated_streams_add_up_in_their_own_series() -> None:
    metrics = Metrics()
    for code, model in [("OK", "a"), ("OK", "a"), ("CANCELLED", "a"), ("OK", "b")]:
        recorder = metrics.stream(model, "node-1")
        recorder.delta_written()
        recorder.delta_written()
        recorder.finished(code, prompt_tokens=3, completion_tokens=5)
    assert _value(metrics, "exo_remote_requests_total", model="a", node="node-1", code="OK") == 2
    assert _value(metrics, "exo_remote_requests_total", model="a", node="node-1", code="CANCELLED") == 1
    assert _value(metrics, "exo_remote_requests_total", model="b", node="node-1", code="OK") == 1
    assert _value(metrics, "exo_remote_completion_tokens_total", model="a", node="node-1") == 15
    assert _value(metrics, "exo_remote_time_to_first_token_seconds_count", model="a", node="node-1") == 3
    assert _value(metrics, "exo_remote_inter_token_delay_seconds_count", model="b") == 1


def test_two_sidecars_in_one_process_keep_separate_series() -> None:
    first, second = Metrics(), Metrics()
    first.stream("a", "n").finished("OK")
    assert _value(first, "exo_remote_requests_total", model="a", node="n", code="OK") == 1
    assert _value(second, "exo_remote_requests_total", model="a", node="n", code="OK") is None
    first.charged("a", "n", 0.5)
    first.charged("a", "n", None)
    first.limit_hit("n", "rpm")
    assert _value(first, "exo_remote_spend_usd_total", model="a", node="n") == 0.5
    assert _value(first, "exo_remote_unpriced_requests_total", model="a", node="n") == 1
    assert _value(first, "exo_remote_limit_hits_total", node="n", limit="rpm") == 1
