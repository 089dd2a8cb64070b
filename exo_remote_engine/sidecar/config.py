"""The sidecar's model configuration: LiteLLM proxy ``config.yaml`` or a JSON alias map.

Both formats resolve to :class:`ModelEntry` objects. Everything wrong with a file is
found at startup and reported as one :class:`ConfigError` naming the file and the entry,
so the process exits non-zero before it ever listens. Secrets are resolved here and kept
out of every ``repr``; :attr:`SidecarConfig.secrets` (keys, header values, URL
credentials) feeds the process's secret registry (:mod:`exo_remote_engine.redaction`).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exo_remote_engine.redaction import url_credentials
from exo_remote_engine.sidecar.policy import NodePolicy

EMBEDDED_ALIAS = "embedded-echo"
EMBEDDED_PROVIDER = "embedded"
ECHO_DISPLAY_NAME = (
    "Embedded echo: repeats your last message, not a language model"
    " (pip install '.[local]' for a real offline model)"
)
_ENV_PREFIX = "os.environ/"
_DOLLAR_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_KEY_HINTS = ("key", "secret", "token", "password", "credential")
# Params that may carry where and how to reach a provider; never sent to clients.
_ALLOWED_MODEL_INFO = (
    "max_input_tokens",
    "max_tokens",
    "max_output_tokens",
    "supports_function_calling",
    "supports_vision",
    "display_name",
)
# model_info keys acted on besides the capabilities above (LiteLLM's names).
_PRICING_MODEL_INFO = ("id", "base_model", "input_cost_per_token", "output_cost_per_token", "mode")
# litellm_params that configure LiteLLM's Router, not the provider call: taken out of the
# params sent to the provider. The first three are acted on; the rest are named at startup.
_ROUTER_PARAMS_ACTED = ("rpm", "tpm", "weight")
_ROUTER_PARAMS_IGNORED = ("order", "max_parallel_requests", "region_name", "tags")
_PRICE_PARAMS = ("input_cost_per_token", "output_cost_per_token")
# Top-level sections and the keys in them the sidecar acts on; anything else is named in
# one startup warning (SidecarConfig.not_acted_on).
_TOP_LEVEL = ("model_list", "router_settings", "litellm_settings", "general_settings", "exo_remote_settings")
_ROUTER_SETTINGS_ACTED = ("routing_strategy", "allowed_fails", "cooldown_time", "num_retries", "fallbacks")
_LITELLM_SETTINGS_ACTED = ("num_retries", "fallbacks")
_GENERAL_SETTINGS_ACTED = ("master_key",)
ROUTING_STRATEGIES = (
    "simple-shuffle",
    "least-busy",
    "latency-based-routing",
    "usage-based-routing",
    "usage-based-routing-v2",
)
MASTER_KEY_NODE = "master-key"
# Every key exo_remote_settings and a node's rules may hold: anything else is a typo that
# would otherwise silently mean "no rule" (an unrestricted node).
_SETTINGS_KEYS = ("default_model", "nodes", "fallbacks", "num_retries")
_NODE_RULE_KEYS = ("allowed_models", "max_concurrent_streams", "rpm", "tpm", "max_budget", "budget_duration")
_MODEL_INFO_TOKEN_COUNTS = ("max_input_tokens", "max_tokens", "max_output_tokens")
_MODEL_INFO_FLAGS = ("supports_function_calling", "supports_vision")
_TIMEOUT_PARAMS = ("timeout", "stream_timeout")


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the file."""


