"""A config's models: ``model_list`` deployments and alias-map entries, their params
(secrets resolved and recorded, LiteLLM router params taken out), ``model_info`` and the
provider each one names. Part of :mod:`~exo_remote_engine.sidecar.config.loader`.
"""

from __future__ import annotations

import math
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from exo_remote_engine.contract.redaction import url_credentials
from exo_remote_engine.sidecar.config.types import ConfigError, ModelEntry, is_number

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
_PRICE_PARAMS = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
)
_PRICING_MODEL_INFO = ("id", "base_model", "mode", *_PRICE_PARAMS)
# litellm_params that configure LiteLLM's Router, not the provider call: taken out of the
# params sent to the provider. The first three are acted on; the rest are named at startup.
_ROUTER_PARAMS_ACTED = ("rpm", "tpm", "weight", "ttft_timeout", "hedge_after")
_ROUTER_PARAMS_IGNORED = ("order", "max_parallel_requests", "region_name", "tags")
_MODEL_INFO_TOKEN_COUNTS = ("max_input_tokens", "max_tokens", "max_output_tokens")
_MODEL_INFO_FLAGS = ("supports_function_calling", "supports_vision")
_TIMEOUT_PARAMS = ("timeout", "stream_timeout")


def entries_from_proxy_config(
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
        resolved = {k: resolve_value(v, env, where, k, secrets) for k, v in params.items()}
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
    if weight is not None and (not is_number(weight) or weight <= 0):
        raise ConfigError(f"{where}: litellm_params.weight must be a positive number")
    for key in ("ttft_timeout", "hedge_after"):
        value = router.get(key)
        if value is not None and (not is_number(value) or not 0 < value < math.inf):
            raise ConfigError(f"{where}: litellm_params.{key} must be a positive number of seconds")
    for key, (section, value) in prices.items():
        if not is_number(value) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"{where}: {section}.{key} must be a finite number, 0 or more (USD per token)")
    base_model = info.get("base_model")
    return replace(
        _entry(where, alias, params, info),
        deployment=str(info.get("id") or ""),
        rpm=router.get("rpm"),
        tpm=router.get("tpm"),
        weight=float(weight) if weight is not None else None,
        ttft_timeout_s=_float_or_none(router.get("ttft_timeout")),
        hedge_after_s=_float_or_none(router.get("hedge_after")),
        base_model=str(base_model) if base_model else None,
        input_cost_per_token=_float_or_none(prices.get("input_cost_per_token", ("", None))[1]),
        output_cost_per_token=_float_or_none(prices.get("output_cost_per_token", ("", None))[1]),
        cache_read_input_token_cost=_float_or_none(prices.get("cache_read_input_token_cost", ("", None))[1]),
        cache_creation_input_token_cost=_float_or_none(prices.get("cache_creation_input_token_cost", ("", None))[1]),
    )


def entries_from_alias_map(path: Path, alias_map: Any, env: Mapping[str, str], secrets: set[str]) -> list[ModelEntry]:
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
        resolved = {k: resolve_value(v, env, where, k, secrets) for k, v in spec.items()}
        entries.append(_entry(where, str(alias), resolved, {}))
    _check_unique(path, entries)
    return entries


def resolve_value(value: Any, env: Mapping[str, str], where: str, key: str, secrets: set[str]) -> Any:
    """Expand ``os.environ/VAR`` and ``${VAR}`` (inside ``extra_headers`` too); a missing
    variable is an error, not None. Values that will be sent as credentials (secret-named
    params, every header value, user info in URLs) go into ``secrets``."""
    if isinstance(value, Mapping):
        resolved = {k: resolve_value(v, env, where, f"{key}.{k}", secrets) for k, v in value.items()}
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
    _refuse_wildcard(where, alias, str(params.get("model", "")))
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


def _refuse_wildcard(where: str, alias: str, model: str) -> None:
    """LiteLLM's proxy routes any model id to a ``*`` / ``openai/*`` entry. The sidecar
    serves only ids it can list, check and bill, so such an entry would be taken as a model
    literally named ``*`` that fails every request: refused here, with what to write instead."""
    if "*" in alias or "*" in model:
        raise ConfigError(
            f"{where}: wildcard entries (model_name {alias!r}, model {model!r}) are not supported: the sidecar "
            "serves only the models it names. Write one entry per model, e.g. model_name: gpt-4o-mini with "
            "litellm_params.model: openai/gpt-4o-mini, or run without --config and let discovery list what "
            "your keys open (exo-remote models --all)"
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
        if value is not None and (not is_number(value) or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"{where}: litellm_params.{key} must be a positive number of seconds (got {value!r})")
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: litellm_params.{key} must be a finite number")


def _check_model_info(where: str, info: Mapping[str, Any]) -> None:
    for key, value in info.items():
        if is_number(value) and (not math.isfinite(value) or value < 0):
            raise ConfigError(f"{where}: model_info.{key} must be a finite number, 0 or more (got {value!r})")
    for key in _MODEL_INFO_TOKEN_COUNTS:
        value = info.get(key)
        if value is not None and not (is_number(value) and value == int(value) and value >= 1):
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
    return float(value) if is_number(value) else None


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _bool_or_none(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None
