"""One phase of one benchmark row, in a fresh process, printed as one JSON line.

``python -m benchmarks.load_client --row ROW --target T --mode ttft|unbounded|load|requests ...``

Each phase runs in its own process so that its CPU time (``getrusage``) and peak RSS
(``ru_maxrss``) are its own, and so that one row's event loop (LiteLLM's, say, with its
large heap and GC pauses) cannot disturb another's. The process also samples the CPU time
and RSS of the serving processes it is told about (``--pid ROLE=PID``, whole process
trees, from /proc) exactly at the edges of its measurement window.

Readers, one per row kind (all yield ``(receive monotonic_ns, text)`` per received piece):
``raw`` and ``proxy`` read OpenAI SSE with aiohttp; ``litellm`` calls
``litellm.acompletion(stream=True)`` in this process; ``sidecar`` reads the sidecar with the
engine's own gRPC ``SidecarClient``; ``exo`` reads exo's ChatGPT API with the openai SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import resource
import statistics
import sys
import time
import traceback
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

STAMP_RE = re.compile(r"<([0-9a-f]+)>")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
ROW_KINDS = {
    "raw": "http",
    "proxy": "http",
    "litellm": "litellm",
    "sidecar": "sidecar",
    "sidecar-litellm": "sidecar",
    "sidecar-hosts": "sidecar",
    "grpc-bare": "grpc-bare",
    "exo": "exo",
}


# ---------------------------------------------------------------------------------------
# /proc: CPU time and peak RSS of whole process trees (the sidecar's workers, exo's helpers)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of the tree, plus reaped children's (cutime+cstime), so a worker that
    exits inside the window is still counted once."""
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            total += sum(int(v) for v in fields[11:15])
    return total / _CLK_TCK


def tree_cpu_by_process(root: int) -> dict[int, float]:
    out = {}
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            out[pid] = sum(int(v) for v in fields[11:15]) / _CLK_TCK
    return out


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(root: int) -> dict[str, Any]:
    """Peak (VmHWM) and current RSS of every process of the tree: the sum and the largest."""
    pids = [p for p in process_tree(root) if _status_kb(p, "VmHWM") > 0]
    hwm = [_status_kb(p, "VmHWM") / 1024 for p in pids]
    rss = [_status_kb(p, "VmRSS") / 1024 for p in pids]
    return {
        "processes": len(pids),
        "peak_sum_mb": sum(hwm),
        "peak_max_mb": max(hwm, default=0.0),
        "rss_sum_mb": sum(rss),
    }


