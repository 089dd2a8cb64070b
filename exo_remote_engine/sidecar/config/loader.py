"""The sidecar's model configuration: LiteLLM proxy ``config.yaml`` or a JSON alias map.

Both formats resolve to :class:`ModelEntry` objects. Everything wrong with a file is
found at startup and reported as one :class:`ConfigError` naming the file and the entry,
so the process exits non-zero before it ever listens. Secrets are resolved here and kept
out of every ``repr``; :attr:`SidecarConfig.secrets` (keys, header values, URL
credentials) feeds the process's secret registry (:mod:`exo_remote_engine.contract.redaction`).

This module reads a file and says which keys it does not act on; the types are
:mod:`~exo_remote_engine.sidecar.config.types` (re-exported here), the model entries
:mod:`~exo_remote_engine.sidecar.config.models`, the settings sections
:mod:`~exo_remote_engine.sidecar.config.sections`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exo_remote_engine.sidecar.config.models import entries_from_alias_map, entries_from_proxy_config
from exo_remote_engine.sidecar.config.sections import (
    parse_fallbacks,
    parse_master_key,
    parse_node_policies,
    parse_node_quotas,
    parse_num_retries,
    parse_queue_timeout,
    parse_router_settings,
    reject_unknown_keys,
)
from exo_remote_engine.sidecar.config.types import (
    EMBEDDED_ALIAS,
    EMBEDDED_PROVIDER,
    MASTER_KEY_NODE,
    ConfigError,
    ModelEntry,
    NodeQuota,
    RouterSettings,
    SidecarConfig,
    duration_seconds,
    embedded_entry,
    read_operator_file,
)

__all__ = [
    "EMBEDDED_ALIAS",
    "EMBEDDED_PROVIDER",
    "MASTER_KEY_NODE",
    "ConfigError",
    "ModelEntry",
    "NodeQuota",
    "RouterSettings",
    "SidecarConfig",
    "duration_seconds",
    "embedded_entry",
    "load_config",
]


# Top-level sections and the keys in them the sidecar acts on; anything else is named in
# one startup warning (SidecarConfig.not_acted_on).
_TOP_LEVEL = ("model_list", "router_settings", "litellm_settings", "general_settings", "exo_remote_settings")
_ROUTER_SETTINGS_ACTED = (
    "routing_strategy",
    "allowed_fails",
    "cooldown_time",
    "num_retries",
    "fallbacks",
    "ttft_timeout",
    "hedge_after",
    "context_window_fallbacks",
)
_LITELLM_SETTINGS_ACTED = ("num_retries", "fallbacks", "context_window_fallbacks")
_GENERAL_SETTINGS_ACTED = ("master_key",)
# Every key exo_remote_settings and a node's rules may hold: anything else is a typo that
# would otherwise silently mean "no rule" (an unrestricted node).
_SETTINGS_KEYS = ("default_model", "nodes", "fallbacks", "num_retries", "queue_timeout")


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """Load and validate ``path`` (YAML or JSON); no path means the embedded default."""
    env = os.environ if environ is None else environ
    if path is None:
        return SidecarConfig(models=(embedded_entry(),), default_model=EMBEDDED_ALIAS)
    text = read_operator_file(path, "config file")
    raw = _parse(path, text)
    secrets: set[str] = set()
    ignored: list[str] = []
    master_key: str | None = None
    router = RouterSettings()
    if isinstance(raw, Mapping) and "model_list" in raw:
        entries = entries_from_proxy_config(path, raw, env, secrets, ignored)
        settings = raw.get("exo_remote_settings") or {}
        ignored[:0] = _not_acted_on_sections(path, raw)
        router = parse_router_settings(path, raw)
        master_key = parse_master_key(path, raw, env, secrets)
    elif isinstance(raw, Mapping):
        alias_map = raw.get("models", raw)
        entries = entries_from_alias_map(path, alias_map, env, secrets)
        settings = raw.get("exo_remote_settings") or {}  # wrapped or beside the aliases
    else:
        raise ConfigError(f"{path}: expected a mapping with model_list or model aliases")
    if not entries:
        raise ConfigError(f"{path}: no models configured")
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{path}: exo_remote_settings must be a mapping")
    reject_unknown_keys(f"{path}: exo_remote_settings", settings, _SETTINGS_KEYS)
    default = str(settings.get("default_model") or entries[0].alias)
    if default not in {e.alias for e in entries}:
        raise ConfigError(f"{path}: default_model {default!r} is not a configured alias")
    groups: dict[str, list[ModelEntry]] = {}
    for entry in entries:
        groups.setdefault(entry.alias, []).append(entry)
    return SidecarConfig(
        tuple(group[0] for group in groups.values()),
        default,
        frozenset(secrets),
        path,
        parse_node_policies(path, settings),
        parse_fallbacks(path, raw, settings, set(groups)),
        parse_num_retries(path, raw, settings),
        {alias: tuple(group) for alias, group in groups.items() if len(group) > 1},
        router,
        parse_node_quotas(path, settings),
        master_key,
        tuple(ignored),
        parse_queue_timeout(path, settings),
        parse_fallbacks(path, raw, settings, set(groups), key="context_window_fallbacks"),
    )


def _not_acted_on_sections(path: Path, raw: Mapping[str, Any]) -> list[str]:
    """Top-level keys and keys of LiteLLM's settings sections the sidecar does nothing with."""
    found = [str(k) for k in raw if k not in _TOP_LEVEL]
    for section, acted in (
        ("router_settings", _ROUTER_SETTINGS_ACTED),
        ("litellm_settings", _LITELLM_SETTINGS_ACTED),
        ("general_settings", _GENERAL_SETTINGS_ACTED),
    ):
        block = raw.get(section)
        if block is None:
            continue
        if not isinstance(block, Mapping):
            raise ConfigError(f"{path}: {section} must be a mapping")
        found.extend(f"{section}.{k}" for k in block if k not in acted)
    return found


def _parse(path: Path, text: str) -> Any:
    if path.suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=_reject_duplicate_keys(path))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from exc
    import yaml  # the sidecar extra ships PyYAML; JSON configs need nothing more

    class _Loader(yaml.SafeLoader):
        pass

    def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            if key in out:
                raise ConfigError(f"{path}: line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            out[key] = loader.construct_object(value_node, deep=True)  # type: ignore[no-untyped-call]
        return out

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from exc


def _reject_duplicate_keys(path: Path) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"{path}: duplicate key {key!r} (aliases must be unique)")
            out[key] = value
        return out

    return hook
