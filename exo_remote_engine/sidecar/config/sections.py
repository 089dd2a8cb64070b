"""A config's settings sections: ``router_settings``, ``litellm_settings``,
``general_settings`` and ``exo_remote_settings`` (node rules, quotas, fallbacks, retries).
Part of :mod:`~exo_remote_engine.sidecar.config.loader`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from exo_remote_engine.sidecar.config.models import resolve_value
from exo_remote_engine.sidecar.config.rules import NodePolicy
from exo_remote_engine.sidecar.config.types import ConfigError, NodeQuota, RouterSettings, duration_seconds, is_number

ROUTING_STRATEGIES = (
    "simple-shuffle",
    "least-busy",
    "latency-based-routing",
    "usage-based-routing",
    "usage-based-routing-v2",
)
_MAX_COOLDOWN_S = 86400  # a day; .inf or 1e400 would be an outage of its own
_NODE_RULE_KEYS = (
    "allowed_models",
    "max_concurrent_streams",
    "rpm",
    "tpm",
    "max_budget",
    "budget_duration",
    "role",
    "queue_timeout",
    "priority",
    "allow_unpriced",
)
NODE_ROLES = ("user", "admin")  # admin: may read the status page off loopback (docs/operating.md)


def parse_router_settings(path: Path, raw: Mapping[str, Any]) -> RouterSettings:
    block = raw.get("router_settings") or {}
    defaults = RouterSettings()
    strategy = block.get("routing_strategy", defaults.routing_strategy)
    if strategy not in ROUTING_STRATEGIES:
        raise ConfigError(
            f"{path}: router_settings.routing_strategy {strategy!r} is not supported here; "
            f"use one of {', '.join(ROUTING_STRATEGIES)}"
        )
    fails = block.get("allowed_fails", defaults.allowed_fails)
    if not isinstance(fails, int) or isinstance(fails, bool) or fails < 0:
        raise ConfigError(f"{path}: router_settings.allowed_fails must be a non-negative integer")
    cooldown = block.get("cooldown_time", defaults.cooldown_time_s)
    if not is_number(cooldown) or not 0 <= cooldown <= _MAX_COOLDOWN_S:
        raise ConfigError(
            f"{path}: router_settings.cooldown_time must be a number of seconds from 0 to {_MAX_COOLDOWN_S}"
        )
    guards = [_seconds(path, f"router_settings.{k}", block.get(k)) for k in ("ttft_timeout", "hedge_after")]
    return RouterSettings(str(strategy), fails, float(cooldown), *guards)


def _seconds(path: Path, where: str, value: Any, zero: bool = False) -> float | None:
    """A finite number of seconds, positive (or 0 when ``zero``); None when absent."""
    if value is None:
        return None
    if not is_number(value) or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ConfigError(f"{path}: {where} must be a {'non-negative' if zero else 'positive'} number of seconds")
    return float(value)


def parse_queue_timeout(path: Path, settings: Mapping[str, Any]) -> float:
    """``exo_remote_settings.queue_timeout``: how long a request over a limit waits (0: not at all)."""
    return _seconds(path, "exo_remote_settings.queue_timeout", settings.get("queue_timeout"), zero=True) or 0.0


def parse_master_key(path: Path, raw: Mapping[str, Any], env: Mapping[str, str], secrets: set[str]) -> str | None:
    """``general_settings.master_key``: an accepted bearer token (see README), never ignored."""
    block = raw.get("general_settings") or {}
    value = block.get("master_key")
    if value is None:
        return None
    key = resolve_value(value, env, f"{path}: general_settings", "master_key", secrets)
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"{path}: general_settings.master_key must be a non-empty string")
    return key


def parse_node_quotas(path: Path, settings: Mapping[str, Any]) -> dict[str, NodeQuota]:
    """The ``rpm``/``tpm``/``max_budget``/``budget_duration``/``allow_unpriced`` keys of each node's rules."""
    quotas: dict[str, NodeQuota] = {}
    nodes = settings.get("nodes") or {}
    for name, rules in nodes.items() if isinstance(nodes, Mapping) else ():
        if not isinstance(rules, Mapping):
            continue  # parse_node_policies reports it
        where = f"{path}: exo_remote_settings.nodes.{name}"
        rpm, tpm, budget, duration = (rules.get(k) for k in ("rpm", "tpm", "max_budget", "budget_duration"))
        for key, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{where}: {key} must be a positive integer")
        if budget is not None and (not is_number(budget) or not math.isfinite(budget) or budget < 0):
            raise ConfigError(f"{where}: max_budget must be a non-negative number (USD)")
        if duration is not None:
            if budget is None:
                raise ConfigError(f"{where}: budget_duration needs max_budget")
            try:
                duration_seconds(duration)
            except ValueError as exc:
                raise ConfigError(f"{where}: budget_duration: {exc}") from None
        unpriced = rules.get("allow_unpriced", False)
        if not isinstance(unpriced, bool):
            raise ConfigError(f"{where}: allow_unpriced must be true or false")
        if unpriced and budget is None:
            raise ConfigError(f"{where}: allow_unpriced needs max_budget (it lets a budgeted node use unpriced models)")
        if any(v is not None for v in (rpm, tpm, budget)):
            quotas[str(name)] = NodeQuota(rpm, tpm, float(budget) if budget is not None else None, duration, unpriced)
    return quotas