@dataclass(frozen=True)
class ModelEntry:
    """One model alias and how LiteLLM reaches it. ``params`` may hold secrets."""

    alias: str
    litellm_model: str
    provider: str
    params: Mapping[str, Any] = field(repr=False, default_factory=dict)
    source: str = "config"
    display_name: str = ""
    context_window: int | None = None
    max_output_tokens: int | None = None
    supports_tools: bool | None = None
    supports_images: bool | None = None
    # Deployment-group facts (LiteLLM Router's): which member of its group this is, its
    # limits and weight, and prices that override LiteLLM's cost map.
    deployment: str = ""
    rpm: int | None = None
    tpm: int | None = None
    weight: float | None = None
    base_model: str | None = None
    input_cost_per_token: float | None = None
    output_cost_per_token: float | None = None

    @property
    def deployment_name(self) -> str:
        return self.deployment or self.alias


@dataclass(frozen=True)
class RouterSettings:
    """LiteLLM's ``router_settings`` the sidecar acts on (LiteLLM's defaults)."""

    routing_strategy: str = "simple-shuffle"
    allowed_fails: int = 3
    cooldown_time_s: float = 5.0


@dataclass(frozen=True)
class NodeQuota:
    """Per-node traffic and spend limits: ``exo_remote_settings.nodes.<name>``'s ``rpm``,
    ``tpm``, ``max_budget`` (USD) and ``budget_duration`` (LiteLLM's key fields)."""

    rpm: int | None = None
    tpm: int | None = None
    max_budget: float | None = None
    budget_duration: str | None = None

    @property
    def budget_duration_s(self) -> float | None:
        return duration_seconds(self.budget_duration) if self.budget_duration else None


@dataclass(frozen=True)
class SidecarConfig:
    models: tuple[ModelEntry, ...]
    default_model: str
    secrets: frozenset[str] = field(repr=False, default_factory=frozenset)
    path: Path | None = None
    node_policies: Mapping[str, NodePolicy] = field(default_factory=dict)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    num_retries: int = 1
    # alias -> every deployment of that model_name (models holds the first of each).
    groups: Mapping[str, tuple[ModelEntry, ...]] = field(default_factory=dict)
    router: RouterSettings = field(default_factory=RouterSettings)
    node_quotas: Mapping[str, NodeQuota] = field(default_factory=dict)
    master_key: str | None = field(default=None, repr=False)
    not_acted_on: tuple[str, ...] = ()

    def get(self, alias: str) -> ModelEntry | None:
        return next((m for m in self.models if m.alias == alias), None)

    def deployments(self, entry: ModelEntry) -> tuple[ModelEntry, ...]:
        """The deployment group ``entry`` heads (itself alone when it is not grouped)."""
        group = self.groups.get(entry.alias) if entry.source == "config" else None
        return group if group else (entry,)


def embedded_entry() -> ModelEntry:
    """A model that needs no key and no network: LiteLLM's mock transport echoing the
    conversation. It exists so a fresh machine can run the whole path end to end; with the
    ``[local]`` extra the sidecar serves a real offline model instead (see
    :mod:`~exo_remote_engine.sidecar.embedded_model`), and without it this one says so."""
    return ModelEntry(
        alias=EMBEDDED_ALIAS,
        litellm_model="openai/embedded-echo",
        provider=EMBEDDED_PROVIDER,
        source="embedded",
        display_name=ECHO_DISPLAY_NAME,
        context_window=32768,
        max_output_tokens=4096,
        supports_tools=False,
        supports_images=False,
    )


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> SidecarConfig:
    """Load and validate ``path`` (YAML or JSON); no path means the embedded default."""
    env = os.environ if environ is None else environ
    if path is None:
        return SidecarConfig(models=(embedded_entry(),), default_model=EMBEDDED_ALIAS)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read config file: not UTF-8 text (byte {exc.start})") from exc
    raw = _parse(path, text)
    secrets: set[str] = set()
    ignored: list[str] = []
    master_key: str | None = None
    router = RouterSettings()
    if isinstance(raw, Mapping) and "model_list" in raw:
        entries = _from_proxy_config(path, raw, env, secrets, ignored)
        settings = raw.get("exo_remote_settings") or {}
        ignored[:0] = _not_acted_on_sections(path, raw)
        router = _router_settings(path, raw)
        master_key = _master_key(path, raw, env, secrets)
    elif isinstance(raw, Mapping):
        alias_map = raw.get("models", raw)
        entries = _from_alias_map(path, alias_map, env, secrets)
        settings = raw.get("exo_remote_settings") or {}  # wrapped or beside the aliases
    else:
        raise ConfigError(f"{path}: expected a mapping with model_list or model aliases")
    if not entries:
        raise ConfigError(f"{path}: no models configured")
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{path}: exo_remote_settings must be a mapping")
    _reject_unknown_keys(f"{path}: exo_remote_settings", settings, _SETTINGS_KEYS)
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
        _node_policies(path, settings),
        _fallbacks(path, raw, settings, set(groups)),
        _num_retries(path, raw, settings),
        {alias: tuple(group) for alias, group in groups.items() if len(group) > 1},
        router,
        _node_quotas(path, settings),
        master_key,
        tuple(ignored),
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