def all_cpu_ticks() -> dict[int, int]:
    """utime+stime+cutime+cstime of every process on the machine, in clock ticks."""
    ticks = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None:
                ticks[int(name)] = sum(int(v) for v in fields[11:15])
    return ticks


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Window:
    """CPU of this process and of the watched trees between start() and stop()."""

    pids: dict[str, int]
    upstream: str | None
    cpu: dict[str, float] = field(default_factory=dict)
    upstream_stats: dict[str, Any] | None = None

    def _ours(self) -> set[int]:
        return {os.getpid(), *(p for root in self.pids.values() for p in process_tree(root))}

    def _trees(self) -> dict[str, float]:
        self._by_process = {role: tree_cpu_by_process(pid) for role, pid in self.pids.items()}
        return {role: sum(cpu.values()) for role, cpu in self._by_process.items()}

    def start(self) -> None:
        # Scanning /proc costs this process milliseconds: done outside its own reading.
        if self.upstream:
            _get_json(f"{self.upstream}/stats?reset=1")
        self._others = all_cpu_ticks()
        self._ours_start = self._ours()
        self._trees_start = self._trees()
        self._by_process_start = self._by_process
        self._client_start = self_cpu_seconds()
        self._t0 = time.monotonic()

    def stop(self) -> None:
        client = self_cpu_seconds() - self._client_start
        self.wall_s = time.monotonic() - self._t0
        trees = self._trees()
        self.cpu = {"client": client, **{role: trees[role] - self._trees_start[role] for role in trees}}
        # Per process of multi-process trees (sidecar workers): shows how evenly they share.
        self.cpu_by_process = {
            role: {str(pid): t - self._by_process_start[role].get(pid, 0.0) for pid, t in cpu.items()}
            for role, cpu in self._by_process.items()
            if len(cpu) > 1
        }
        ours = self._ours_start | self._ours()
        others = all_cpu_ticks()
        # Totals, not per-pid deltas: a process that exits inside the window leaves the end
        # snapshot, and its whole CPU time reappears in its parent's cutime.
        foreign = sum(t for pid, t in others.items() if pid not in ours)
        foreign -= sum(t for pid, t in self._others.items() if pid not in ours)
        self.foreign_s = max(0, foreign) / _CLK_TCK
        if self.upstream:
            self.upstream_stats = _get_json(f"{self.upstream}/stats")

    def report(self, tokens: int) -> dict[str, Any]:
        per_token = {role: s / tokens * 1e6 for role, s in self.cpu.items()} if tokens else {}
        return {
            "window_s": self.wall_s,
            "tokens": tokens,
            "cpu_s": self.cpu,
            "cpu_us_per_token": per_token,
            "cpu_fraction": {role: s / self.wall_s for role, s in self.cpu.items()} if self.wall_s else {},
            "cpu_s_by_process": self.cpu_by_process,
            # CPU of every other process on the box (a concurrent test run, say) competing
            # for the same cores during the window. Near 0 is a clean measurement. Not
            # given for windows under 1 s, where 10 ms clock ticks make it noise.
            "foreign_cores": self.foreign_s / self.wall_s if self.wall_s >= 1.0 else None,
            "upstream_stats": self.upstream_stats,
        }


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - 127.0.0.1 only
        return json.loads(response.read())


# ---------------------------------------------------------------------------------------
# Readers

Pieces = AsyncIterator[tuple[int, str]]


class Reader:
    """Streams one chat completion; yields (receive time in monotonic ns, text) per piece."""

    async def open(self) -> None:
        pass

    def stream(self, prompt: str, request_id: str) -> Pieces:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class HTTPReader(Reader):
    """OpenAI SSE over aiohttp: the raw upstream (the physical floor) or the LiteLLM proxy."""

    def __init__(self, base: str, model: str) -> None:
        self.url = base.rstrip("/") + "/v1/chat/completions"
        self.model = model

    async def open(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None, sock_read=600)
        )

    async def stream(self, prompt: str, request_id: str) -> Pieces:
        body = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}],
        }
        async with self.session.post(self.url, json=body, headers={"x-request-id": request_id}) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
            pending = b""
            done = False
            async for block in response.content.iter_any():
                if done:
                    continue  # the chunked terminator: read it so the connection is reused
                received = time.monotonic_ns()
                lines = (pending + block).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise RuntimeError(f"stream error: {str(chunk['error'])[:300]}")
                    choices = chunk.get("choices")
                    if choices:
                        text = (choices[0].get("delta") or {}).get("content")
                        if text:
                            yield received, text

    async def close(self) -> None:
        await self.session.close()


class LiteLLMReader(Reader):
    """``litellm.acompletion(stream=True)`` in this process: the baseline."""

    def __init__(self, base: str) -> None:
        import litellm

        self.litellm = litellm
        self.api_base = base.rstrip("/") + "/v1"

    async def stream(self, prompt: str, request_id: str) -> Pieces:
        stream = await self.litellm.acompletion(
            model="openai/bench",
            api_base=self.api_base,
            api_key="bench",
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": prompt}],
            num_retries=0,
        )
        try:
            async for chunk in stream:
                if chunk.choices:
                    text = chunk.choices[0].delta.content
                    if text:
                        yield time.monotonic_ns(), text
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # noqa: S110 - closing a finished stream: nothing to report
                    pass
                except asyncio.CancelledError:
                    # LiteLLM's close can surface a CancelledError of its own; re-raise
                    # only a cancellation aimed at this task.
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise


class SidecarReader(Reader):
    """The engine's own gRPC client, as an exo node reads the sidecar."""

    def __init__(self, address: str) -> None:
        from exo_remote_engine.contract.addresses import sidecar_target
        from exo_remote_engine.engine.connection.client import SidecarClient
        from exo_remote_engine.engine.connection.target import SidecarTarget
        from exo_remote_engine.generated import remote_inference_pb2 as pb

        self.pb = pb
        # As EXO_REMOTE_SIDECAR is read: a host list becomes gRPC's ipv4: address list.
        self.client = SidecarClient(SidecarTarget(address=sidecar_target(address).target))

    async def stream(self, prompt: str, request_id: str) -> Pieces:
        pb = self.pb
        request = pb.GenerateRequest(
            request_id=request_id,
            model="bench",
            messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=prompt)])],
        )
        async for event in self.client.generate(request):
            text = event.delta.text
            if text:
                yield time.monotonic_ns(), text

    async def close(self) -> None:
        await self.client.close()


class BareGrpcReader(SidecarReader):
    """The sidecar read with a bare generated stub on one channel: no retry, no channel
    rotation, no error mapping. Not a row of the suite: the floor the engine's client is
    measured against when profiling it (``--row grpc-bare``)."""

    async def stream(self, prompt: str, request_id: str) -> Pieces:
        pb = self.pb
        if not hasattr(self, "stub"):
            from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc

            self.stub = pb_grpc.RemoteInferenceServiceStub(self.client.target.aio_channel())
        request = pb.GenerateRequest(
            request_id=request_id,
            model="bench",
            messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=prompt)])],
        )
        async for event in self.stub.Generate(request, timeout=900.0):
            text = event.delta.text
            if text:
                yield time.monotonic_ns(), text


class ExoReader(Reader):
    """exo's ChatGPT API with the openai SDK, as an exo user reads it."""

    def __init__(self, base: str, model: str) -> None:
        import openai

        self.model = model
        base_url = base.rstrip("/") + "/v1"
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

    async def stream(self, prompt: str, request_id: str) -> Pieces:
        stream = await self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], stream=True
        )
        try:
            async for chunk in stream:
                if chunk.choices:
                    text = chunk.choices[0].delta.content
                    if text:
                        yield time.monotonic_ns(), text
        finally:
            await stream.close()

    async def close(self) -> None:
        await self.client.close()


def make_reader(row: str, target: str, model: str = "bench") -> Reader:
    kind = ROW_KINDS[row]
    if kind == "http":
        return HTTPReader(target, model)
    if kind == "litellm":
        return LiteLLMReader(target)
    if kind == "sidecar":
        return SidecarReader(target)
    if kind == "grpc-bare":
        return BareGrpcReader(target)
    return ExoReader(target, model)


# ---------------------------------------------------------------------------------------
# Phases


def quantiles(values: Iterable[float], missing: int = 0) -> dict[str, Any]:
    """Percentiles; ``missing`` values (tokens never delivered) count as infinitely late,
    so a percentile they reach is None (saturated) rather than a flattering number."""
    data = sorted(values)
    total = len(data) + missing
    if not total:
        return {"count": 0}

    def q(p: float) -> float | None:
        i = min(total - 1, int(p * total))
        return data[i] if i < len(data) else None

    return {
        "count": len(data),
        "missing": missing,
        "p50": q(0.50),
        "p90": q(0.90),
        "p99": q(0.99),
        "p999": q(0.999),
        "max": data[-1] if data and not missing else None,
        "max_delivered": data[-1] if data else None,
        "mean_delivered": statistics.fmean(data) if data else None,
    }