def parse_fallbacks(
    path: Path, raw: Mapping[str, Any], settings: Mapping[str, Any], aliases: set[str], key: str = "fallbacks"
) -> dict[str, tuple[str, ...]]:
    """Fallback aliases per alias: LiteLLM's ``litellm_settings``/``router_settings``
    ``fallbacks: [{alias: [other, ...]}]`` or ``exo_remote_settings.fallbacks: {alias: [...]}``;
    with ``key="context_window_fallbacks"``, LiteLLM's list of the same shape for requests
    too long for a model."""
    found: dict[str, tuple[str, ...]] = {}
    sources: list[tuple[str, Any]] = []
    for section in ("litellm_settings", "router_settings"):
        block = raw.get(section) if isinstance(raw, Mapping) else None
        if isinstance(block, Mapping) and block.get(key):
            sources.append((f"{section}.{key}", block[key]))
    if key == "fallbacks" and settings.get("fallbacks"):
        sources.append(("exo_remote_settings.fallbacks", [settings["fallbacks"]]))
    for where, items in sources:
        if not isinstance(items, list) or not all(isinstance(i, Mapping) for i in items):
            raise ConfigError(f"{path}: {where} must be a list of {{alias: [fallback aliases]}}")
        for item in items:
            for alias, targets in item.items():
                if isinstance(targets, str):
                    targets = [targets]
                unknown = [t for t in [alias, *targets] if t not in aliases]
                if unknown or not isinstance(targets, list):
                    raise ConfigError(f"{path}: {where}: {alias!r}: unknown alias {', '.join(map(repr, unknown))}")
                found[str(alias)] = tuple(str(t) for t in targets)
    return found


def parse_num_retries(path: Path, raw: Mapping[str, Any], settings: Mapping[str, Any]) -> int:
    """Retries of one model before its first delta (default 1; LiteLLM's keys accepted)."""
    value: Any = settings.get("num_retries")
    for section in ("router_settings", "litellm_settings"):
        block = raw.get(section) if isinstance(raw, Mapping) else None
        if value is None and isinstance(block, Mapping):
            value = block.get("num_retries")
    if value is None:
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10:
        raise ConfigError(f"{path}: num_retries must be an integer from 0 to 10")
    return value


def parse_node_policies(path: Path, settings: Mapping[str, Any]) -> dict[str, NodePolicy]:
    """``exo_remote_settings.nodes: {name: {allowed_models: [globs], max_concurrent_streams: n, role: admin}}``."""
    nodes = settings.get("nodes") or {}
    if not isinstance(nodes, Mapping):
        raise ConfigError(f"{path}: exo_remote_settings.nodes must map node names to rules")
    policies: dict[str, NodePolicy] = {}
    for name, rules in nodes.items():
        where = f"{path}: exo_remote_settings.nodes.{name}"
        if not isinstance(rules, Mapping):
            raise ConfigError(f"{where}: must be a mapping")
        reject_unknown_keys(where, rules, _NODE_RULE_KEYS)
        allowed = rules.get("allowed_models") or []
        limit = rules.get("max_concurrent_streams")
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            raise ConfigError(f"{where}: allowed_models must be a list of alias patterns")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ConfigError(f"{where}: max_concurrent_streams must be a positive integer")
        role = rules.get("role", "user")
        if role not in NODE_ROLES:
            raise ConfigError(f"{where}: role must be one of {', '.join(NODE_ROLES)}")
        wait = _seconds(path, f"exo_remote_settings.nodes.{name}.queue_timeout", rules.get("queue_timeout"), zero=True)
        priority = rules.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool) or not -100 <= priority <= 100:
            raise ConfigError(f"{where}: priority must be an integer from -100 to 100")
        policies[str(name)] = NodePolicy(
            tuple(allowed), limit, admin=role == "admin", queue_timeout_s=wait, priority=priority
        )
    return policies


def reject_unknown_keys(where: str, mapping: Mapping[str, Any], valid: Collection[str]) -> None:
    for key in mapping:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}")