def _router_settings(path: Path, raw: Mapping[str, Any]) -> RouterSettings:
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
    if not _is_number(cooldown) or cooldown < 0:
        raise ConfigError(f"{path}: router_settings.cooldown_time must be a non-negative number of seconds")
    return RouterSettings(str(strategy), fails, float(cooldown))


def _master_key(path: Path, raw: Mapping[str, Any], env: Mapping[str, str], secrets: set[str]) -> str | None:
    """``general_settings.master_key``: an accepted bearer token (see README), never ignored."""
    block = raw.get("general_settings") or {}
    value = block.get("master_key")
    if value is None:
        return None
    key = _resolve(value, env, f"{path}: general_settings", "master_key", secrets)
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f"{path}: general_settings.master_key must be a non-empty string")
    return key


def _node_quotas(path: Path, settings: Mapping[str, Any]) -> dict[str, NodeQuota]:
    """The ``rpm``/``tpm``/``max_budget``/``budget_duration`` keys of each node's rules."""
    quotas: dict[str, NodeQuota] = {}
    nodes = settings.get("nodes") or {}
    for name, rules in nodes.items() if isinstance(nodes, Mapping) else ():
        if not isinstance(rules, Mapping):
            continue  # _node_policies reports it
        where = f"{path}: exo_remote_settings.nodes.{name}"
        rpm, tpm, budget, duration = (rules.get(k) for k in ("rpm", "tpm", "max_budget", "budget_duration"))
        for key, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{where}: {key} must be a positive integer")
        if budget is not None and (not _is_number(budget) or not math.isfinite(budget) or budget < 0):
            raise ConfigError(f"{where}: max_budget must be a non-negative number (USD)")
        if duration is not None:
            if budget is None:
                raise ConfigError(f"{where}: budget_duration needs max_budget")
            try:
                duration_seconds(duration)
            except ValueError as exc:
                raise ConfigError(f"{where}: budget_duration: {exc}") from None
        if any(v is not None for v in (rpm, tpm, budget)):
            quotas[str(name)] = NodeQuota(rpm, tpm, float(budget) if budget is not None else None, duration)
    return quotas


