"""The request-rate phase of the suite: what one short request costs, and how many a second
each row sustains.

Short streamed requests (``--request-n`` chunks, 8 by default, sent as fast as the
connection takes them) arrive open-loop on an absolute schedule (request ``i`` is due at
``t0 + i/rate``) and each one's latency runs from its *scheduled* start to its last chunk,
so queueing anywhere on the path is counted (:func:`benchmarks.load_client.phase_requests`).
Rows, all against the one benchmark upstream:

  raw         a bare aiohttp client reading the upstream (the floor, and the reference for
              CPU per request)
  sidecar     one sidecar process (default flags: accounting, limits and INFO logging on)
              read by the engine's own ``SidecarClient``
  sidecar-w2  the same with ``--workers 2``
  proxy       the LiteLLM proxy (``.venvs/litellm-proxy``), when that environment exists

Rates are swept upwards; a row stops at its first rate that fails (any error, or p99 more
than ``MAX_ADDED_P99_MS`` over raw's p99 at the same rate), and its capacity is the
highest rate it passed. CPU per request is given for every process (client, server tree,
upstream), from /proc and getrusage over the measurement window: on a shared box the
absolute figures move with the neighbours, so the ratios to the raw client's CPU (measured
in the same run) are the figures to compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUEST_ROWS = ("raw", "sidecar", "sidecar-w2", "proxy")
MAX_ADDED_P99_MS = 5.0


@dataclass(frozen=True)
class RateSettings:
    rows: list[str]
    rates: list[float]
    seconds: float
    n: int
    warmup: int


def parse_rates(text: str) -> list[float]:
    rates = sorted({float(r) for r in text.split(",") if r.strip()})
    if not rates or rates[0] <= 0:
        raise ValueError(f"request rates must be positive numbers, got {text!r}")
    return rates


def _client_row(row: str) -> str:
    """The load client's reader for a row (``sidecar-w2`` reads like ``sidecar``)."""
    return "sidecar" if row.startswith("sidecar") else row


def _start(row: str, workdir: Path, config: Path, upstream: str) -> Any:
    from benchmarks import suite

    if row == "raw":
        return suite.Serving(target=upstream)
    if row == "proxy":
        return suite.start_proxy(workdir, config)
    workers = 2 if row == "sidecar-w2" else 1
    return suite.start_sidecar(workdir, config, f"rps-{row}", suite.sidecar_args(True, workers))


def _per_request(result: dict[str, Any]) -> dict[str, float]:
    return {role: us for role, us in (result.get("cpu_us_per_request") or {}).items()}


def _verdict(result: dict[str, Any], raw: dict[str, Any] | None) -> tuple[bool, float | None]:
    """(passed, p99 added over raw's at this rate) for one row at one rate."""
    if not result.get("ok") or result.get("errors") or result.get("completed") != result.get("requests"):
        return False, None
    p99 = result["latency_ms"].get("p99")
    if p99 is None:
        return False, None
    if raw is None:  # raw itself, or raw did not run: the added figure is unknown
        return True, None
    raw_p99 = (raw.get("latency_ms") or {}).get("p99")
    if raw_p99 is None:
        return True, None
    added = p99 - raw_p99
    return added <= MAX_ADDED_P99_MS, added


def run_sweep(settings: RateSettings, workdir: Path, config: Path, upstream: str, upstream_pid: int) -> dict[str, Any]:
    """Every row at every rate (until its first failure); the raw row runs first, since the
    others' p99 is judged against its p99 at the same rate."""
    from benchmarks import suite

    rows: dict[str, Any] = {}
    raw_by_rate: dict[float, dict[str, Any]] = {}
    for row in settings.rows:
        try:
            serving = _start(row, workdir, config, upstream)
        except suite.Skip as exc:
            suite.log(f"requests {row}: skipped: {exc}")
            rows[row] = {"status": "skipped", "reason": str(exc)}
            continue
        except Exception as exc:
            suite.log(f"requests {row}: could not start: {exc}")
            rows[row] = {"status": "failed", "reason": f"could not start: {str(exc)[:2000]}"}
            continue
        steps: list[dict[str, Any]] = []
        try:
            for rate in settings.rates:
                args = [
                    f"--rps={rate:g}",
                    f"--duration-s={settings.seconds:g}",
                    f"--n={settings.n}",
                    f"--warmup={settings.warmup}",
                    f"--timeout-s={2 * settings.seconds + 10:g}",
                ]
                timeout = 2 * settings.seconds + 120
                result = suite.run_client(
                    _client_row(row), serving, upstream, upstream_pid, "requests", args, timeout, workdir
                )
                if row == "raw":
                    raw_by_rate[rate] = result
                passed, added = _verdict(result, None if row == "raw" else raw_by_rate.get(rate))
                step = {"rate": rate, "pass": passed, "added_p99_ms": added, "result": result}
                steps.append(step)
                lat = result.get("latency_ms") or {}
                cpu = ", ".join(f"{r} {us:,.0f}" for r, us in _per_request(result).items())
                suite.log(
                    f"requests {row} @{rate:g}/s: {'pass' if passed else 'FAIL'}; p50 {suite._lat(lat.get('p50'))} "
                    f"p99 {suite._lat(lat.get('p99'))} ms, {result.get('errors', '?')} errors; CPU us/request {cpu}"
                )
                if not passed:
                    break
        finally:
            serving.stop()
        passed_rates = [s["rate"] for s in steps if s["pass"]]
        rows[row] = {
            "status": "ok",
            "steps": steps,
            "flags": serving.flags,
            "capacity_rps": max(passed_rates, default=0),
        }
    return {"settings": vars(settings), "rows": rows, "summary": summarize(rows)}


