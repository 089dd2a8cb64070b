"""Sidecar configs as a user writes them: LiteLLM proxy ``model_list`` entries pointing at
a test upstream, the key referenced through the environment (``os.environ/...``), plus
optional ``exo_remote_settings``. The one writer of such entries for the suite."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path

# The variable every test config reads the upstream key from; tests set it (often to the
# planted key, tests.conftest.PLANTED_KEY) so the key reaches the sidecar only that way.
KEY_ENV = "TEST_UPSTREAM_KEY"


def deployment(alias: str, model: str, url: str, price: tuple[float, float] | None = None, **params: object) -> str:
    """One ``model_list`` entry: ``alias`` served by ``openai/<model>`` at ``url``/v1, with
    extra ``litellm_params`` (``rpm=5``, ``weight=2``, ...); ``price``: the operator's
    (input, output) cost per token."""
    if price is not None:
        params = {"input_cost_per_token": price[0], "output_cost_per_token": price[1], **params}
    lines = [
        f"  - model_name: {alias}",
        "    litellm_params:",
        f"      model: openai/{model}",
        f"      api_base: {url}/v1",
        f"      api_key: os.environ/{KEY_ENV}",
        *(f"      {k}: {_scalar(v)}" for k, v in params.items()),
    ]
    return "\n".join(lines) + "\n"


def _scalar(value: object) -> str:
    """A YAML scalar; floats in fixed point (YAML 1.1 reads ``1e-06`` as a string)."""
    return format(Decimal(repr(value)), "f") if isinstance(value, float) else str(value)


def write_config(path: Path, upstream_url: str, aliases: Iterable[str], settings: str = "") -> Path:
    """A LiteLLM proxy config, each alias its own model at the upstream, plus optional
    ``exo_remote_settings`` YAML lines, e.g. ``"  num_retries: 0\\n"``."""
    text = "model_list:\n" + "".join(deployment(alias, alias, upstream_url) for alias in aliases)
    if settings:
        text += "exo_remote_settings:\n" + settings
    path.write_text(text)
    return path


def write_proxy_config(path: Path, upstream_url: str, aliases: Iterable[str]) -> Path:
    """:func:`write_config` without exo_remote_settings: a plain LiteLLM proxy config."""
    return write_config(path, upstream_url, aliases)