_DURATION = re.compile(r"^(\d+)(s|m|h|d|w|mo)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}


def duration_seconds(text: Any) -> float:
    """LiteLLM's duration strings: ``30s``, ``30m``, ``24h``, ``7d``, ``2w``, ``1mo`` (30 days)."""
    match = _DURATION.match(str(text).strip()) if isinstance(text, str) else None
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration like 30s, 30m, 24h, 7d, 1mo")
    return float(int(match.group(1)) * _UNIT_S[match.group(2)])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fallbacks(
    path: Path, raw: Mapping[str, Any], settings: Mapping[str, Any], aliases: set[str]
) -> dict[str, tuple[str, ...]]:
    """Fallback aliases per alias: LiteLLM's ``litellm_settings``/``router_settings``
    ``fallbacks: [{alias: [other, ...]}]`` or ``exo_remote_settings.fallbacks: {alias: [...]}``."""
    found: dict[str, tuple[str, ...]] = {}
    sources: list[tuple[str, Any]] = []
    for section in ("litellm_settings", "router_settings"):
        block = raw.get(section) if isinstance(raw, Mapping) else None
        if isinstance(block, Mapping) and block.get("fallbacks"):
            sources.append((f"{section}.fallbacks", block["fallbacks"]))
    if settings.get("fallbacks"):
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


def _num_retries(path: Path, raw: Mapping[str, Any], settings: Mapping[str, Any]) -> int:
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


def _node_policies(path: Path, settings: Mapping[str, Any]) -> dict[str, NodePolicy]:
    """``exo_remote_settings.nodes: {name: {allowed_models: [globs], max_concurrent_streams: n}}``."""
    nodes = settings.get("nodes") or {}
    if not isinstance(nodes, Mapping):
        raise ConfigError(f"{path}: exo_remote_settings.nodes must map node names to rules")
    policies: dict[str, NodePolicy] = {}
    for name, rules in nodes.items():
        where = f"{path}: exo_remote_settings.nodes.{name}"
        if not isinstance(rules, Mapping):
            raise ConfigError(f"{where}: must be a mapping")
        _reject_unknown_keys(where, rules, _NODE_RULE_KEYS)
        allowed = rules.get("allowed_models") or []
        limit = rules.get("max_concurrent_streams")
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            raise ConfigError(f"{where}: allowed_models must be a list of alias patterns")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ConfigError(f"{where}: max_concurrent_streams must be a positive integer")
        policies[str(name)] = NodePolicy(tuple(allowed), limit)
    return policies


def _reject_unknown_keys(where: str, mapping: Mapping[str, Any], valid: Collection[str]) -> None:
    for key in mapping:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}")


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


def _from_proxy_config(
    path: Path, raw: Mapping[str, Any], env: Mapping[str, str], secrets: set[str], ignored: list[str]
) -> list[ModelEntry]:
    model_list = raw.get("model_list")
    if not isinstance(model_list, list):
        raise ConfigError(f"{path}: model_list must be a list")
    entries: list[ModelEntry] = []
    for i, item in enumerate(model_list):
        where = f"{path}: model_list[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("model_name"), str):
            raise ConfigError(f"{where}: needs model_name and litellm_params")
        alias = item["model_name"]
        where = f"{where} ({alias!r})"
        params = item.get("litellm_params")
        if not isinstance(params, Mapping) or not isinstance(params.get("model"), str):
            raise ConfigError(f"{where}: litellm_params.model is required")
        resolved = {k: _resolve(v, env, where, k, secrets) for k, v in params.items()}
        info = item.get("model_info") or {}
        if not isinstance(info, Mapping):
            raise ConfigError(f"{where}: model_info must be a mapping")
        ignored.extend(f"model_list[{i}].{k}" for k in item if k not in ("model_name", "litellm_params", "model_info"))
        ignored.extend(
            f"model_list[{i}].model_info.{k}"
            for k in info
            if k not in _ALLOWED_MODEL_INFO and k not in _PRICING_MODEL_INFO
        )
        ignored.extend(f"model_list[{i}].litellm_params.{k}" for k in _ROUTER_PARAMS_IGNORED if k in resolved)
        entries.append(_deployment(where, alias, resolved, info))
    return _name_deployments(path, entries)


