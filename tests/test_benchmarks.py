"""Smoke test of the comparative benchmark suite (benchmarks/suite.py) at ``--quick`` size.

It runs the real thing, every row against the real upstream process, with tiny sizes: the
point is that the one command keeps working and writes a complete, sane JSON (every row
present, positive numbers where a row ran), not what the numbers are. The proxy row needs
``.venvs/litellm-proxy`` (built by scripts/bootstrap.sh); where that is absent the suite
reports the row skipped, which fails this test with CI=true (tests/support/real_parts.py).
The exo row is always skipped here (EXO_SRC is taken out of the suite's environment): with
it the run takes over a minute, and real exo has its own tests;
``EXO_SRC=... bash scripts/bench.sh --quick`` runs it.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks import routing
from benchmarks.suite import ALL_ROWS, PROXY_VENV
from tests.support.processes import REPO
from tests.support.real_parts import ci_failure
from tests.support.traffic import KEY_ENV

pytestmark = pytest.mark.timeout(240)


@dataclass(frozen=True)
class SuiteRun:
    report: dict[str, Any]  # the JSON it wrote
    stdout: str  # the tables and the targets it printed


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> SuiteRun:
    workdir = tmp_path_factory.mktemp("bench")
    out = workdir / "suite.json"
    env = {k: v for k, v in os.environ.items() if k != "EXO_SRC"}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.suite",
            "--quick",
            "--streams",
            "4",
            "--out",
            str(out),
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=220,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| row |" in result.stdout and "\nTargets" in result.stdout, result.stdout  # "(?...)" on a busy box
    data: dict[str, Any] = json.loads(Path(out).read_text())
    return SuiteRun(data, result.stdout)


@pytest.fixture(scope="module")
def report(suite_run: SuiteRun) -> dict[str, Any]:
    return suite_run.report


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def test_every_row_is_reported(report: dict[str, Any]) -> None:
    assert list(report["rows"]) == list(ALL_ROWS)
    expected_skips = {"exo"}
    if not (PROXY_VENV / "bin" / "litellm").exists():
        failure = ci_failure(f"the LiteLLM proxy's environment {PROXY_VENV} is missing: run scripts/bootstrap.sh")
        assert failure is None, failure
        expected_skips.add("proxy")
    assert "EXO_SRC" in report["rows"]["exo"]["reason"]
    for row, data in report["rows"].items():
        if row in expected_skips:
            assert data["status"] == "skipped" and data["reason"], (row, data)
        else:
            assert data["status"] == "ok" and "reason" not in data, (row, data.get("reason"))


def test_rows_that_ran_have_sane_numbers(report: dict[str, Any]) -> None:
    for row, s in report["summary"].items():
        assert 0 < s["ttft_p50_ms"] <= s["ttft_p99_ms"] < 5000, (row, s)
        assert _positive(s["ttft_first_ms"]), row
        assert _positive(s["tokens_per_s"]) and _positive(s["chars_per_s"]), row
        assert s["chars_per_s"] > s["tokens_per_s"], row  # a token is a word, several chars
        assert _positive(s["path_cpu_us_per_token"]), row
        assert _positive(s["client_peak_rss_mb"]), row
        assert set(s["load"]) == {"4"}, row
        for k, entry in s["load"].items():
            assert entry["complete"], (row, k, entry)
            assert entry["tokens_received"] == entry["tokens_expected"] == int(k) * 50, (row, k)
            assert 0 < entry["p50_ms"] <= entry["p99_ms"] < 10_000, (row, k, entry)
            if row != "raw":
                assert "added_p99_ms" in entry, (row, k)
        if row not in ("raw", "litellm"):
            assert _positive(s["server_peak_rss_max_mb"]), row
            assert s["server_peak_rss_sum_mb"] >= s["server_peak_rss_max_mb"], row
    raw = report["summary"]["raw"]
    assert raw["vs"]["tokens_per_s_ratio_vs_raw"] == pytest.approx(1.0)
    machine = report["machine"]
    assert machine["cores"] and machine["cpu_model"] and machine["litellm"] and machine["grpcio"]


def test_the_request_rate_phase_measures_every_row(suite_run: SuiteRun) -> None:
    """Short requests at a swept rate (issue #23): each row ran its first rate with every
    request answered, and CPU per request is there for each process."""
    rate = suite_run.report["request_rate"]
    expected = ["raw", "sidecar", "sidecar-w2", "proxy"]
    assert list(rate["rows"]) == expected
    for row in expected[:3]:
        data = rate["rows"][row]
        assert data["status"] == "ok", (row, data.get("reason"))
        first = data["steps"][0]["result"]
        assert first["ok"] and first["requests"] == 25 and first["completed"] == 25, (row, first)
        assert first["errors"] == 0, (row, first["error_kinds"])
        cpu = first["cpu_us_per_request"]
        assert _positive(cpu["client"]), (row, cpu)
        if row != "raw":
            assert _positive(cpu["server"]), (row, cpu)
            assert rate["summary"]["rows"][row]["relay_x_raw_client"] > 0, row
    if not (PROXY_VENV / "bin" / "litellm").exists():
        assert rate["rows"]["proxy"]["status"] == "skipped"
    assert "Request rate:" in suite_run.stdout and "| sidecar-w2 |" in suite_run.stdout
    assert "sidecar CPU per short request <= 1.5x" in suite_run.stdout


def _numbers(value: Any, where: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON value, with its path."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [(where, float(value))]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{where}[{i}]")]
    return []


def test_every_figure_is_finite_and_the_table_shows_the_json(suite_run: SuiteRun) -> None:
    report, out = suite_run.report, suite_run.stdout
    figures = _numbers(report["summary"], "summary")
    assert len(figures) > 20 * len(report["summary"]), "the summaries hold the figures"
    assert all(math.isfinite(v) for _, v in figures), [f for f in figures if not math.isfinite(f[1])]
    for row, data in report["rows"].items():
        line = next((x for x in out.splitlines() if x.startswith(f"| {row} |")), None)
        assert line is not None, f"row {row} missing from the printed table"
        if data["status"] == "ok":
            s = report["summary"][row]
            assert line.startswith(f"| {row} | {s['ttft_p50_ms']:.2f} / {s['ttft_p99_ms']:.2f} / "), line
            assert f" | {s['tokens_per_s']:,.0f} | {s['chars_per_s']:,.0f} | " in line, line
        else:
            assert f"| {row} | {data['status']}: {data['reason']} |" in line, line


def _expected_targets(report: dict[str, Any]) -> dict[str, tuple[float | None, bool | None]]:
    """Each target's value and verdict computed here from the summary's figures."""
    summary, settings = report["summary"], report["settings"]
    side, lite, raw = (summary.get(r) or {} for r in ("sidecar", "litellm", "raw"))
    streams = [int(k) for k in settings["streams"]]
    top = str(max(streams))
    mid = "32" if 32 in streams else top
    rate = f"{settings['rate']:g}"

    def at(s: dict[str, Any], k: str) -> dict[str, Any]:
        return dict((s.get("load") or {}).get(k) or {})

    def within(value: float | None, bound: float) -> tuple[float | None, bool | None]:
        return value, None if value is None else value <= bound

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    expected = {
        "TTFT added by sidecar over litellm, p50 <= 1 ms": within(
            minus(side.get("ttft_p50_ms"), lite.get("ttft_p50_ms")), 1
        ),
        "TTFT added by sidecar over litellm, p99 <= 5 ms": within(
            minus(side.get("ttft_p99_ms"), lite.get("ttft_p99_ms")), 5
        ),
        "sidecar CPU/token (client + sidecar) <= 1.2x litellm, unbounded": within(
            ratio(side.get("path_cpu_us_per_token"), lite.get("path_cpu_us_per_token")), 1.2
        ),
        f"sidecar CPU/token (client + sidecar) <= 1.2x litellm, {mid} x {rate}/s": within(
            ratio(at(side, mid).get("path_cpu_us_per_token"), at(lite, mid).get("path_cpu_us_per_token")), 1.2
        ),
        f"sidecar peak RSS after {top} streams <= 300 MB per process": within(
            at(side, top).get("server_peak_rss_max_mb"), 300
        ),
    }
    if at(side, top) and at(side, top).get("p99_ms") is None:  # saturated: a failure with no figure
        expected[f"{top} x {rate}/s p99 added by sidecar over raw <= 5 ms"] = (None, False)
    else:
        added = minus(at(side, top).get("p99_ms"), at(raw, top).get("p99_ms"))
        assert added == at(side, top).get("added_p99_ms")
        expected[f"{top} x {rate}/s p99 added by sidecar over raw <= 5 ms"] = within(added, 5)
    hosts = summary.get("sidecar-hosts") or {}
    name = f"{top} x {rate}/s p99 added by two sidecar processes (sidecar-hosts) over raw <= 5 ms"
    if at(hosts, top) and at(hosts, top).get("p99_ms") is None:
        expected[name] = (None, False)
    else:
        added = minus(at(hosts, top).get("p99_ms"), at(raw, top).get("p99_ms"))
        assert added == at(hosts, top).get("added_p99_ms")
        expected[name] = within(added, 5)
    return expected


def test_targets_follow_from_the_figures_and_are_printed_as_recorded(suite_run: SuiteRun) -> None:
    report, out = suite_run.report, suite_run.stdout
    targets = {t["target"]: t for t in report["targets"]}
    assert len(targets) == len(report["targets"]) == 15  # 11 streaming, 4 request-rate (issue #23)
    ran = set(report["summary"])
    assert {"raw", "sidecar", "litellm"} <= ran, ran
    expected = _expected_targets(report)
    for name, (value, verdict) in expected.items():
        target = targets[name]
        assert target["pass"] is verdict, (name, target, verdict)
        if value is None:
            assert target["value"] is None, (name, target)
        else:
            assert target["value"] == pytest.approx(value), (name, target, value)
    # The rows this run skips (exo always, proxy without its venv) leave their targets unjudged.
    skipped = {row for row, data in report["rows"].items() if data["status"] == "skipped"}
    for name, target in targets.items():
        if "exo" in skipped and name.startswith("exo "):
            assert (target["value"], target["pass"], target["measured"]) == (None, None, "n/a")
        if "proxy" in skipped and "proxy" in name:
            assert (target["value"], target["pass"], target["measured"]) == (None, None, "n/a")
    busy = "" if report["clean"] else "?"
    for name, target in targets.items():
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[target["pass"]]
        mark = busy if target["pass"] is not None else ""
        line = re.compile(rf"^  {re.escape(verdict + mark)} *{re.escape(name)}: {re.escape(target['measured'])}$", re.M)
        assert line.search(out), f"target not printed as recorded: {verdict}{mark} {name}: {target['measured']}"


# benchmarks/routing.py at a tiny size: both parts run against the real upstream and a real
# sidecar and report sane figures; what the numbers are is the benchmark's business.
async def test_the_routing_benchmark_runs_and_reports_every_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-bench-0123456789abcdef")
    tail = await routing.ttft_tail(tmp_path, requests=12, concurrency=4)
    assert set(tail) == set(routing.CASES)
    for row in tail.values():
        assert row["n"] == 12 and 0 < row["p50"] <= row["p99"] <= row["max"]
    queued = await routing.queueing(tmp_path, burst=3)
    assert queued["completed"] == {"n1": 3, "n2": 3} and queued["errors"] == {"n1": 0, "n2": 0}


def test_the_soak_drives_every_kind_of_request_and_samples_the_sidecar(tmp_path: Path) -> None:
    """``benchmarks/soak.py`` for a few seconds: every kind of request was made, none failed
    unexpectedly, the sidecar was sampled, and the ledger holds the rows it should. (Not
    whether memory stayed flat: a few seconds are all warm-up.)"""
    out = tmp_path / "soak.json"
    args = ["--minutes", "0.25", "--rps", "20", "--streams", "2", "--stream-chunks", "20", "--sample-s", "1"]
    env = {k: v for k, v in os.environ.items() if k != "EXO_SRC"}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", *args, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=200,
    )
    assert out.exists(), result.stderr[-3000:]
    report = json.loads(out.read_text())
    counts = report["counts"]
    assert counts["unexpected"] == 0, report["errors"]
    assert all(counts[kind] > 0 for kind in ("short", "stream", "cancelled", "provider_error")), counts
    assert len(report["samples"]) >= 4 and all(s["rss_mb"] > 0 and s["fds"] > 0 for s in report["samples"])
    assert report["ledger"]["as_expected"] and report["ledger"]["rows"] >= counts["short"], report["ledger"]
    assert "soak: " in result.stdout and "rss_mb:" in result.stdout, result.stdout
