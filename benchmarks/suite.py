"""The comparative benchmark suite: every way of reading the same upstream, side by side.

``bash scripts/bench.sh [flags]`` (or ``.venv/bin/python -m benchmarks.suite``) starts one
upstream (:mod:`benchmarks.upstream`, its own process) and then, one row at a time, the
serving process of each row and a fresh client process per phase
(:mod:`benchmarks.load_client`). Rows:

  raw              aiohttp reading the upstream's SSE directly (the physical floor)
  litellm          ``litellm.acompletion(stream=True)`` in the client process (the baseline)
  proxy            the LiteLLM proxy (``.venvs/litellm-proxy``, one uvicorn worker) over HTTP
  sidecar          our sidecar (default flags, ``--workers N``) read by the engine's gRPC client
  sidecar-litellm  our sidecar forced onto LiteLLM (``--no-openai-fast-path``, one worker)
  sidecar-hosts    two sidecar processes (one worker each) on 127.0.0.2 and 127.0.0.3, read
                   through one two-address target, as nodes read several sidecar hosts
  exo              classic exo with the remote engine (EXO_SRC), read with the openai SDK;
                   its sidecar runs with the sidecar row's flags

Phases per row: TTFT (first request after the serving process started, then warm
sequential requests), single-stream unbounded throughput, and K concurrent streams at a
fixed rate with per-token delivery latency from the upstream's send stamps. Then the
request-rate phase (:mod:`benchmarks.request_rate`): short streamed requests arriving
open-loop at swept rates, rows raw, sidecar, sidecar-w2 (``--workers 2``) and proxy; the
capacity of each and its CPU per request. ``--phases streaming`` or ``--phases requests``
runs one of the two. Prints a
markdown table, the ratios against raw and litellm, and the targets; writes JSON
(``bench-results/suite.json`` by default) with the machine it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from benchmarks.request_rate import REQUEST_ROWS, RateSettings, parse_rates
from benchmarks.request_rate import run_sweep as run_request_sweep
from benchmarks.request_rate import table as request_table
from benchmarks.request_rate import targets as request_targets
from tests.support.processes import stop_process

REPO = Path(__file__).resolve().parents[1]
PROXY_VENV = REPO / ".venvs" / "litellm-proxy"
ALL_ROWS = ("raw", "litellm", "proxy", "sidecar", "sidecar-litellm", "sidecar-hosts", "exo")
KEY_ENV = "BENCH_UPSTREAM_KEY"
# Other processes' CPU during a phase above this makes the run "not clean" (2-core box).
FOREIGN_LIMIT_CORES = 0.2
BASE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "TELEMETRY": "False",
    KEY_ENV: "bench",
}
# Variables that would give the proxy a database or send anything anywhere.
_DROP_ENV = ("DATABASE_URL", "DIRECT_URL", "REDIS_HOST", "REDIS_URL", "LITELLM_MASTER_KEY", "VIRTUAL_ENV")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.update(BASE_ENV)
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------------------
# Settings


@dataclass
class Settings:
    rows: list[str]
    streams: list[int]
    rate: float
    seconds: float
    ramp_s: float
    ttft_requests: int
    ttft_warmup: int
    unbounded_n: int
    unbounded_runs: int
    sidecar_workers: int
    exo_full: bool
    out: Path
    quick: bool
    workdir: Path | None = None
    phases: tuple[str, ...] = ("streaming", "requests")
    requests: Any = None  # benchmarks.request_rate.RateSettings

    @property
    def load_n(self) -> int:
        return max(1, round(self.rate * self.seconds))

    def load_timeout_s(self) -> float:
        """A row that needs more than twice real time has fallen behind for good: its
        undelivered tokens then count as infinitely late (p99 "sat.") instead of the suite
        waiting minutes for a number that only says "saturated" more precisely."""
        return 2 * self.seconds + self.ramp_s + 10


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma list of {', '.join(ALL_ROWS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in well under a minute")
    parser.add_argument("--streams", help="concurrent streams per load phase (default 1,32,128; quick 1,4)")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens/s per stream in load phases")
    parser.add_argument("--seconds", type=float, help="length of each load stream (default 10; quick 1)")
    parser.add_argument("--ramp-s", type=float, help="stream starts are spread over this (default 1; quick 0.1)")
    parser.add_argument("--ttft-requests", type=int, help="warm sequential TTFT requests (default 20; quick 5)")
    parser.add_argument("--unbounded-n", type=int, help="tokens of the unbounded stream (default 3000; quick 300)")
    parser.add_argument("--unbounded-runs", type=int, help="unbounded runs, median taken (default 3; quick 1)")
    parser.add_argument(
        "--sidecar-workers",
        type=int,
        # The suite's client and upstream share this machine: half its cores for the sidecar.
        # (On 2 cores one worker gives +2 ms p99 at 128 streams, two give +40 ms: a second
        # process only adds wake-ups and contention when the cores are already shared.)
        default=max(1, (os.cpu_count() or 1) // 2),
        help="--workers of the sidecar row (default: half the cores)",
    )
    parser.add_argument("--exo-full", action="store_true", help="run exo at every concurrency (default: up to 32)")
    parser.add_argument("--phases", default="streaming,requests", help="comma list of streaming, requests")
    parser.add_argument(
        "--request-rows", default=",".join(REQUEST_ROWS), help=f"request-rate rows: {', '.join(REQUEST_ROWS)}"
    )
    parser.add_argument(
        "--request-rates", help="request arrivals/s to sweep (default 100,200,300,400,500,600,800; quick 25)"
    )
    parser.add_argument("--request-seconds", type=float, help="arrival schedule per rate (default 5; quick 1)")
    parser.add_argument("--request-n", type=int, default=8, help="chunks per short request (default 8)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "suite.json")
    parser.add_argument("--workdir", type=Path, help="configs and process logs (default: a new temporary folder)")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ALL_ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ALL_ROWS)}")
    quick = bool(args.quick)
    phases = tuple(p.strip() for p in args.phases.split(",") if p.strip())
    if not phases or set(phases) - {"streaming", "requests"}:
        parser.error(f"--phases takes streaming and/or requests, got {args.phases!r}")
    request_rows = [r.strip() for r in args.request_rows.split(",") if r.strip()]
    if set(request_rows) - set(REQUEST_ROWS):
        parser.error(f"unknown request rows {sorted(set(request_rows) - set(REQUEST_ROWS))}")

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if quick else full)

    streams = [int(s) for s in pick(args.streams, "1,32,128", "1,4").split(",") if s.strip()]
    try:
        rates = parse_rates(pick(args.request_rates, "100,200,300,400,500,600,800", "25"))
    except ValueError as exc:
        parser.error(str(exc))
    requests = RateSettings(
        rows=[r for r in REQUEST_ROWS if r in request_rows],
        rates=rates,
        seconds=pick(args.request_seconds, 5.0, 1.0),
        n=args.request_n,
        warmup=3 if quick else 20,
    )
    return Settings(
        rows=[r for r in ALL_ROWS if r in rows],
        streams=sorted(set(streams)),
        rate=args.rate,
        seconds=pick(args.seconds, 10.0, 1.0),
        ramp_s=pick(args.ramp_s, 1.0, 0.1),
        ttft_requests=pick(args.ttft_requests, 20, 5),
        ttft_warmup=1 if quick else 3,
        unbounded_n=pick(args.unbounded_n, 3000, 300),
        unbounded_runs=pick(args.unbounded_runs, 3, 1),
        sidecar_workers=max(1, args.sidecar_workers),
        exo_full=args.exo_full,
        out=args.out,
        quick=quick,
        workdir=args.workdir,
        phases=phases,
        requests=requests,
    )


# ---------------------------------------------------------------------------------------
# Processes


@dataclass
class Serving:
    """What a row's client talks to, which processes to watch, and how to stop them."""

    target: str
    pids: dict[str, int] = field(default_factory=dict)
    stops: list[Callable[[], None]] = field(default_factory=list)
    startup_s: float = 0.0
    flags: list[str] = field(default_factory=list)
    model: str = "bench"

    def stop(self) -> None:
        for stop in reversed(self.stops):
            with contextlib.suppress(Exception):
                stop()