def _name_deployments(path: Path, entries: list[ModelEntry]) -> list[ModelEntry]:
    """Members of a group without ``model_info.id`` are named ``alias#1``, ``alias#2``, ..."""
    sizes = {alias: sum(e.alias == alias for e in entries) for alias in {e.alias for e in entries}}
    counts: dict[str, int] = {}
    named: list[ModelEntry] = []
    for entry in entries:
        counts[entry.alias] = counts.get(entry.alias, 0) + 1
        if sizes[entry.alias] > 1 and not entry.deployment:
            entry = replace(entry, deployment=f"{entry.alias}#{counts[entry.alias]}")
        named.append(entry)
    names = [e.deployment_name for e in named]
    duplicated = sorted({n for n in names if names.count(n) > 1 and n in {e.deployment for e in named}})
    if duplicated:
        raise ConfigError(f"{path}: model_info.id {duplicated[0]!r} names two deployments")
    return named


def _deployment(where: str, alias: str, params: dict[str, Any], info: Mapping[str, Any]) -> ModelEntry:
    """One model_list item: router keys (rpm, tpm, weight, ...) and prices come out of the
    params that go to the provider."""
    router = {k: params.pop(k) for k in (*_ROUTER_PARAMS_ACTED, *_ROUTER_PARAMS_IGNORED) if k in params}
    prices = {k: ("litellm_params", params.pop(k)) for k in _PRICE_PARAMS if k in params}
    prices.update({k: ("model_info", info[k]) for k in _PRICE_PARAMS if k in info})  # model_info wins
    for key in ("rpm", "tpm"):
        value = router.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}: litellm_params.{key} must be a positive integer")
    weight = router.get("weight")
    if weight is not None and (not _is_number(weight) or weight <= 0):
        raise ConfigError(f"{where}: litellm_params.weight must be a positive number")
    for key, (section, value) in prices.items():
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}: {section}.{key} must be a finite number, 0 or more (USD per token)")
    base_model = info.get("base_model")
    return replace(
        _entry(where, alias, params, info),
        deployment=str(info.get("id") or ""),
        rpm=router.get("rpm"),
        tpm=router.get("tpm"),
        weight=float(weight) if weight is not None else None,
        base_model=str(base_model) if base_model else None,
        input_cost_per_token=_float_or_none(prices.get("input_cost_per_token", ("", None))[1]),
        output_cost_per_token=_float_or_none(prices.get("output_cost_per_token", ("", None))[1]),
    )


def _from_alias_map(path: Path, alias_map: Any, env: Mapping[str, str], secrets: set[str]) -> list[ModelEntry]:
    if not isinstance(alias_map, Mapping):
        raise ConfigError(f"{path}: models must map alias -> {{model, api_base, api_key}}")
    entries: list[ModelEntry] = []
    for alias, spec in alias_map.items():
        if alias == "exo_remote_settings":
            continue
        where = f"{path}: alias {alias!r}"
        if isinstance(spec, str):
            spec = {"model": spec}
        if not isinstance(spec, Mapping) or not isinstance(spec.get("model"), str):
            raise ConfigError(f'{where}: needs a model, e.g. {{"model": "openai/gpt-4o-mini"}}')
        resolved = {k: _resolve(v, env, where, k, secrets) for k, v in spec.items()}
        entries.append(_entry(where, str(alias), resolved, {}))
    _check_unique(path, entries)
    return entries


def _resolve(value: Any, env: Mapping[str, str], where: str, key: str, secrets: set[str]) -> Any:
    """Expand ``os.environ/VAR`` and ``${VAR}`` (inside ``extra_headers`` too); a missing
    variable is an error, not None. Values that will be sent as credentials (secret-named
    params, every header value, user info in URLs) go into ``secrets``."""
    if isinstance(value, Mapping):
        resolved = {k: _resolve(v, env, where, f"{key}.{k}", secrets) for k, v in value.items()}
        if key == "extra_headers":  # any header may carry a credential, whatever its name
            secrets.update(v for v in resolved.values() if isinstance(v, str) and v)
        return resolved
    if not isinstance(value, str):
        return value
    if value.startswith(_ENV_PREFIX):
        name = value[len(_ENV_PREFIX) :]
        if name not in env:
            raise ConfigError(f"{where}: {key} refers to environment variable {name}, not set")
        value = env[name]
    else:

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                raise ConfigError(f"{where}: {key} refers to ${{{name}}}, which is not set")
            return env[name]

        value = _DOLLAR_VAR.sub(sub, value)
    if any(hint in key.lower() for hint in _SECRET_KEY_HINTS) and value:
        secrets.add(value)
    secrets.update(url_credentials(value))
    return value


