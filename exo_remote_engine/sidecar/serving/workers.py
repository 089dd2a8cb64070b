"""Sidecar worker processes: more cores for Generate without sharing a port.

One Python process streams a few thousand chunks per second; a busy key-holding machine
has more cores than that. SO_REUSEPORT would let several processes share the public
port, but it would also let any process of the same user bind it and skim requests, which
the sidecar forbids. Instead the main process starts ``--workers - 1`` copies of itself,
each binding its own ephemeral port on the same host exclusively, with the same config,
TLS and tokens, and names their ports in ``ListWorkers``; clients spread Generate calls
over the main port and those. A worker that dies is restarted (on a new port, which the
next ``ListWorkers`` reports); a worker whose main process dies sees its stdin close and
drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

WORKER_ENV = "EXO_REMOTE_SIDECAR_WORKER"  # set in a worker's environment; its value is its index
READY_LINE = "exo-remote-sidecar listening on port {port}"  # the sidecar's first stdout line
_READY = re.compile(re.escape(READY_LINE.split("{", 1)[0]).encode() + rb"(\d+)")
_START_TIMEOUT_S = 60.0
_RESTART_DELAY_S = 1.0


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.port: int | None = None


# Flags whose value may hold a password: a worker gets them in its environment, never in
# its argv (world-readable in /proc/PID/cmdline).
SECRET_FLAGS: Mapping[str, str] = {"--redis": "EXO_REMOTE_REDIS", "--database": "EXO_REMOTE_DATABASE"}


def without_secret_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``argv`` without :data:`SECRET_FLAGS` (``--flag value`` or ``--flag=value``), and
    their values as the environment variables that set them. The parser takes no
    abbreviations, so these two spellings are the only ones."""
    kept: list[str] = []
    moved: dict[str, str] = {}
    items = iter(argv)
    for arg in items:
        name, equals, value = arg.partition("=")
        if name in SECRET_FLAGS:
            moved[SECRET_FLAGS[name]] = value if equals else next(items, "")
            continue
        kept.append(arg)
    return kept, moved


class WorkerPool:
    """``count`` extra sidecar processes started from the main process's own argv (less
    any password-bearing flag, which they read from their environment instead)."""

    def __init__(self, argv: Sequence[str], count: int, extra_env: Mapping[str, str] | None = None) -> None:
        argv, moved = without_secret_flags(argv)
        self._argv = [sys.executable, "-m", "exo_remote_engine.server", *argv]
        extra_env = {**moved, **(extra_env or {})}
        self._extra_env = dict(extra_env or {})  # e.g. the embedded model's endpoint, shared
        self._workers = [_Worker(i + 1) for i in range(count)]
        self._stopping = False
        self._supervisors: list[asyncio.Task[None]] = []

    def ports(self) -> list[int]:
        """Ports of the workers serving right now."""
        return [w.port for w in self._workers if w.port is not None]

    async def start(self) -> None:
        """Start every worker and return once all of them accept calls."""
        await asyncio.gather(*(self._spawn(w) for w in self._workers))
        self._supervisors = [asyncio.create_task(self._supervise(w)) for w in self._workers]

    async def _spawn(self, worker: _Worker) -> None:
        env = {**os.environ, **self._extra_env, WORKER_ENV: str(worker.index)}
        process = await asyncio.create_subprocess_exec(
            *self._argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
        )
        worker.process = process
        assert process.stdout is not None
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):
                while line := await process.stdout.readline():
                    if match := _READY.search(line):
                        worker.port = int(match.group(1))
                        log.info("worker %d (pid %d) serving on port %d", worker.index, process.pid, worker.port)
                        return
        except TimeoutError:
            pass
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise RuntimeError(f"sidecar worker {worker.index} did not start (exit code {process.returncode})")

    async def _supervise(self, worker: _Worker) -> None:
        while not self._stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            worker.port = None
            if self._stopping:
                return
            log.error("worker %d exited with code %s; restarting it", worker.index, code)
            await asyncio.sleep(_RESTART_DELAY_S)
            try:
                await self._spawn(worker)
            except RuntimeError as exc:
                log.error("%s; retrying", exc)

    async def stop(self, grace_s: float) -> None:
        """Let every worker drain its streams for ``grace_s``, then make sure it is gone."""
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        live = [w.process for w in self._workers if w.process is not None and w.process.returncode is None]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace_s + 5.0):
                await asyncio.gather(*(p.wait() for p in live))
        except TimeoutError:
            for process in live:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await asyncio.gather(*(p.wait() for p in live))
        for worker in self._workers:
            worker.port = None


async def wait_for_parent_exit() -> None:
    """Returns when the main process is gone: a worker's stdin is a pipe from its parent,
    which the kernel closes when the parent dies, however it died."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.read(4096):
        pass
