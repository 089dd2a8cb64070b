"""What the spend ledger costs a request: ``python -m benchmarks.ledger [--n 2000]``.

Prints, per finished request, the time from "record this" to "committed" and the CPU the
event-loop thread spends on it, for the sidecar's way (one writer thread, awaited before the
Finished event) and for a commit made inline on the loop thread (the alternative it avoids).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.ledger.spend import Charge, Ledger

ENTRY = ModelEntry(alias="bench", litellm_model="openai/gpt-4o-mini", provider="openai")


def _charge(i: int) -> Charge:
    return Charge.of(
        request_id=f"bench-{i}",
        ended_at=time.time(),
        node="node-1",
        entry=ENTRY,
        prompt_tokens=100,
        completion_tokens=200,
        estimated=False,
        outcome="completed",
    )


async def _measure(ledger: Ledger, n: int, inline: bool) -> tuple[float, float, float]:
    waits: list[float] = []
    cpu_start = time.thread_time()
    for i in range(n):
        charge = _charge(i)
        began = time.perf_counter()
        if inline:
            ledger._insert(charge)  # the alternative being measured
        else:
            await ledger.record(charge)
        waits.append(time.perf_counter() - began)
    loop_cpu_us = (time.thread_time() - cpu_start) / n * 1e6
    waits.sort()
    return statistics.median(waits) * 1e6, waits[int(0.99 * (n - 1))] * 1e6, loop_cpu_us


async def main(n: int) -> None:
    _charge(0)  # imports LiteLLM's cost map once, outside the measurement
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger.open(Path(tmp))
        try:
            for name, inline in (("writer thread (the sidecar's)", False), ("inline on the loop", True)) * 2:
                median, p99, cpu = await _measure(ledger, n, inline)
                print(f"{name:32s} commit median {median:7.1f} us  p99 {p99:7.1f} us  loop CPU {cpu:6.1f} us/request")
        finally:
            ledger.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    asyncio.run(main(parser.parse_args().n))
