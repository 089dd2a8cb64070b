"""The discovery service: :class:`ModelDiscovery` queries every source concurrently, each
under its own timeout (a hung provider never delays the others), caches the merged result
for a TTL, refreshes in the background, serves a source's last good listing while its
refresh fails, and lets concurrent callers share one in-flight refresh."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import aiohttp

from exo_remote_engine.sidecar.config.loader import ModelEntry
from exo_remote_engine.sidecar.discovery.chat_filter import is_chat_model
from exo_remote_engine.sidecar.discovery.default_model import preference
from exo_remote_engine.sidecar.discovery.entries import discovered_model, merge, model_entry, valid_model_id
from exo_remote_engine.sidecar.discovery.http_listing import ListingFailed, failure_reason, list_provider, shown_url
from exo_remote_engine.sidecar.discovery.local_servers import (
    SERVER_LITELLM,
    hostport,
    list_server,
    name_servers,
    server_api_base,
)
from exo_remote_engine.sidecar.discovery.model_map import (
    known_chat_models,
    litellm_model_map,
    map_entry,
    with_map_info,
)
from exo_remote_engine.sidecar.discovery.parsers.untrusted_json import as_str
from exo_remote_engine.sidecar.discovery.providers import PROVIDERS
from exo_remote_engine.sidecar.discovery.types import (
    DiscoveredModel,
    ListedModel,
    ProviderSpec,
    ServerSpec,
    SourceStatus,
)

log = logging.getLogger(__name__)

DEFAULT_TTL_S: Final = 60.0
DEFAULT_TIMEOUT_S: Final = 5.0
DEFAULT_OLLAMA_URL: Final = "http://127.0.0.1:11434"


@dataclass(frozen=True)
class _LastGood:
    api_base: str
    models: tuple[ListedModel, ...]


@dataclass(frozen=True)
class _Outcome:
    models: tuple[DiscoveredModel, ...]
    status: SourceStatus
    secret: str | None = field(default=None, repr=False)


class ModelDiscovery:
    """Discovers, caches and refreshes the sidecar's models.

    ``snapshot()`` returns config entries merged with discovered models, from cache within
    ``ttl`` seconds. ``environ`` is called at every refresh; keys and ``*_API_BASE``
    overrides are read from what it returns (never from ``os.environ`` behind its back).
    """

    def __init__(
        self,
        *,
        config_entries: Sequence[ModelEntry] = (),
        environ: Callable[[], Mapping[str, str]] = lambda: os.environ,
        servers: Sequence[ServerSpec | tuple[str, str, str | None]] = (),
        providers: Sequence[ProviderSpec] = PROVIDERS,
        ttl: float = DEFAULT_TTL_S,
        timeout: float = DEFAULT_TIMEOUT_S,
        default_ollama: str | None = DEFAULT_OLLAMA_URL,
        include_keyless: bool = True,
        keyless_limit: int | None = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        :param servers: ``ServerSpec``s or ``(kind, base_url, api_key | None)`` tuples.
        :param default_ollama: probed when no ``ollama`` server is configured
            (``OLLAMA_API_BASE`` in ``environ`` overrides the address); ``None`` disables the
            probe. It contributes models when it answers and nothing otherwise, never an error.
        :param include_keyless: list the LiteLLM-known chat models of providers without a key
            (not ready, "set <KEY> on the sidecar").
        :param keyless_limit: at most this many of those per provider, best first (None: all).
        """
        self.config_entries: tuple[ModelEntry, ...] = tuple(config_entries)
        self._environ = environ
        self._providers = tuple(providers)
        self._servers = name_servers([s if isinstance(s, ServerSpec) else ServerSpec(*s) for s in servers])
        self.ttl = ttl
        self.timeout = timeout
        self.default_ollama = default_ollama
        self.include_keyless = include_keyless
        self.keyless_limit = keyless_limit
        self._clock = clock
        self._last_good: dict[str, _LastGood] = {}
        self._snapshot: tuple[DiscoveredModel, ...] | None = None
        self._snapshot_at = 0.0
        self._statuses: tuple[SourceStatus, ...] = ()
        self._secrets: frozenset[str] = frozenset()
        self._inflight: asyncio.Task[tuple[DiscoveredModel, ...]] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._last_reported: dict[str, str] = {}

    # -- public -------------------------------------------------------------------------

    async def snapshot(self, refresh: bool = False) -> list[DiscoveredModel]:
        """Config entries + discovered models; refreshed when stale or ``refresh``."""
        if not refresh and self._snapshot is not None and self._clock() - self._snapshot_at < self.ttl:
            return list(self._snapshot)
        return list(await self._shared_refresh())

    async def lookup(self, alias: str) -> DiscoveredModel | None:
        """The model named ``alias`` in the (cached, or refreshed when stale) snapshot."""
        return next((m for m in await self.snapshot() if m.alias == alias), None)

    def cached(self) -> list[DiscoveredModel]:
        """The last snapshot without any I/O (empty before the first refresh)."""
        return list(self._snapshot or ())

    @property
    def statuses(self) -> tuple[SourceStatus, ...]:
        """Per provider / server outcome of the last refresh."""
        return self._statuses

    @property
    def secrets(self) -> frozenset[str]:
        """Every key value the last refresh used: add them to the redactor."""
        return self._secrets

    def start(self) -> None:
        """Refresh now and then every ``ttl`` seconds in the background (needs a running loop)."""
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="model-discovery")

    async def stop(self) -> None:
        """Cancel the background loop and any refresh in flight."""
        tasks = [t for t in (self._loop_task, self._inflight) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._loop_task = None
        self._inflight = None

    # -- refresh machinery --------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._shared_refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model discovery refresh failed")
            await asyncio.sleep(self.ttl)

    async def _shared_refresh(self) -> tuple[DiscoveredModel, ...]:
        task = self._inflight
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._refresh(), name="model-discovery-refresh")
            self._inflight = task
        # shield: a cancelled caller must not cancel the refresh the others wait for
        return await asyncio.shield(task)

    async def _refresh(self) -> tuple[DiscoveredModel, ...]:
        env = dict(self._environ())
        started = time.time()
        if "litellm" not in sys.modules:  # the first import takes seconds: not on the loop
            await asyncio.to_thread(litellm_model_map)
        connector = aiohttp.TCPConnector(limit=64)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None), trust_env=False
        ) as session:
            jobs = [self._guard(spec.name, self._provider(session, spec, env)) for spec in self._providers]
            jobs += [self._guard(s.name or s.kind, self._server(session, s, started)) for s in self._servers]
            probe = self._probe_server(env)
            if probe is not None:
                jobs.append(self._guard("ollama", self._server(session, probe, started, probe=True)))
            outcomes = await asyncio.gather(*jobs)
        discovered: list[DiscoveredModel] = []
        for outcome in outcomes:
            discovered += sorted(outcome.models, key=lambda m: m.alias)
        discovered.sort(key=lambda m: not m.ready)  # stable: ready first, source order kept
        merged = tuple(merge(self.config_entries, discovered))
        self._statuses = tuple(replace(o.status, checked_at=started) for o in outcomes)
        self._secrets = frozenset(o.secret for o in outcomes if o.secret)
        self._snapshot, self._snapshot_at = merged, self._clock()
        self._report()
        return merged

    async def _guard(self, source: str, job: Awaitable[_Outcome]) -> _Outcome:
        """Whatever happens in one source stays there (and is bounded by ``timeout``)."""
        try:
            return await job
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("model discovery for %s failed: %s", source, type(exc).__name__)
            status = SourceStatus(source, "", ok=False, reason=f"discovery of {source} failed (sidecar error)")
            return _Outcome((), status)

    def _probe_server(self, env: Mapping[str, str]) -> ServerSpec | None:
        if self.default_ollama is None or any(s.kind == "ollama" for s in self._servers):
            return None
        base = env.get("OLLAMA_API_BASE") or self.default_ollama
        taken = {s.name for s in self._servers}
        return ServerSpec("ollama", base, None, "ollama" if "ollama" not in taken else f"ollama@{hostport(base)}")

    async def _provider(self, session: aiohttp.ClientSession, spec: ProviderSpec, env: Mapping[str, str]) -> _Outcome:
        key_var, key = next(((v, env[v]) for v in spec.key_envs if env.get(v)), (spec.key_envs[0], ""))
        override = env.get(spec.base_env, "").strip()
        api_base = spec.normalize_base(override) if override else spec.default_base
        shown = shown_url(api_base)
        params: dict[str, Any] = {"api_key": key} if key else {}
        if override:
            params["api_base"] = api_base

        def build(listed: Iterable[ListedModel], reason: str, *, fill_from_map: bool) -> tuple[DiscoveredModel, ...]:
            out = []
            for lm in listed:
                if not valid_model_id(lm.id):
                    continue
                info = map_entry(spec.name, lm.id, spec.map_bare_keys)
                if not is_chat_model(lm.id, lm.chat, as_str(info.get("mode")) if info else None):
                    continue
                lm = with_map_info(lm, info) if fill_from_map else lm
                alias = f"{spec.name}/{lm.id}"
                out.append(discovered_model(model_entry(alias, alias, spec.name, lm, params), lm, reason))
            return tuple(out)

        if not key:
            self._last_good.pop(spec.name, None)
            reason = f"set {spec.key_envs[0]} on the sidecar"
            models = build(known_chat_models(spec.name), reason, fill_from_map=False) if self.include_keyless else ()
            if self.keyless_limit is not None:  # a sample of what a key would unlock, best first
                models = tuple(sorted(models, key=preference)[: self.keyless_limit])
            return _Outcome(models, SourceStatus(spec.name, shown, ok=False, reason=reason, models=len(models)))

        try:
            async with asyncio.timeout(self.timeout):
                listed = await list_provider(session, spec, api_base, key)
        except (ListingFailed, TimeoutError) as failure:
            reason = failure_reason(failure, shown, self.timeout, f"the sidecar's {key_var} was rejected")
            last = self._last_good.get(spec.name)
            last_models = last.models if last is not None and last.api_base == api_base else None
            if isinstance(failure, ListingFailed) and failure.kind == "auth":
                self._last_good.pop(spec.name, None)
                fallback = last_models if last_models is not None else known_chat_models(spec.name)
                models = build(fallback, reason, fill_from_map=last_models is not None)
            elif last_models is not None:
                models = build(last_models, "", fill_from_map=True)
                status = SourceStatus(
                    spec.name, shown, ok=False, reason=reason, models=len(models), serving_last_good=True
                )
                return _Outcome(models, status, key)
            else:
                models = build(known_chat_models(spec.name), reason, fill_from_map=False)
            return _Outcome(models, SourceStatus(spec.name, shown, ok=False, reason=reason, models=len(models)), key)
        self._last_good[spec.name] = _LastGood(api_base, tuple(listed))
        models = build(listed, "", fill_from_map=True)
        return _Outcome(models, SourceStatus(spec.name, shown, ok=True, models=len(models)), key)

    async def _server(
        self, session: aiohttp.ClientSession, server: ServerSpec, started: float, *, probe: bool = False
    ) -> _Outcome:
        name = server.name or server.kind
        litellm_prefix, provider = SERVER_LITELLM[server.kind]
        api_base = server_api_base(server)
        shown = shown_url(server.base_url.strip())
        memory_key = f"server:{name}"
        params: dict[str, Any] = {"api_base": api_base}
        if server.api_key:
            params["api_key"] = server.api_key

        def build(listed: Iterable[ListedModel], reason: str) -> tuple[DiscoveredModel, ...]:
            out = []
            for lm in listed:
                if not valid_model_id(lm.id):
                    continue
                info = map_entry("ollama", lm.id.removesuffix(":latest")) if server.kind == "ollama" else None
                if not is_chat_model(lm.id, lm.chat, as_str(info.get("mode")) if info else None):
                    continue
                lm = with_map_info(lm, info)
                model_id = lm.id.removesuffix(":latest") if server.kind == "ollama" else lm.id
                entry = model_entry(f"{name}/{model_id}", f"{litellm_prefix}/{lm.id}", provider, lm, params)
                out.append(discovered_model(entry, lm, reason))
            return tuple(out)

        try:
            async with asyncio.timeout(self.timeout):
                listed = await list_server(session, server)
        except (ListingFailed, TimeoutError) as failure:
            hint = (
                f"server at {shown} rejected the sidecar's API key"
                if server.api_key
                else f"server at {shown} requires an API key"
            )
            reason = failure_reason(failure, shown, self.timeout, hint)
            last = self._last_good.get(memory_key)
            last_models = last.models if last is not None and last.api_base == api_base else None
            if isinstance(failure, ListingFailed) and failure.kind == "auth":
                self._last_good.pop(memory_key, None)
                models = build(last_models or (), reason)
            elif last_models is not None:
                models = build(last_models, "")
                status = SourceStatus(
                    name, shown, ok=False, reason=reason, models=len(models), serving_last_good=True, probe=probe
                )
                return _Outcome(models, status, server.api_key)
            else:
                models = ()
            status = SourceStatus(name, shown, ok=False, reason=reason, models=len(models), probe=probe)
            return _Outcome(models, status, server.api_key)
        self._last_good[memory_key] = _LastGood(api_base, tuple(listed))
        models = build(listed, "")
        return _Outcome(models, SourceStatus(name, shown, ok=True, models=len(models), probe=probe), server.api_key)

    def _report(self) -> None:
        """Log each source when its state changes (INFO/WARNING) and every refresh at DEBUG."""
        for status in self._statuses:
            state = "ok" if status.ok else status.reason
            changed = self._last_reported.get(status.source) != state
            self._last_reported[status.source] = state
            if status.ok:
                level = logging.INFO if changed else logging.DEBUG
                log.log(level, "discovery: %s: %d chat models", status.source, status.models)
            elif status.probe or status.reason.startswith("set "):
                log.debug("discovery: %s: %s", status.source, status.reason)
            else:
                level = logging.WARNING if changed else logging.DEBUG
                suffix = f" (serving the last good listing of {status.models})" if status.serving_last_good else ""
                log.log(level, "discovery: %s: %s%s", status.source, status.reason, suffix)
