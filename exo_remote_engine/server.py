"""The key-holding sidecar's entry point: ``exo-remote-sidecar`` / ``python -m exo_remote_engine.server``.

``exo-remote-sidecar --listen 127.0.0.1:50505 --config config.yaml`` serves
``exo.remote.v1.RemoteInferenceService`` and the standard ``grpc.health.v1.Health``.
This module is the process only: logging, the event loop, worker processes, signals and
draining. The rest is in :mod:`exo_remote_engine.sidecar`: flags and variables in
``settings``, building and binding the server in ``lifecycle``, the RPCs in ``servicer``,
streaming in ``streaming``, errors in one table (:mod:`exo_remote_engine.contract.errors`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from exo_remote_engine.contract.redaction import install_log_redaction
from exo_remote_engine.sidecar.config.loader import ConfigError, SidecarConfig, load_config
from exo_remote_engine.sidecar.serving.lifecycle import RunningSidecar, start_sidecar
from exo_remote_engine.sidecar.serving.settings import SidecarSettings, build_parser, parse_args
from exo_remote_engine.sidecar.serving.workers import READY_LINE, WORKER_ENV, WorkerPool, wait_for_parent_exit
from exo_remote_engine.sidecar.telemetry.safe_logging import protect_handlers, safe_logger

__all__ = ["RunningSidecar", "SidecarSettings", "build_parser", "main", "start_sidecar"]

log = safe_logger("exo_remote_engine.sidecar")

_parse_args = parse_args  # the name tests parse flags with


def _check_single_process(config: SidecarConfig, settings: SidecarSettings) -> None:
    """Limits and budgets counted in one process's memory cannot be split over workers:
    rpm/tpm need --redis, budgets --database."""
    limited: list[str] = []
    if settings.redis_url is None:
        limited += [e.deployment_name for group in config.groups.values() for e in group if e.rpm or e.tpm]
        limited += [e.alias for e in config.models if e.rpm or e.tpm]
        limited += [f"node {n}" for n, q in config.node_quotas.items() if q.rpm is not None or q.tpm is not None]
    if settings.database_url is None:
        limited += [f"node {n}" for n, q in config.node_quotas.items() if q.max_budget is not None]
    if settings.workers > 1 and limited:
        raise ConfigError(
            f"--workers {settings.workers}: rpm, tpm and budgets are counted per process, and {limited[0]} has one; "
            "run with --workers 1, or share rpm/tpm with --redis and budgets with --database"
        )


async def _serve(settings: SidecarSettings, argv: Sequence[str]) -> None:
    workers, grace_s = settings.workers, settings.grace_s
    is_worker = bool(os.environ.get(WORKER_ENV))
    if is_worker:  # same config, TLS and tokens as the main process, on a port of its own
        settings.listen = settings.listen.rsplit(":", 1)[0] + ":0"
        settings.metrics_listen = None
    if workers > 1 and not is_worker:
        _check_single_process(load_config(settings.config_path), settings)
    running = await start_sidecar(settings)
    protect_handlers()  # again: LiteLLM, imported by now, brings handlers of its own
    extra_env = running.embedded.endpoint_env() if running.embedded is not None else {}
    pool = WorkerPool(argv, workers - 1, extra_env) if workers > 1 and not is_worker else None
    if pool is not None:
        try:
            await pool.start()
        except RuntimeError as exc:
            await asyncio.gather(pool.stop(0), running.stop(0))
            raise ConfigError(str(exc)) from None
        running.servicer.worker_ports = pool.ports
    # LiteLLM leaves ~360k tracked objects after import and warm-up; every full collection
    # walks them and pauses all streams for 200-400 ms. Frozen, they are never walked again.
    # (Only here, in the sidecar's own process: frozen objects are never freed, which an
    # embedding process, e.g. a test runner, may not want.)
    gc.collect()
    gc.freeze()
    models = ", ".join(m.alias for m in running.config.models)
    log.info("listening on %s (models: %s)", settings.listen.rsplit(":", 1)[0] + f":{running.port}", models)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the ready line: a SIGTERM right after it drains
        loop.add_signal_handler(sig, stop.set)
    print(READY_LINE.format(port=running.port), flush=True)
    if is_worker:
        orphaned = asyncio.create_task(wait_for_parent_exit())
        orphaned.add_done_callback(lambda _: stop.set())
    await stop.wait()
    log.info("shutting down: draining %d live streams for up to %.0fs", running.servicer.policy.active_streams, grace_s)
    if pool is not None:
        await asyncio.gather(pool.stop(grace_s), running.stop(grace_s=grace_s))
    else:
        await running.stop(grace_s=grace_s)


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the sidecar extra brings it; exo itself runs on it): every
    streamed token costs several loop hops, and uvloop's are cheaper than asyncio's.
    ``EXO_REMOTE_UVLOOP=0`` keeps asyncio's loop."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def _configure_logging(level: str) -> None:
    worker = os.environ.get(WORKER_ENV)
    install_log_redaction()
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s{f'[worker {worker}]' if worker else ''} %(message)s",
        stream=sys.stderr,
    )
    protect_handlers()  # every record in this process is one bounded line
    # LiteLLM logs request params at debug level; keep its loggers quiet whatever we run at.
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm", "httpx", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _configure_logging(args.log_level)
    try:
        settings = SidecarSettings.from_args(args)
        with asyncio.Runner(loop_factory=_loop_factory(settings.uvloop)) as runner:
            runner.run(_serve(settings, argv))
    except ConfigError as exc:
        print(f"exo-remote-sidecar: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
