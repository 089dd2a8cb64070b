"""The sidecar's model configuration: LiteLLM proxy ``config.yaml`` or a JSON alias map.

Both formats resolve to :class:`ModelEntry` objects. Everything wrong with a file is
found at startup and reported as one :class:`ConfigError` naming the file and the entry,
so the process exits non-zero before it ever listens. Secrets are resolved here and kept
out of every ``repr``; :attr:`SidecarConfig.secrets` (keys, header values, URL
credentials) feeds the process's secret registry (:mod:`exo_remote_engine.redaction`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exo_remote_engine.redaction import url_credentials
from exo_remote_engine.sidecar.policy import NodePolicy

EMBEDDED_ALIAS = "embedded-echo"
EMBEDDED_PROVIDER = "embedded"
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


@dataclass(frozen=True)
class SidecarConfig:
    models: tuple[ModelEntry, ...]
    default_model: str
    secrets: frozenset[str] = field(repr=False, default_factory=frozenset)
    path: Path | None = None
    node_policies: Mapping[str, NodePolicy] = field(default_factory=dict)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    num_retries: int = 1

    def get(self, alias: str) -> ModelEntry | None:
        return next((m for m in self.models if m.alias == alias), None)


def embedded_entry() -> ModelEntry:
    """A model that needs no key and no network: LiteLLM's mock transport echoing the
    conversation. It exists so a fresh machine can run the whole path end to end."""
    return ModelEntry(
        alias=EMBEDDED_ALIAS,
        litellm_model="openai/embedded-echo",
        provider=EMBEDDED_PROVIDER,
        source="embedded",
        display_name="Embedded echo (offline)",
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
    if isinstance(raw, Mapping) and "model_list" in raw:
        entries = _from_proxy_config(path, raw, env, secrets)
        settings = raw.get("exo_remote_settings") or {}
    elif isinstance(raw, Mapping):
        alias_map = raw.get("models", raw)
        entries = _from_alias_map(path, alias_map, env, secrets)
        settings = raw.get("exo_remote_settings") or {} if "models" in raw else {}
    else:
        raise ConfigError(f"{path}: expected a mapping with model_list or model aliases")
    if not entries:
        raise ConfigError(f"{path}: no models configured")
    if not isinstance(settings, Mapping):
        raise ConfigError(f"{path}: exo_remote_settings must be a mapping")
    default = str(settings.get("default_model") or entries[0].alias)
    if default not in {e.alias for e in entries}:
        raise ConfigError(f"{path}: default_model {default!r} is not a configured alias")
    return SidecarConfig(
        tuple(entries),
        default,
        frozenset(secrets),
        path,
        _node_policies(path, settings),
        _fallbacks(path, raw, settings, {e.alias for e in entries}),
        _num_retries(path, raw, settings),
    )


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
        allowed = rules.get("allowed_models") or []
        limit = rules.get("max_concurrent_streams")
        if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
            raise ConfigError(f"{where}: allowed_models must be a list of alias patterns")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ConfigError(f"{where}: max_concurrent_streams must be a positive integer")
        policies[str(name)] = NodePolicy(tuple(allowed), limit)
    return policies


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
    path: Path, raw: Mapping[str, Any], env: Mapping[str, str], secrets: set[str]
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
        entries.append(_entry(where, alias, resolved, info))
    _check_unique(path, entries)
    return entries


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
                f"{path}: duplicate alias {e.alias!r} (load-balanced deployment groups are "
                "not supported; give each deployment its own model_name)"
            )
        seen.add(e.alias)


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _bool_or_none(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None