def _entry(where: str, alias: str, params: dict[str, Any], info: Mapping[str, Any]) -> ModelEntry:
    if not alias.strip():
        raise ConfigError(f"{where}: empty alias")
    _check_params(where, params)
    _check_model_info(where, info)
    model = params.pop("model")
    provider = provider_of(model, params.get("api_base"), where)
    return ModelEntry(
        alias=alias,
        litellm_model=model,
        provider=provider,
        params=params,
        display_name=str(info.get("display_name") or ""),
        context_window=_int_or_none(info.get("max_input_tokens")),
        max_output_tokens=_int_or_none(info.get("max_output_tokens", info.get("max_tokens"))),
        supports_tools=_bool_or_none(info.get("supports_function_calling")),
        supports_images=_bool_or_none(info.get("supports_vision")),
    )


def _check_params(where: str, params: Mapping[str, Any]) -> None:
    """Where the sidecar sends requests and how long it waits: http(s) only, and numbers
    that mean something (YAML's .inf and .nan are floats too)."""
    api_base = params.get("api_base")
    if api_base is not None:
        parsed = urllib.parse.urlsplit(str(api_base))
        if parsed.scheme.lower() not in ("http", "https") or not parsed.hostname:
            # Never echo the value: it may carry credentials.
            raise ConfigError(f"{where}: api_base must be an http:// or https:// URL with a host")
    for key in _TIMEOUT_PARAMS:
        value = params.get(key)
        if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"{where}: litellm_params.{key} must be a positive number of seconds (got {value!r})")
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: litellm_params.{key} must be a finite number")


def _check_model_info(where: str, info: Mapping[str, Any]) -> None:
    for key, value in info.items():
        if _is_number(value) and (not math.isfinite(value) or value < 0):
            raise ConfigError(f"{where}: model_info.{key} must be a finite number, 0 or more (got {value!r})")
    for key in _MODEL_INFO_TOKEN_COUNTS:
        value = info.get(key)
        if value is not None and not (_is_number(value) and value == int(value) and value >= 1):
            raise ConfigError(f"{where}: model_info.{key} must be a positive whole number of tokens (got {value!r})")
    for key in _MODEL_INFO_FLAGS:
        value = info.get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{where}: model_info.{key} must be true or false (got {value!r})")
    name = info.get("display_name")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}: model_info.display_name must be text")


def provider_of(model: str, api_base: Any, where: str) -> str:
    """LiteLLM's provider for ``model``; an unknown provider is a config error."""
    import litellm

    prefix = model.split("/", 1)[0] if "/" in model else None
    if prefix is not None and prefix in litellm.provider_list:
        return prefix
    try:
        # Index 1 only: the full result carries the API key from the environment.
        provider = litellm.get_llm_provider(model=model, api_base=api_base)[1]
    except Exception as exc:
        raise ConfigError(
            f"{where}: unknown provider for model {model!r}; "
            "prefix it with a LiteLLM provider, e.g. openai/, anthropic/, ollama/"
        ) from exc
    return str(provider)


def _check_unique(path: Path, entries: list[ModelEntry]) -> None:
    seen: set[str] = set()
    for e in entries:
        if e.alias in seen:
            raise ConfigError(
                f"{path}: duplicate alias {e.alias!r} (a deployment group needs the "
                "config.yaml form: several model_list entries with one model_name)"
            )
        seen.add(e.alias)


def _float_or_none(value: Any) -> float | None:
    return float(value) if _is_number(value) else None


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _bool_or_none(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None