class Stamps:
    """Send stamps out of streamed text. A relay may merge pieces (several stamps in one)
    or split them (exo delivers one codec id, ~4 characters, at a time): a stamp counts as
    delivered when its closing ``>`` arrives."""

    def __init__(self) -> None:
        self.carry = ""

    def feed(self, text: str) -> list[int]:
        if self.carry:
            text = self.carry + text
        found = [int(h, 16) for h in STAMP_RE.findall(text)] if ">" in text else []
        start = text.rfind("<")
        self.carry = text[start:] if start > text.rfind(">") and len(text) - start < 40 else ""
        return found


async def _ttft_once(reader: Reader, prompt: str, request_id: str) -> tuple[float, float | None]:
    """Request issue -> first content received (ms), and the response leg of the first
    token (upstream send stamp -> its delivery)."""
    issued = time.monotonic_ns()
    ttft: float | None = None
    leg: float | None = None
    stamps = Stamps()
    async for received, text in reader.stream(prompt, request_id):
        if ttft is None:
            ttft = (received - issued) / 1e6
        if leg is None:
            found = stamps.feed(text)
            if found:
                leg = (received - found[0]) / 1e6
    if ttft is None:
        raise RuntimeError("stream ended without content")
    return ttft, leg


async def phase_ttft(reader: Reader, args: argparse.Namespace) -> dict[str, Any]:
    prompt = f"bench n={args.n} rate=0"
    first, first_leg = await _ttft_once(reader, prompt, "ttft-first")
    for i in range(args.warmup):
        await _ttft_once(reader, prompt, f"ttft-warm-{i}")
    samples, legs = [], []
    for i in range(args.requests):
        ttft, leg = await _ttft_once(reader, prompt, f"ttft-{i}")
        samples.append(ttft)
        if leg is not None:
            legs.append(leg)
    return {
        "ttft_first_ms": first,
        "ttft_first_response_leg_ms": first_leg,
        "ttft_ms": quantiles(samples),
        "response_leg_ms": quantiles(legs),
        "samples_ms": samples,
    }


async def phase_unbounded(reader: Reader, args: argparse.Namespace, window: Window) -> dict[str, Any]:
    async def once(prompt: str, request_id: str) -> tuple[float, int, int]:
        started = time.monotonic_ns()
        chars = pieces = 0
        async for _, text in reader.stream(prompt, request_id):
            chars += len(text)
            pieces += 1
        return (time.monotonic_ns() - started) / 1e9, chars, pieces

    await once(f"bench n={min(args.n, 200)} rate=0", "unbounded-warm")
    window.start()
    runs = [await once(f"bench n={args.n} rate=0", f"unbounded-{i}") for i in range(args.runs)]
    window.stop()
    tokens_per_s = [args.n / elapsed for elapsed, _, _ in runs]
    chars_per_s = [chars / elapsed for elapsed, chars, _ in runs]
    return {
        "n": args.n,
        "runs": [{"seconds": e, "chars": c, "pieces": p} for e, c, p in runs],
        "tokens_per_s": statistics.median(tokens_per_s),
        "chars_per_s": statistics.median(chars_per_s),
        **window.report(args.n * args.runs),
    }


@dataclass
class StreamResult:
    latencies_ms: list[float] = field(default_factory=list)
    received_at: list[int] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None
    done: bool = False


