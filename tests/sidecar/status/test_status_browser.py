"""The status page in a real headless Chromium (Debian's package, driven by Playwright with
``executable_path``; never a browser download): the numbers it shows equal what
``exo-remote usage`` prints (the real command, in its own process) and what /metrics
says; it loads nothing but itself (every other request would be recorded and refused);
a screenshot is saved into the test's tmp dir and its path printed. Skipped with the
reason without Chromium or Playwright."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.sidecar.status.test_status_page import metric_values, usage_spend
from tests.support.openai_upstream import OpenAIUpstream
from tests.support.status_scene import drive, start_scene
from tests.support.traffic import Sidecars

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


def _skip_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return "Chromium is not installed (Debian: apt-get install chromium; scripts/bootstrap.sh installs it)"
    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (the test extra)"
    return None


pytestmark = [
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
    pytest.mark.timeout(180),  # a hung browser fails the test instead of stalling the suite
]


async def usage_command(state_dir: Path) -> str:
    """``exo-remote usage`` as an operator runs it, in its own process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exo_remote_engine.cli", "usage", "--state-dir", str(state_dir),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode()


def dollars(text: str) -> float:
    match = re.search(r"\$(\d+\.\d+)", text)
    assert match, text
    return float(match.group(1))


async def test_page_in_chromium_equals_usage_and_metrics(
    sidecars: Sidecars, upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    sidecar, _ = await start_scene(sidecars, upstream, metrics_listen="127.0.0.1:0")
    expected = await drive(sidecar)
    port = sidecar.metrics_port
    printed = usage_spend(await usage_command(tmp_path / "state"))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            metrics = await response.text()
    counted = metric_values(metrics, "exo_remote_spend_usd_total")

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            requested: list[str] = []
            refused: list[str] = []

            async def same_origin_only(route: Any) -> None:
                url = route.request.url
                requested.append(url)
                if urllib.parse.urlsplit(url).netloc == f"127.0.0.1:{port}":
                    await route.continue_()
                else:
                    refused.append(url)
                    await route.abort()

            await page.route("**/*", same_origin_only)
            response = await page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            assert response is not None and response.status == 200
            shot = tmp_path / "status-page.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")
            assert refused == [] and requested == [f"http://127.0.0.1:{port}/"], requested  # nothing but itself

            for node, spend in expected.spend.items():
                row = page.locator(f'tr[data-node="{node}"]')
                shown = dollars(await row.locator("td.spend-today").inner_text())
                assert shown == pytest.approx(printed[node], abs=1e-6), node  # both print 6 decimals
                assert shown == pytest.approx(spend, abs=1e-6), node
                exact = float(await row.locator("td.spend-today").get_attribute("data-usd") or "nan")
                from_metrics = sum(v for labels, v in counted.items() if f'node="{node}"' in labels)
                assert exact == pytest.approx(from_metrics, rel=1e-9), node
                assert await row.locator("td.last-hour").inner_text() == str(expected.requests[node])
                errors = await row.locator("td.errors").inner_text()
                assert errors == (", ".join(f"{k} {v}" for k, v in expected.errors[node].items()) or "none")

            a = page.locator('tr[data-node="node-a"]')
            budget = await a.locator("td.budget").inner_text()
            spent = metric_values(metrics, "exo_remote_node_budget_spent_usd")['{node="node-a"}']
            assert dollars(budget) == pytest.approx(spent, abs=1e-6) and "of $1.000000 per 1d" in budget
            requests_now = metric_values(metrics, "exo_remote_node_requests_this_minute")['{node="node-a"}']
            assert (await a.locator("td.rpm").inner_text()).startswith(f"{int(requests_now)} / 50")
            assert await page.locator('tr[data-deployment="grp#2"]').inner_text() != ""
            assert "cooling down" in await page.locator('tr[data-deployment="grp#2"]').inner_text()
            assert "healthy" in await page.locator('tr[data-deployment="grp#1"]').inner_text()
            # The chart: one bar per node with spend today, with its exact figure as a tooltip.
            bars = page.locator("#spend-chart rect title")
            titles = [await bars.nth(i).text_content() or "" for i in range(await bars.count())]
            for node, spend in expected.spend.items():
                assert any(t.startswith(f"{node} ") and t.endswith(f"${spend:.6f}") for t in titles), titles
            assert await page.locator("#spend-chart").is_visible()
        finally:
            await browser.close()