def summarize(rows: dict[str, Any]) -> dict[str, Any]:
    """Per row: capacity, and at the reference rate (the lowest, which every row ran even
    when it failed there) CPU per request by process and its ratio to the raw client's."""
    ok = {row: data for row, data in rows.items() if data.get("status") == "ok" and data["steps"]}
    reference = min((data["steps"][0]["rate"] for data in ok.values()), default=None)
    out: dict[str, Any] = {"reference_rate": reference, "rows": {}}
    raw_client: float | None = None
    if "raw" in ok:
        raw_step = next((s for s in ok["raw"]["steps"] if s["rate"] == reference), None)
        raw_client = _per_request(raw_step["result"]).get("client") if raw_step else None
    for row, data in ok.items():
        step = next((s for s in data["steps"] if s["rate"] == reference), None)
        entry: dict[str, Any] = {"capacity_rps": data["capacity_rps"]}
        if step is not None:
            result = step["result"]
            cpu = _per_request(result)
            lat = result.get("latency_ms") or {}
            entry.update(
                cpu_us_per_request=cpu,
                p50_ms=lat.get("p50"),
                p99_ms=lat.get("p99"),
                added_p99_ms=step["added_p99_ms"],
                foreign_cores=result.get("foreign_cores"),
            )
            if raw_client:
                relay = sum(v for r, v in cpu.items() if r not in ("client", "upstream"))
                entry["client_x_raw_client"] = cpu.get("client", 0) / raw_client
                entry["relay_x_raw_client"] = relay / raw_client if row != "raw" else None
        out["rows"][row] = entry
    return out


def table(report: dict[str, Any]) -> str:
    from benchmarks import suite

    summary = report["summary"]
    rate = summary.get("reference_rate")
    head = ["row", "capacity req/s (p99 +<=5 ms, 0 errors)", f"@{rate or 0:g}/s p50/p99 ms (+raw p99)"]
    head += ["CPU us/request client / server / upstream", "client x raw client", "server x raw client"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, data in report["rows"].items():
        if data.get("status") != "ok":
            lines.append(f"| {row} | {data.get('status')}: {data.get('reason')} |" + " |" * (len(head) - 2))
            continue
        s = summary["rows"].get(row) or {}
        cpu = s.get("cpu_us_per_request") or {}
        relay = [v for r, v in cpu.items() if r not in ("client", "upstream")]
        added = s.get("added_p99_ms")
        cells = [
            row,
            f"{data['capacity_rps']:g}",
            f"{suite._lat(s.get('p50_ms'))} / {suite._lat(s.get('p99_ms'))}"
            + (f" ({added:+.2f})" if added is not None else ""),
            f"{cpu.get('client', 0):,.0f} / {'+'.join(f'{v:,.0f}' for v in relay) or '—'} / "
            f"{cpu.get('upstream', 0):,.0f}",
            "—" if s.get("client_x_raw_client") is None else f"{s['client_x_raw_client']:.2f}",
            "—" if s.get("relay_x_raw_client") is None else f"{s['relay_x_raw_client']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #23's request-rate targets, in the suite's target format."""
    summary = report["summary"]["rows"]
    side, proxy = summary.get("sidecar") or {}, summary.get("proxy") or {}
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, ok: bool, shown: str) -> None:
        measured = shown if value is not None else "n/a"
        out.append({"target": name, "value": value, "pass": ok if value is not None else None, "measured": measured})

    v = side.get("relay_x_raw_client")
    add(
        "sidecar CPU per short request <= 1.5x the raw aiohttp client's",
        v,
        v is not None and v <= 1.5,
        f"{v or 0:.2f}x",
    )
    v = side.get("client_x_raw_client")
    add(
        "node-side client CPU per short request <= 1.2x the raw client's",
        v,
        v is not None and v <= 1.2,
        f"{v or 0:.2f}x",
    )
    v = side.get("capacity_rps")
    add(
        "one sidecar process sustains 600 req/s (p99 +<=5 ms, 0 errors)", v, v is not None and v >= 600, f"{v or 0:g}/s"
    )
    a, b = side.get("capacity_rps"), proxy.get("capacity_rps")
    v = a / b if a is not None and b else None
    add("sidecar capacity >= 5x the LiteLLM proxy's", v, v is not None and v >= 5, f"{a or 0:g} vs {b or 0:g}/s")
    return out