async def phase_load(reader: Reader, args: argparse.Namespace, window: Window) -> dict[str, Any]:
    """K streams of n stamped chunks at ``rate``/s each; stream k starts k/K of the ramp in."""
    k_streams, prompt = args.streams, f"bench n={args.n} rate={args.rate:g}"
    results = [StreamResult() for _ in range(k_streams)]
    ramp_s = args.ramp_s if k_streams > 1 else 0.0

    async def one(k: int, start_at: float) -> None:
        result = results[k]
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        stamps = Stamps()
        try:
            async for received, text in reader.stream(prompt, f"load-{k}"):
                for sent in stamps.feed(text):
                    result.latencies_ms.append((received - sent) / 1e6)
                    result.received_at.append(received)
                    result.tokens += 1
            result.done = True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                result.error = "timed out"
                raise
            # A library cancelled something of its own and let it escape: not a timeout.
            result.error = "CancelledError escaped the stream"
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {str(exc)[:200]}"

    # A fresh process pays first-call costs (LiteLLM's are ~0.5-0.8 s): not in the window.
    for i in range(args.warmup):
        async for _ in reader.stream("bench n=4 rate=0", f"load-warm-{i}"):
            pass
    window.start()
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(one(k, t0 + ramp_s * k / k_streams)) for k in range(k_streams)]
    _, pending = await asyncio.wait(tasks, timeout=args.timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    window.stop()
    latencies = [lat for r in results for lat in r.latencies_ms]
    received = sum(r.tokens for r in results)
    expected = k_streams * args.n
    errors = [r.error for r in results if r.error]
    return {
        "streams": k_streams,
        "n": args.n,
        "rate": args.rate,
        "ramp_s": ramp_s,
        "latency_ms": quantiles(latencies, missing=max(0, expected - received)),
        # Tokens received in the second half of the phase: the steady state, after the
        # burst of stream starts (the whole-phase numbers include it).
        "second_half_latency_ms": quantiles(
            lat
            for r in results
            for at, lat in zip(r.received_at, r.latencies_ms, strict=True)
            if at >= int((t0 + ramp_s + args.n / args.rate / 2) * 1e9)
        ),
        "saturated": received < expected,
        "timeline": timeline(results, int(t0 * 1e9)),
        "tokens_expected": expected,
        "tokens_received": received,
        "streams_completed": sum(r.done for r in results),
        "streams_failed": len(errors),
        "timed_out": len(pending),
        "errors": sorted(set(errors))[:5],
        **window.report(received),
    }


async def phase_requests(reader: Reader, args: argparse.Namespace, window: Window) -> dict[str, Any]:
    """Open-loop short requests: request ``i`` is due at ``t0 + i/rps`` whatever happened
    to the earlier ones (an absolute schedule: a slow server meets a growing queue, as it
    would in production, instead of a client that politely waits). Each request streams
    ``n`` chunks; its latency runs from its *scheduled* start to its last chunk, so time
    spent queued (in this client, in the relay) is counted, not hidden."""
    rps, total = args.rps, max(1, round(args.rps * args.duration_s))
    prompt = f"bench n={args.n} rate=0"
    latencies: list[float] = []
    first_chunk: list[float] = []
    errors: list[str] = []

    async def one(i: int, due_ns: int) -> None:
        got_first = False
        try:
            async for received, _ in reader.stream(prompt, f"rps-{i}"):
                if not got_first:
                    first_chunk.append((received - due_ns) / 1e6)
                    got_first = True
            latencies.append((time.monotonic_ns() - due_ns) / 1e6)
        except asyncio.CancelledError:
            errors.append("timed out")
            raise
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    for i in range(args.warmup):
        async for _ in reader.stream(prompt, f"rps-warm-{i}"):
            pass
    gc.collect()
    window.start()
    tasks: list[asyncio.Task[None]] = []
    t0 = time.monotonic_ns() + 5_000_000
    for i in range(total):
        due = t0 + int(i * 1e9 / rps)
        delay = (due - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, due)))
    _, pending = await asyncio.wait(tasks, timeout=args.timeout_s) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    window.stop()
    done = len(latencies)
    report = window.report(done)
    report["cpu_us_per_request"] = report.pop("cpu_us_per_token")
    return {
        "rps": rps,
        "n": args.n,
        "requests": total,
        "completed": done,
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5],
        "achieved_rps": total / (window.wall_s or 1),
        # Undelivered requests count as infinitely late: a percentile they reach is None.
        "latency_ms": quantiles(latencies, missing=total - done),
        "first_chunk_ms": quantiles(first_chunk, missing=total - len(first_chunk)),
        **report,
    }


