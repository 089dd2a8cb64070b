"""deploy/prometheus/: ``promtool check rules`` and ``promtool test rules`` pass (each alert
fires when it should and not otherwise; a planted wrong expectation fails), and the scrape
config is valid Prometheus syntax. Debian's ``prometheus`` package brings promtool
(scripts/bootstrap.sh installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: run scripts/bootstrap.sh (Debian's prometheus)"
)


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "exo-remote-rules.yml")
    assert result.returncode == 0 and "SUCCESS: 7 rules found" in result.stdout, result


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", "exo-remote-rules.test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result


def test_promtool_test_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "exo-remote-rules.yml", tmp_path)
    tests = (DEPLOY / "exo-remote-rules.test.yml").read_text()
    (tmp_path / "t.yml").write_text(
        tests.replace("exp_labels: {severity: warning, node: node-a}", "exp_labels: {severity: warning, node: node-c}")
    )
    result = promtool("test", "rules", "t.yml", cwd=tmp_path)
    assert result.returncode != 0 and "node-c" in result.stdout + result.stderr, result


def test_scrape_config_syntax() -> None:
    result = promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result