class Skip(Exception):
    """A row that cannot run here, with the reason printed in its place."""


def start_upstream(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.upstream"],
        stdout=subprocess.PIPE,
        stderr=(workdir / "upstream.log").open("w"),
        text=True,
        cwd=REPO,
        env=child_env(),
    )
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        stop_process(process, grace_s=10.0)
        raise RuntimeError(f"upstream did not start: {(workdir / 'upstream.log').read_text()[-2000:]}")
    return process, url


def write_config(path: Path, upstream: str) -> Path:
    """One LiteLLM proxy config.yaml, used unchanged by the proxy and by the sidecar."""
    path.write_text(
        "model_list:\n"
        "  - model_name: bench\n"
        "    litellm_params:\n"
        "      model: openai/bench\n"
        f"      api_base: {upstream}/v1\n"
        f"      api_key: os.environ/{KEY_ENV}\n"
    )
    return path


_sidecar_help: str | None = None


def sidecar_flags_supported() -> str:
    """The sidecar's ``--help`` text: flags are passed only when it lists them, so the suite
    runs before and after ``--workers`` / ``--no-openai-fast-path`` exist."""
    global _sidecar_help
    if _sidecar_help is None:
        result = subprocess.run(
            [sys.executable, "-m", "exo_remote_engine.server", "--help"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=child_env(),
            timeout=120,
        )
        _sidecar_help = result.stdout
    return _sidecar_help


def _has_flag(flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", sidecar_flags_supported()) is not None


def sidecar_args(fast_path: bool, workers: int) -> list[str]:
    args: list[str] = []
    if _has_flag("--workers"):
        args += ["--workers", str(workers)]
    elif workers > 1:
        log(f"the sidecar has no --workers flag yet: running 1 process instead of {workers}")
    if not fast_path:
        if not _has_flag("--no-openai-fast-path"):
            raise Skip("the sidecar has no --no-openai-fast-path flag")
        args.append("--no-openai-fast-path")
    return args


def start_sidecar(workdir: Path, config: Path, name: str, args: list[str], listen: str = "127.0.0.1:0") -> Serving:
    from tests.support.processes import start_sidecar_process

    started = time.monotonic()
    if _has_flag("--state-dir"):  # the spend ledger of a benchmark run stays in its workdir
        args = [*args, "--state-dir", str(workdir / f"{name}-state")]
    sidecar = start_sidecar_process(config, workdir / f"{name}.log", env=child_env(), listen=listen, extra_args=args)
    host = listen.rsplit(":", 1)[0]
    return Serving(
        target=f"{host}:{sidecar.port}",
        pids={"server": sidecar.process.pid},
        stops=[sidecar.stop],
        startup_s=time.monotonic() - started,
        flags=args,
    )


def start_sidecar_hosts(workdir: Path, config: Path) -> Serving:
    """Two one-process sidecars on two loopback addresses, read through one target (a
    comma-separated list), so calls spread over both hosts as a node's would."""
    first = start_sidecar(workdir, config, "sidecar-host-a", sidecar_args(True, 1), listen="127.0.0.2:0")
    try:
        second = start_sidecar(workdir, config, "sidecar-host-b", sidecar_args(True, 1), listen="127.0.0.3:0")
    except BaseException:
        first.stop()
        raise
    return Serving(
        target=f"{first.target},{second.target}",
        pids={"server": first.pids["server"], "server-b": second.pids["server"]},
        stops=[*first.stops, *second.stops],
        startup_s=first.startup_s + second.startup_s,
        flags=first.flags,
    )


def start_proxy(workdir: Path, config: Path) -> Serving:
    from tests.support.processes import free_port

    exe = PROXY_VENV / "bin" / "litellm"
    if not exe.exists():
        raise Skip(f"{exe.relative_to(REPO)} is missing: run scripts/bench.sh, which builds it")
    port = free_port()
    args = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    args += ["--telemetry", "False"]
    started = time.monotonic()
    process = subprocess.Popen(
        args, stdout=(workdir / "proxy.log").open("w"), stderr=subprocess.STDOUT, cwd=workdir, env=child_env()
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the LiteLLM proxy exited:\n{(workdir / 'proxy.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health/liveliness", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        stop_process(process, grace_s=10.0)
        raise RuntimeError("the LiteLLM proxy did not come up within 120 s")
    return Serving(
        target=url,
        pids={"server": process.pid},
        stops=[lambda: stop_process(process, grace_s=10.0)],
        startup_s=time.monotonic() - started,
        flags=args[1:],
    )


def start_exo(workdir: Path, config: Path, settings: Settings) -> Serving:
    from tests.support.processes import exo_skip_reason, free_port, start_exo_node, write_peers

    reason = exo_skip_reason()
    if reason is not None:
        raise Skip(reason)
    sidecar = start_sidecar(workdir, config, "exo-sidecar", sidecar_args(True, settings.sidecar_workers))
    try:
        started = time.monotonic()
        node_port, api_port = free_port(), free_port()
        node = start_exo_node(
            workdir,
            "bench",
            node_port,
            api_port,
            write_peers(workdir / "peers.json", {"bench": node_port}),
            env={"EXO_REMOTE_SIDECAR": sidecar.target, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        )
        sidecar.stops.append(node.stop)
        ids = [m["id"] for m in node.get_json("/v1/models")["data"]]
        model = "bench" if "bench" in ids else next((i for i in ids if i.endswith("bench")), "")
        if not model:
            raise RuntimeError(f"exo does not list the bench model: {ids[:20]}")
    except BaseException:
        sidecar.stop()
        raise
    return Serving(
        target=node.api,
        pids={"server": node.process.pid, "sidecar": sidecar.pids["server"]},
        stops=sidecar.stops,
        startup_s=time.monotonic() - started,
        flags=sidecar.flags,
        model=model,
    )


def start_row(row: str, workdir: Path, config: Path, upstream: str, settings: Settings) -> Serving:
    if row in ("raw", "litellm"):
        return Serving(target=upstream)
    if row == "proxy":
        return start_proxy(workdir, config)
    if row == "sidecar":
        return start_sidecar(workdir, config, row, sidecar_args(True, settings.sidecar_workers))
    if row == "sidecar-litellm":
        return start_sidecar(workdir, config, row, sidecar_args(False, 1))
    if row == "sidecar-hosts":
        return start_sidecar_hosts(workdir, config)
    return start_exo(workdir, config, settings)


# ---------------------------------------------------------------------------------------
# Phases


def run_client(
    row: str,
    serving: Serving,
    upstream: str,
    upstream_pid: int,
    mode: str,
    extra: list[str],
    timeout_s: float,
    workdir: Path,
) -> dict[str, Any]:
    """One phase in a fresh client process; its JSON line, or ``{"ok": False, ...}``."""
    pids = {**serving.pids, "upstream": upstream_pid}
    args = [sys.executable, "-m", "benchmarks.load_client", "--row", row, "--target", serving.target]
    args += ["--mode", mode, "--upstream", upstream, "--model", serving.model]
    args += [f"--pid={role}={pid}" for role, pid in pids.items()] + extra
    with (workdir / f"client-{row}.log").open("a") as err:
        err.write(f"\n$ {' '.join(args)}\n")
        err.flush()
        try:
            result = subprocess.run(
                args, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, env=child_env(), timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"client process still running after {timeout_s:.0f} s"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (workdir / f"client-{row}.log").read_text()[-1500:]
        return {"ok": False, "error": f"client exited {result.returncode} without a result: {tail}"}
    parsed: dict[str, Any] = json.loads(lines[-1])
    return parsed


def run_row(
    row: str, serving: Serving, upstream: str, upstream_pid: int, settings: Settings, workdir: Path
) -> dict[str, Any]:
    def client(mode: str, extra: list[str], timeout_s: float) -> dict[str, Any]:
        result = run_client(row, serving, upstream, upstream_pid, mode, extra, timeout_s, workdir)
        if not result.get("ok"):
            log(f"{row} {mode} failed: {result.get('error')}")
        return result

    out: dict[str, Any] = {"target": serving.target, "flags": serving.flags, "startup_s": serving.startup_s}
    ttft_args = ["--n", "4", "--requests", str(settings.ttft_requests), "--warmup", str(settings.ttft_warmup)]
    out["ttft"] = ttft = client("ttft", ttft_args, 300)
    if ttft.get("ok"):
        q = ttft["ttft_ms"]
        log(f"{row} ttft: p50 {q['p50']:.2f} ms, p99 {q['p99']:.2f} ms, first {ttft['ttft_first_ms']:.1f} ms")
    unb_args = ["--n", str(settings.unbounded_n), "--runs", str(settings.unbounded_runs)]
    out["unbounded"] = unb = client("unbounded", unb_args, 600)
    if unb.get("ok"):
        log(f"{row} unbounded: {unb['tokens_per_s']:,.0f} tok/s, {unb['chars_per_s']:,.0f} chars/s")
    out["load"] = {}
    for k in settings.streams:
        if row == "exo" and k > 32 and not settings.exo_full:
            out["load"][str(k)] = {"ok": False, "skipped": "exo runs up to 32 streams unless --exo-full"}
            continue
        load_args = (
            f"--streams {k} --n {settings.load_n} --rate {settings.rate:g} --ramp-s {settings.ramp_s:g} "
            f"--timeout-s {settings.load_timeout_s():g}"
        ).split()
        out["load"][str(k)] = load = client("load", load_args, settings.load_timeout_s() + 120)
        if load.get("ok"):
            lat, up = load["latency_ms"], load.get("upstream_stats") or {}
            half = load.get("second_half_latency_ms") or {}
            log(
                f"{row} load {k}x{settings.rate:g}/s: p50 {_lat(lat.get('p50'))} ms, p99 {_lat(lat.get('p99'))} ms "
                f"(second half {_lat(half.get('p50'))} / {_lat(half.get('p99'))}), "
                f"{load['tokens_received']}/{load['tokens_expected']} tokens in {load['window_s']:.1f} s; upstream "
                f"{100 * up.get('cpu_fraction', 0):.0f}% CPU, late p99 {up.get('lateness_ms', {}).get('p99', 0):.2f} "
                f"ms; other load on the box {load.get('foreign_cores') or 0:.2f} cores"
            )
    return out


# ---------------------------------------------------------------------------------------
# Summaries, ratios, targets


def _path_cpu(per_token: dict[str, float]) -> float | None:
    """CPU per token of everything on the path except the upstream (client + relay)."""
    values = [v for role, v in per_token.items() if role != "upstream"]
    return sum(values) if values else None


def summarize(row: str, data: dict[str, Any], raw: dict[str, Any] | None) -> dict[str, Any]:
    s: dict[str, Any] = {}
    ttft = data.get("ttft") or {}
    if ttft.get("ok"):
        s.update(
            ttft_p50_ms=ttft["ttft_ms"]["p50"], ttft_p99_ms=ttft["ttft_ms"]["p99"], ttft_first_ms=ttft["ttft_first_ms"]
        )
    unb = data.get("unbounded") or {}
    rss_phases: list[dict[str, Any]] = [p for p in (ttft, unb) if p.get("ok")]
    if unb.get("ok"):
        s["unbounded_foreign_cores"] = unb.get("foreign_cores")
        s.update(
            tokens_per_s=unb["tokens_per_s"],
            chars_per_s=unb["chars_per_s"],
            cpu_us_per_token=unb["cpu_us_per_token"],
            path_cpu_us_per_token=_path_cpu(unb["cpu_us_per_token"]),
        )
    loads: dict[str, Any] = {}
    for k, load in (data.get("load") or {}).items():
        if not load.get("ok"):
            continue
        rss_phases.append(load)
        lat = load["latency_ms"]
        entry = {
            "p50_ms": lat.get("p50"),
            "p99_ms": lat.get("p99"),
            "max_ms": lat.get("max"),
            "second_half_p99_ms": (load.get("second_half_latency_ms") or {}).get("p99"),
            "complete": load["tokens_received"] == load["tokens_expected"] and not load["streams_failed"],
            "tokens_received": load["tokens_received"],
            "tokens_expected": load["tokens_expected"],
            "streams_failed": load["streams_failed"],
            "cpu_us_per_token": load["cpu_us_per_token"],
            "path_cpu_us_per_token": _path_cpu(load["cpu_us_per_token"]),
            "server_peak_rss_sum_mb": (load["rss"].get("server") or {}).get("peak_sum_mb"),
            "server_peak_rss_max_mb": (load["rss"].get("server") or {}).get("peak_max_mb"),
            "upstream_cpu_fraction": (load.get("upstream_stats") or {}).get("cpu_fraction"),
            "upstream_late_p99_ms": ((load.get("upstream_stats") or {}).get("lateness_ms") or {}).get("p99"),
        }
        entry["foreign_cores"] = load.get("foreign_cores")
        base = ((raw or {}).get("load") or {}).get(k) or {}
        entry["added_p50_ms"] = _diff(entry["p50_ms"], base.get("p50_ms"))
        entry["added_p99_ms"] = _diff(entry["p99_ms"], base.get("p99_ms"))
        loads[k] = entry
    s["load"] = loads
    for role in ("server", "sidecar"):
        # A row with several serving processes (sidecar-hosts: "server", "server-b") sums them.
        peaks = [[rss for name, rss in (p.get("rss") or {}).items() if name.split("-")[0] == role] for p in rss_phases]
        peaks = [phase for phase in peaks if phase]
        if peaks:
            s[f"{role}_peak_rss_sum_mb"] = max(sum(r["peak_sum_mb"] for r in phase) for phase in peaks)
            s[f"{role}_peak_rss_max_mb"] = max(max(r["peak_max_mb"] for r in phase) for phase in peaks)
            s[f"{role}_processes"] = max(sum(r["processes"] for r in phase) for phase in peaks)
    clients = [p["client_maxrss_mb"] for p in rss_phases if "client_maxrss_mb" in p]
    if clients:
        s["client_peak_rss_mb"] = max(clients)
    return s


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def compare(summaries: dict[str, dict[str, Any]]) -> None:
    """Ratios against raw (the floor) and litellm (the baseline), stored in each summary."""
    raw, lite = summaries.get("raw") or {}, summaries.get("litellm") or {}
    for s in summaries.values():
        s["vs"] = {
            "ttft_added_p50_ms_vs_litellm": _diff(s.get("ttft_p50_ms"), lite.get("ttft_p50_ms")),
            "ttft_added_p99_ms_vs_litellm": _diff(s.get("ttft_p99_ms"), lite.get("ttft_p99_ms")),
            "path_cpu_ratio_vs_litellm": _ratio(s.get("path_cpu_us_per_token"), lite.get("path_cpu_us_per_token")),
            "tokens_per_s_ratio_vs_raw": _ratio(s.get("tokens_per_s"), raw.get("tokens_per_s")),
            "tokens_per_s_ratio_vs_litellm": _ratio(s.get("tokens_per_s"), lite.get("tokens_per_s")),
        }


def targets(summaries: dict[str, dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    side, lite, proxy, exo = (summaries.get(r) or {} for r in ("sidecar", "litellm", "proxy", "exo"))
    top = str(max(settings.streams))
    mid = "32" if 32 in settings.streams else top
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, ok: bool | None, shown: str) -> None:
        out.append({"target": name, "value": value, "pass": ok, "measured": shown if value is not None else "n/a"})

    def load(s: dict[str, Any], k: str, key: str) -> float | None:
        value = ((s.get("load") or {}).get(k) or {}).get(key)
        return float(value) if value is not None else None

    def diff_ms(a: float | None, b: float | None) -> tuple[float | None, str]:
        v = _diff(a, b)
        return v, f"{a:.2f} vs {b:.2f} ms" if v is not None else ""

    v = _diff(side.get("ttft_p50_ms"), lite.get("ttft_p50_ms"))
    add("TTFT added by sidecar over litellm, p50 <= 1 ms", v, v is not None and v <= 1, f"{v or 0:+.2f} ms")
    v = _diff(side.get("ttft_p99_ms"), lite.get("ttft_p99_ms"))
    add("TTFT added by sidecar over litellm, p99 <= 5 ms", v, v is not None and v <= 5, f"{v or 0:+.2f} ms")
    v = _ratio(side.get("path_cpu_us_per_token"), lite.get("path_cpu_us_per_token"))
    add(
        "sidecar CPU/token (client + sidecar) <= 1.2x litellm, unbounded",
        v,
        v is not None and v <= 1.2,
        f"{v or 0:.2f}x",
    )
    v = _ratio(load(side, mid, "path_cpu_us_per_token"), load(lite, mid, "path_cpu_us_per_token"))
    add(
        f"sidecar CPU/token (client + sidecar) <= 1.2x litellm, {mid} x {settings.rate:g}/s",
        v,
        v is not None and v <= 1.2,
        f"{v or 0:.2f}x",
    )
    v, shown = diff_ms(side.get("ttft_p50_ms"), proxy.get("ttft_p50_ms"))
    add("sidecar better than proxy: TTFT p50", v, v is not None and v < 0, shown)
    a, b = side.get("path_cpu_us_per_token"), proxy.get("path_cpu_us_per_token")
    v = _diff(a, b)
    add(
        "sidecar better than proxy: CPU/token (client + relay), unbounded",
        v,
        v is not None and v < 0,
        f"{a or 0:.0f} vs {b or 0:.0f} us",
    )
    side_top = (side.get("load") or {}).get(top)
    proxy_top = (proxy.get("load") or {}).get(top)
    name = f"sidecar better than proxy: {top}-stream p99 delivery latency"
    if side_top and proxy_top:
        a, b = side_top["p99_ms"], proxy_top["p99_ms"]
        ok = a is not None and (b is None or a < b)
        out.append({"target": name, "value": _diff(a, b), "pass": ok, "measured": f"{_lat(a)} vs {_lat(b)} ms"})
    else:
        add(name, None, None, "")
    name = f"{top} x {settings.rate:g}/s p99 added by sidecar over raw <= 5 ms"
    if side_top and side_top.get("p99_ms") is None:
        out.append({"target": name, "value": None, "pass": False, "measured": "saturated (tokens not delivered)"})
    else:
        v = load(side, top, "added_p99_ms")
        add(name, v, v is not None and v <= 5, f"{v or 0:+.2f} ms")
    hosts_top = ((summaries.get("sidecar-hosts") or {}).get("load") or {}).get(top)
    name = f"{top} x {settings.rate:g}/s p99 added by two sidecar processes (sidecar-hosts) over raw <= 5 ms"
    if hosts_top and hosts_top.get("p99_ms") is None:
        out.append({"target": name, "value": None, "pass": False, "measured": "saturated (tokens not delivered)"})
    else:
        v = (hosts_top or {}).get("added_p99_ms")
        add(name, v, v is not None and v <= 5, f"{v or 0:+.2f} ms")
    v = exo.get("chars_per_s")
    add("exo >= 2000 chars/s, single stream", v, v is not None and v >= 2000, f"{v or 0:,.0f} chars/s")
    v = load(side, top, "server_peak_rss_max_mb")
    add(
        f"sidecar peak RSS after {top} streams <= 300 MB per process", v, v is not None and v <= 300, f"{v or 0:.0f} MB"
    )
    for t in out:
        if t["measured"] == "n/a":
            t["pass"] = None
    return out


# ---------------------------------------------------------------------------------------
# Output


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}" if abs(value) < 100 else f"{value:+,.0f}"


def _lat(value: float | None) -> str:
    """A latency percentile; None means undelivered tokens reach it (saturated)."""
    return "sat." if value is None else f"{value:.2f}" if value < 100 else f"{value:,.0f}"


def table(results: dict[str, Any], summaries: dict[str, dict[str, Any]], settings: Settings) -> str:
    ks = [str(k) for k in settings.streams]
    head = ["row", "TTFT p50/p99/first ms", "tok/s", "chars/s", "CPU µs/tok client/relay/upstream", "path µs/tok"]
    head += [f"@{k} p50/p99 ms (+raw)" for k in ks] + ["RSS MB relay sum/max, client"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, data in results.items():
        if data.get("status") != "ok":
            lines.append(f"| {row} | {data.get('status')}: {data.get('reason')} |" + " |" * (len(head) - 2))
            continue
        s = summaries[row]
        cpu = s.get("cpu_us_per_token") or {}
        relay = [v for r, v in cpu.items() if r not in ("client", "upstream")]
        cells = [
            row,
            f"{_f(s.get('ttft_p50_ms'))} / {_f(s.get('ttft_p99_ms'))} / {_f(s.get('ttft_first_ms'), '{:.1f}')}",
            _f(s.get("tokens_per_s"), "{:,.0f}"),
            _f(s.get("chars_per_s"), "{:,.0f}"),
            f"{_f(cpu.get('client'), '{:.0f}')} / {'+'.join(f'{r:.0f}' for r in relay) or '—'} / "
            f"{_f(cpu.get('upstream'), '{:.0f}')}",
            _f(s.get("path_cpu_us_per_token"), "{:.0f}"),
        ]
        for k in ks:
            entry = (s.get("load") or {}).get(k)
            if not entry:
                cells.append("—")
                continue
            mark = ""
            if entry["tokens_received"] < entry["tokens_expected"]:
                mark = f" ⚠{entry['tokens_received']}/{entry['tokens_expected']} tokens"
            elif not entry["complete"]:
                mark = f" ⚠{entry['streams_failed']} streams unfinished"
            if row == "raw":
                cells.append(f"{_lat(entry['p50_ms'])} / {_lat(entry['p99_ms'])} (floor){mark}")
            else:
                added = ""
                if entry.get("added_p99_ms") is not None:
                    added = f" ({_signed(entry.get('added_p50_ms'))} / {_signed(entry['added_p99_ms'])})"
                cells.append(f"{_lat(entry['p50_ms'])} / {_lat(entry['p99_ms'])}{added}{mark}")
        rss = "—"
        if "server_peak_rss_sum_mb" in s:
            rss = f"{s['server_peak_rss_sum_mb']:.0f}/{s['server_peak_rss_max_mb']:.0f}"
            if "sidecar_peak_rss_sum_mb" in s:
                rss += f" (+sidecar {s['sidecar_peak_rss_sum_mb']:.0f})"
        rss += f", {_f(s.get('client_peak_rss_mb'), '{:.0f}')}"
        cells.append(rss)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(results: dict[str, Any], summaries: dict[str, dict[str, Any]], settings: Settings) -> str:
    ks = [str(k) for k in settings.streams]
    head = ["row", "TTFT +ms vs litellm p50/p99", "path CPU/tok x litellm", "tok/s x raw", "tok/s x litellm"]
    head += [f"path CPU µs/tok @{k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, data in results.items():
        if data.get("status") != "ok":
            continue
        s, vs = summaries[row], summaries[row]["vs"]
        cells = [
            row,
            _f(vs["ttft_added_p50_ms_vs_litellm"], "{:+.2f}")
            + " / "
            + _f(vs["ttft_added_p99_ms_vs_litellm"], "{:+.2f}"),
            _f(vs["path_cpu_ratio_vs_litellm"], "{:.2f}"),
            _f(vs["tokens_per_s_ratio_vs_raw"], "{:.3f}"),
            _f(vs["tokens_per_s_ratio_vs_litellm"], "{:.2f}"),
        ]
        for k in ks:
            entry = (s.get("load") or {}).get(k) or {}
            cpu = entry.get("cpu_us_per_token") or {}
            relay = "+".join(f"{v:.0f}" for r, v in cpu.items() if r not in ("client", "upstream"))
            shown = _f(entry.get("path_cpu_us_per_token"), "{:.0f}")
            if entry:
                shown += f" ({cpu.get('client', 0):.0f}{'+' + relay if relay else ''})"
            cells.append(shown)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        ),
        0,
    )
    proxy_version = None
    found = sorted((PROXY_VENV / "lib").glob("python*/site-packages/litellm-*.dist-info"))
    if found:
        proxy_version = found[0].name.removeprefix("litellm-").removesuffix(".dist-info")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO).stdout)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "litellm": version("litellm"),
        "litellm_proxy_venv": proxy_version,
        "grpcio": version("grpcio"),
        "aiohttp": version("aiohttp"),
        "openai": version("openai"),
        "git_commit": commit + ("-dirty" if dirty else ""),
        "exo_src": os.environ.get("EXO_SRC") or None,
    }


@contextlib.contextmanager
def upstream_process(workdir: Path) -> Iterator[tuple[str, int]]:
    process, url = start_upstream(workdir)
    try:
        yield url, process.pid
    finally:
        stop_process(process, grace_s=10.0)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="exo-bench-suite-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"rows {','.join(settings.rows)}; logs in {workdir}")
    results: dict[str, Any] = {}
    with upstream_process(workdir) as (upstream, upstream_pid):
        config = write_config(workdir / "config.yaml", upstream)
        for row in settings.rows if "streaming" in settings.phases else ():
            row_started = time.monotonic()
            try:
                serving = start_row(row, workdir, config, upstream, settings)
            except Skip as exc:
                log(f"{row}: skipped: {exc}")
                results[row] = {"status": "skipped", "reason": str(exc)}
                continue
            except Exception as exc:
                log(f"{row}: could not start: {exc}")
                results[row] = {"status": "failed", "reason": f"could not start: {str(exc)[:2000]}"}
                continue
            log(f"{row}: serving at {serving.target} (ready in {serving.startup_s:.1f} s)")
            try:
                data = run_row(row, serving, upstream, upstream_pid, settings, workdir)
            finally:
                stopping = time.monotonic()
                serving.stop()
            data["stop_s"] = time.monotonic() - stopping
            failed = [m for m in ("ttft", "unbounded") if not data[m].get("ok")]
            failed += [f"load {k}" for k, v in data["load"].items() if not v.get("ok") and not v.get("skipped")]
            phases = [data["ttft"], data["unbounded"], *data["load"].values()]
            data["status"] = "ok" if any(p.get("ok") for p in phases) else "failed"
            if failed:
                data["reason"] = "failed phases: " + ", ".join(failed)
            data["seconds"] = time.monotonic() - row_started
            results[row] = data
        request_rate = None
        if "requests" in settings.phases:
            request_rate = run_request_sweep(settings.requests, workdir, config, upstream, upstream_pid)
    raw_summary: dict[str, Any] | None = None
    summaries: dict[str, dict[str, Any]] = {}
    for row, data in results.items():
        if data.get("status") == "ok":
            summaries[row] = summarize(row, data, raw_summary)
            if row == "raw":
                raw_summary = summaries[row]
    compare(summaries)
    checks = targets(summaries, settings) if results else []
    if request_rate is not None:
        checks += request_targets(request_rate)
    machine = machine_info()
    foreign = [
        (row, k, e["foreign_cores"])
        for row, s in summaries.items()
        for k, e in [*(s.get("load") or {}).items(), ("unbounded", {"foreign_cores": s.get("unbounded_foreign_cores")})]
        if e.get("foreign_cores") is not None
    ]
    for row, data in ((request_rate or {}).get("rows") or {}).items():
        for step in data.get("steps") or ():
            cores = step["result"].get("foreign_cores")
            if cores is not None:
                foreign.append((f"requests {row}", f"{step['rate']:g}/s", cores))
    worst_foreign = max(foreign, key=lambda f: f[2]) if foreign else None
    clean = worst_foreign is None or worst_foreign[2] < FOREIGN_LIMIT_CORES
    report = {
        "machine": machine,
        # False when other processes used more than FOREIGN_LIMIT_CORES during some phase.
        "clean": clean,
        "max_foreign_cores": worst_foreign[2] if worst_foreign else None,
        "settings": {
            k: (str(v) if isinstance(v, Path) else vars(v) if isinstance(v, RateSettings) else v)
            for k, v in vars(settings).items()
        },
        "load_n": settings.load_n,
        "seconds_total": time.monotonic() - started,
        "workdir": str(workdir),
        "summary": summaries,
        "targets": checks,
        "rows": results,
        "request_rate": request_rate,
    }
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(json.dumps(report, indent=2))
    print(
        f"\n{machine['cpu_model']}, {machine['cores']} cores, {machine['ram_gb']} GB, Python {machine['python']}, "
        f"litellm {machine['litellm']}, grpcio {machine['grpcio']}; upstream on 127.0.0.1\n"
        f"TTFT: {settings.ttft_requests} warm sequential requests; unbounded: {settings.unbounded_n} tokens, median of "
        f"{settings.unbounded_runs}; load: K streams x {settings.rate:g} tokens/s x {settings.seconds:g} s "
        f"(starts over {settings.ramp_s:g} s), latency = receive - upstream send stamp, +raw = minus the raw row.\n"
        "CPU µs/token: client / relay (proxy, sidecar tree, or exo+sidecar) / upstream, unbounded phase; "
        "path = client + relay.\n"
    )
    if results:
        print(table(results, summaries, settings))
        print()
        print(ratio_table(results, summaries, settings))
    if request_rate is not None:
        r = settings.requests
        print(
            f"\nRequest rate: short requests of {r.n} chunks, open-loop arrivals at "
            f"{', '.join(f'{x:g}' for x in r.rates)}/s for {r.seconds:g} s each, latency from the scheduled start; "
            "CPU per request from /proc and getrusage (on a shared box compare the ratios, measured in this one run)\n"
        )
        print(request_table(request_rate))
    uppers = [
        (row, k, e.get("upstream_cpu_fraction"), e.get("upstream_late_p99_ms"))
        for row, s in summaries.items()
        for k, e in (s.get("load") or {}).items()
    ]
    if uppers:
        worst_cpu = max(uppers, key=lambda u: u[2] or 0)
        worst_late = max(uppers, key=lambda u: u[3] or 0)
        print(
            f"\nupstream: at most {100 * (worst_cpu[2] or 0):.0f}% of a core ({worst_cpu[0]} @{worst_cpu[1]}); "
            f"chunks written at most {worst_late[3] or 0:.2f} ms late at p99 ({worst_late[0]} @{worst_late[1]})"
        )
    if worst_foreign is not None:
        row, k, worst = worst_foreign
        verdict = "clean" if clean else "NOT clean: other processes competed for the cores, rerun on a quiet box"
        print(f"other load on the box: at most {worst:.2f} cores ({row} @{k}): {verdict}")
    print("\nTargets:" if clean else "\nTargets (? = measured on a busy box, not to be trusted):")
    for t in checks:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["pass"]]
        if not clean and t["pass"] is not None:
            verdict += "?"
        print(f"  {verdict:5} {t['target']}: {t['measured']}")
    print(f"\nwrote {settings.out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
