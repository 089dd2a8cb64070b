"""Soak: a sidecar under mixed load for a long time keeps its memory and descriptors flat.

``python -m benchmarks.soak [--minutes 30] [--rps 40]`` starts the benchmark upstream and
one sidecar (default flags: accounting, limits, INFO logging), then drives it from this
process with the engine's own client: short streamed requests (open-loop, ``--rps``),
long paced streams kept at ``--streams`` concurrent, streams cancelled by the client after
their first chunk, and requests for a model whose provider is down (connection refused:
the provider-error path). Every ``--sample-s`` it records the sidecar's RSS and open file
descriptors (/proc). Warm-up is the first fifth of the run (at least one sample); the
verdict compares the last quarter's median with the median just after warm-up: at most
``--max-growth`` (5%) growth in each (descriptors: or ``--fd-slack``, 8), and the ledger holds one row per finished or
cancelled-after-output request (failed ones before any output are not charged). Writes
JSON (``bench-results/soak.json``) and exits 1 when the verdict fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.load_client import _status_kb
from benchmarks.suite import REPO, log, start_sidecar, start_upstream, write_config
from tests.support.processes import free_port, stop_process


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _request(pb: Any, model: str, prompt: str, request_id: str) -> Any:
    return pb.GenerateRequest(
        request_id=request_id,
        model=model,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=prompt)])],
    )


async def drive(target: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    from exo_remote_engine.contract.errors import RemoteError
    from exo_remote_engine.engine.connection.client import SidecarClient
    from exo_remote_engine.engine.connection.target import RetryPolicy, SidecarTarget
    from exo_remote_engine.generated import remote_inference_pb2 as pb

    client = SidecarClient(SidecarTarget(address=target, retry=RetryPolicy(attempts=1)))
    counts = {"short": 0, "stream": 0, "cancelled": 0, "provider_error": 0, "unexpected": 0}
    errors: list[str] = []
    end = time.monotonic() + args.minutes * 60
    seq = iter(range(10**9))
    tasks: set[asyncio.Task[None]] = set()

    async def one(kind: str) -> None:
        i = next(seq)
        model, prompt = "bench", "bench n=8 rate=0"
        if kind == "stream":
            prompt = f"bench n={args.stream_chunks} rate=20"
        elif kind == "provider_error":
            model = "down"
        try:
            async for _ in client.generate(_request(pb, model, prompt, f"soak-{kind}-{i}")):
                if kind == "cancelled":
                    break  # the client goes away after the first chunk
            counts[kind] += 1
        except RemoteError as exc:
            if kind == "provider_error":
                counts[kind] += 1
            else:
                counts["unexpected"] += 1
                errors.append(f"{kind}: {exc.reason.value}: {exc.message[:200]}")

    def spawn(kind: str) -> None:
        task = asyncio.ensure_future(one(kind))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def sampler(samples: list[dict[str, float]]) -> None:
        started = time.monotonic()
        while time.monotonic() < end:
            samples.append(
                {"t_s": time.monotonic() - started, "rss_mb": _status_kb(pid, "VmRSS") / 1024, "fds": _fds(pid)}
            )
            await asyncio.sleep(args.sample_s)

    samples: list[dict[str, float]] = []
    sampling = asyncio.ensure_future(sampler(samples))
    rng = random.Random(23)
    next_at = time.monotonic()
    streams: set[asyncio.Task[None]] = set()
    while time.monotonic() < end:
        now = time.monotonic()
        while next_at <= now:  # open-loop arrivals on an absolute schedule
            roll = rng.random()
            spawn("cancelled" if roll < 0.05 else "provider_error" if roll < 0.10 else "short")
            next_at += 1 / args.rps
        while len(streams) < args.streams:
            task = asyncio.ensure_future(one("stream"))
            streams.add(task)
            task.add_done_callback(streams.discard)
        await asyncio.sleep(max(0.0, min(next_at - time.monotonic(), 0.05)))
    pending = [*tasks, *streams]
    if pending:
        await asyncio.wait(pending, timeout=60)
    await sampling
    await client.close()
    return {"counts": counts, "errors": sorted(set(errors))[:10], "samples": samples}


def verdict(samples: list[dict[str, float]], max_growth: float, fd_slack: int) -> dict[str, Any]:
    """Median of the samples just after warm-up against the last quarter's median. Open
    descriptors may also grow by ``fd_slack``: the pool of upstream connections follows
    the load of the moment, and on a base of ~45 two more are already 4%."""
    if len(samples) < 4:
        return {"pass": None, "reason": "too few samples (run longer or sample more often)"}
    warm = max(1, len(samples) // 5)
    after = samples[warm : warm + max(1, len(samples) // 4)]
    last = samples[-max(1, len(samples) // 4) :]
    out: dict[str, Any] = {}
    ok = True
    for key in ("rss_mb", "fds"):
        base = statistics.median(s[key] for s in after)
        tail = statistics.median(s[key] for s in last)
        growth = (tail - base) / base if base else 0.0
        out[key] = {"after_warmup": base, "last_quarter": tail, "growth": growth}
        ok = ok and (growth <= max_growth or (key == "fds" and tail - base <= fd_slack))
    out["pass"] = ok
    return out


def ledger_rows(state_dir: Path) -> int | None:
    from exo_remote_engine.sidecar.ledger.spend import DB_NAME

    path = state_dir / DB_NAME
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rps", type=float, default=40.0, help="short requests (and cancels, errors) per second")
    parser.add_argument("--streams", type=int, default=16, help="long paced streams kept open")
    parser.add_argument("--stream-chunks", type=int, default=200, help="chunks per long stream (20/s)")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--max-growth", type=float, default=0.05, help="RSS and fds, after warm-up")
    parser.add_argument("--fd-slack", type=int, default=8, help="descriptors that may come on top of --max-growth")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "soak.json")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="exo-bench-soak-"))
    upstream_process, upstream = start_upstream(workdir)
    try:
        config = write_config(workdir / "config.yaml", upstream)
        dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: connection refused
        with config.open("a") as f:
            f.write(f"  - model_name: down\n    litellm_params:\n      model: openai/down\n      api_base: {dead}\n")
            f.write("      api_key: os.environ/BENCH_UPSTREAM_KEY\n")
        serving = start_sidecar(workdir, config, "soak", [])
        try:
            log(f"soak: {args.minutes:g} min against {serving.target}; logs in {workdir}")
            result = asyncio.run(drive(serving.target, serving.pids["server"], args))
        finally:
            serving.stop()
    finally:
        stop_process(upstream_process, grace_s=10.0)
    result["verdict"] = verdict(result["samples"], args.max_growth, args.fd_slack)
    counts = result["counts"]
    rows = ledger_rows(workdir / "soak-state")
    charged = counts["short"] + counts["stream"]
    result["ledger"] = {"rows": rows, "completed_requests": charged, "cancelled_after_output": counts["cancelled"]}
    # Every completed request is one row; a cancel after its first chunk is one more at most.
    ledger_ok = rows is None or charged <= rows <= charged + counts["cancelled"]
    result["ledger"]["as_expected"] = ledger_ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {**vars(args), "out": str(args.out)}, **result}, indent=2))
    v = result["verdict"]
    print(f"requests: {counts}; unexpected errors: {result['errors'] or 'none'}")
    for key in ("rss_mb", "fds"):
        if key in v:
            e = v[key]
            print(
                f"{key}: {e['after_warmup']:.1f} after warm-up -> {e['last_quarter']:.1f} ({100 * e['growth']:+.1f}%)"
            )
    print(f"ledger rows {rows} for {charged} completed (+ up to {counts['cancelled']} cancelled after output)")
    passed = v.get("pass") is not False and ledger_ok and not counts["unexpected"]
    print(f"soak: {'PASS' if passed else 'FAIL'} (growth limit {100 * args.max_growth:g}%); wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
