"""Characters per second through real classic exo, by script, streamed and not.

``EXO_SRC=... .venv/bin/python -m benchmarks.exo_scripts [--runs 3]`` starts the test
upstream (:mod:`tests.support.openai_upstream`, in a thread, deltas as fast as the reader
takes them), a sidecar and one exo node at exo's default flags, then times whole replies
read with the openai SDK: English prose (word deltas) and Chinese (4-character deltas),
each streamed and non-streamed. It prints chars/s (median of the runs), the characters
received and the finish reason, so a cut reply shows as such rather than as a fast one.

Run it against another checkout of the add-on (for a before/after figure) by putting that
checkout first on PYTHONPATH: the exo node imports the add-on from there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import openai

from tests.conftest import PLANTED_KEY, write_proxy_config
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import exo_skip_reason, start_lone_exo_node, start_sidecar_process

WORKLOADS = {
    # ~60,000 characters of English in 10,000 word deltas.
    "english": [f"word{i} " for i in range(10_000)],
    # 20,000 Chinese characters in 5,000 deltas of 4.
    "chinese": ["".join(chr(0x4E00 + (4 * i + j) % 20_000) for j in range(4)) for i in range(5_000)],
}


def _time_reply(client: openai.OpenAI, model: str, stream: bool) -> tuple[float, int, str]:
    started = time.perf_counter()
    if stream:
        text, finish = [], ""
        for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "go"}], stream=True
        ):
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        content = "".join(text)
    else:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "go"}])
        content, finish = reply.choices[0].message.content or "", reply.choices[0].finish_reason
    return time.perf_counter() - started, len(content), finish


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="replies timed per row (median reported)")
    args = parser.parse_args(argv)
    reason = exo_skip_reason()
    if reason is not None:
        print(f"cannot run: {reason}")
        return 2
    scenarios = {f"{name}-model": Scenario(chunks=chunks) for name, chunks in WORKLOADS.items()}
    with (
        tempfile.TemporaryDirectory(prefix="bench-exo-scripts-") as tmp,
        OpenAIUpstream.in_thread(scenarios=scenarios) as upstream,
    ):
        workdir = Path(tmp)
        config = write_proxy_config(workdir / "config.yaml", upstream.url, list(scenarios))
        sidecar = start_sidecar_process(config, workdir / "sidecar.log", env={"TEST_UPSTREAM_KEY": PLANTED_KEY})
        try:
            node = start_lone_exo_node(workdir, "b", sidecar.address, wait_models=list(scenarios))
            try:
                client = openai.OpenAI(base_url=f"{node.api}/v1", api_key="unused", max_retries=0, timeout=300)
                print("| script | mode | chars/s (median) | chars received / sent | finish |")
                print("|---|---|---|---|---|")
                for name, chunks in WORKLOADS.items():
                    sent = sum(len(c) for c in chunks)
                    for stream in (False, True):
                        _time_reply(client, f"{name}-model", stream)  # warm-up
                        runs = [_time_reply(client, f"{name}-model", stream) for _ in range(args.runs)]
                        rate = statistics.median(n / s for s, n, _ in runs)
                        _, received, finish = runs[-1]
                        mode = "stream" if stream else "non-stream"
                        print(f"| {name} | {mode} | {rate:,.0f} | {received:,} / {sent:,} | {finish} |", flush=True)
            finally:
                node.stop()
        finally:
            sidecar.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