def timeline(results: list[StreamResult], t0_ns: int) -> list[dict[str, Any]]:
    """Latency per second of the phase (by receive time): shows stalls (GC pauses, a
    backlog building up) that one percentile hides."""
    buckets: dict[int, list[float]] = {}
    for r in results:
        for at, lat in zip(r.received_at, r.latencies_ms, strict=True):
            buckets.setdefault((at - t0_ns) // 1_000_000_000, []).append(lat)
    out = []
    for second in sorted(buckets):
        q = quantiles(buckets[second])
        out.append({"s": second, "tokens": q["count"], "p50": q["p50"], "p99": q["p99"], "max": q["max"]})
    return out


class GCPauses:
    """Garbage-collection pauses of this process, so a latency stall can be attributed to
    the client (LiteLLM's large heap makes gen-2 collections take hundreds of ms) or not."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.pauses_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
        gc.callbacks.append(self.callback)

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.pauses_ms[info["generation"]].append((time.perf_counter() - self.started) * 1000)
            self.started = None

    def report(self) -> dict[str, Any]:
        return {
            f"gen{g}": {"count": len(p), "max_ms": max(p, default=0.0), "total_ms": sum(p)}
            for g, p in self.pauses_ms.items()
        }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pids = dict(_role_pid(spec) for spec in args.pid)
    window = Window(pids, args.upstream)
    reader = make_reader(args.row, args.target, args.model)
    await reader.open()
    gc_pauses = GCPauses()
    try:
        if args.mode == "ttft":
            result = await phase_ttft(reader, args)
        elif args.mode == "unbounded":
            result = await phase_unbounded(reader, args, window)
        elif args.mode == "requests":
            result = await phase_requests(reader, args, window)
        else:
            result = await phase_load(reader, args, window)
    finally:
        await reader.close()
    result["client_gc"] = gc_pauses.report()
    result["rss"] = {role: tree_rss_mb(pid) for role, pid in pids.items()}
    result["client_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _role_pid(spec: str) -> tuple[str, int]:
    role, _, pid = spec.partition("=")
    return role, int(pid)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load_client", description=__doc__.splitlines()[0])
    parser.add_argument("--row", required=True, choices=sorted(ROW_KINDS))
    parser.add_argument("--target", required=True, help="base URL (http rows, exo) or host:port (sidecar)")
    parser.add_argument("--mode", required=True, choices=("ttft", "unbounded", "load", "requests"))
    parser.add_argument("--model", default="bench", help="model id for the http and exo rows")
    parser.add_argument("--upstream", help="the upstream's base URL, for its /stats")
    parser.add_argument("--pid", action="append", default=[], metavar="ROLE=PID", help="a process tree to watch")
    parser.add_argument("--n", type=int, default=4, help="chunks per request")
    parser.add_argument("--rate", type=float, default=50.0, help="chunks/s per stream (load)")
    parser.add_argument("--streams", type=int, default=1, help="concurrent streams (load)")
    parser.add_argument("--ramp-s", type=float, default=1.0, help="stream starts spread over this (load)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="streams still open then are cancelled")
    parser.add_argument("--requests", type=int, default=20, help="measured sequential requests (ttft)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up requests (ttft, load)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs (unbounded)")
    parser.add_argument("--rps", type=float, default=100.0, help="request arrivals per second (requests)")
    parser.add_argument("--duration-s", type=float, default=5.0, help="length of the arrival schedule (requests)")
    return parser.parse_args(argv)


def _run_on_uvloop(coro: Any) -> Any:
    """Every row's client runs on uvloop, as exo itself does (exo/main.py installs it): the
    engine's client lives in exo's loop, and the rows stay comparable with each other."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None, emit: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        result = _run_on_uvloop(run(args))
        result["ok"] = True
    except Exception as exc:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    result.update(row=args.row, mode=args.mode, process_s=time.monotonic() - started)
    emit(json.dumps(result))
    sys.stdout.flush()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
