"""Smoke test of the comparative benchmark suite (benchmarks/suite.py) at ``--quick`` size.

It runs the real thing, every row against the real upstream process, with tiny sizes: the
point is that the one command keeps working and writes a complete, sane JSON (every row
present, positive numbers where a row ran), not what the numbers are. The proxy row needs
``.venvs/litellm-proxy`` (built by scripts/bench.sh) and is reported as skipped, with the
reason, when that is absent. The exo row is always skipped here (EXO_SRC is taken out of the
suite's environment): with it the run takes over a minute, and real exo has its own tests;
``EXO_SRC=... bash scripts/bench.sh --quick`` runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.suite import ALL_ROWS, PROXY_VENV
from tests.support.processes import REPO

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
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
    return data


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def test_every_row_is_reported(report: dict[str, Any]) -> None:
    assert list(report["rows"]) == list(ALL_ROWS)
    expected_skips = {"exo"}
    if not (PROXY_VENV / "bin" / "litellm").exists():
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


def test_targets_are_evaluated(report: dict[str, Any]) -> None:
    names = [t["target"] for t in report["targets"]]
    assert len(names) == 10 and len(set(names)) == 10
    for target in report["targets"]:
        assert target["pass"] in (True, False, None)
        if target["value"] is None:
            assert target["pass"] is None and target["measured"] == "n/a"
    ran = set(report["summary"])
    if {"sidecar", "litellm"} <= ran:
        ttft = next(t for t in report["targets"] if t["target"].startswith("TTFT added by sidecar over litellm, p50"))
        assert ttft["pass"] is not None
