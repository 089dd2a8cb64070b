"""Hooks on ``exo.inference``: the engine registry and the tokenizer resolver.

exo picks engines with an if/elif over known names and resolves tokenizers from Hugging
Face; the remote engine and its stateless tokenizer are added beside exo's own, which are
untouched for every other name and repository.
"""

from __future__ import annotations

from typing import Any

from exo_remote_engine.engine.catalog import REPO_PREFIX
from exo_remote_engine.engine.exo_argv import ENGINE_NAME
from exo_remote_engine.engine.exo_hooks.plan import Patch, Target
from exo_remote_engine.engine_adapter import ENGINE_CLASS_NAME, shared_engine

INFERENCE_ENGINE = "exo.inference.inference_engine"
TOKENIZERS = "exo.inference.tokenizers"


def get_inference_engine(original: Any, inference_engine_name: str, shard_downloader: Any) -> Any:
    """``remote`` is the process's one shared remote engine; other names are exo's."""
    if inference_engine_name == ENGINE_NAME:
        return shared_engine(shard_downloader)
    return original(inference_engine_name=inference_engine_name, shard_downloader=shard_downloader)


async def resolve_tokenizer(original: Any, repo_id: Any) -> Any:
    """A remote model's pseudo repository gets the remote tokenizer, never a download."""
    if isinstance(repo_id, str) and repo_id.startswith(REPO_PREFIX):
        return shared_engine().tokenizer
    return await original(repo_id=repo_id)


# Every add-on node builds remote models' prompts (the API node may relay them).
TOKENIZER_PATCHES = [Patch(Target(TOKENIZERS, "resolve_tokenizer"), resolve_tokenizer, params=("repo_id",))]
# Only a node started with ``--inference-engine remote``.
ENGINE_PATCHES = [
    Patch(Target(INFERENCE_ENGINE, "inference_engine_classes"), dict_key=ENGINE_NAME, value=ENGINE_CLASS_NAME),
    Patch(
        Target(INFERENCE_ENGINE, "get_inference_engine"),
        get_inference_engine,
        params=("inference_engine_name", "shard_downloader"),
    ),
]
