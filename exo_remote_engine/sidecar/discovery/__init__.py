"""Dynamic model discovery (see :mod:`.service`); the names the sidecar and its tests use."""

from exo_remote_engine.sidecar.discovery.service import (
    PROVIDERS,
    DiscoveredModel,
    ModelDiscovery,
    ServerSpec,
    SourceStatus,
    choose_default,
    is_chat_model,
    known_chat_models,
    merge,
)

__all__ = [
    "PROVIDERS",
    "DiscoveredModel",
    "ModelDiscovery",
    "ServerSpec",
    "SourceStatus",
    "choose_default",
    "is_chat_model",
    "known_chat_models",
    "merge",
]
