"""Hooks on ``exo.topology.device_capabilities``: how a node describes itself.

On Linux exo's ``device_capabilities`` imports tinygrad. A remote node describes itself
instead (label ``remote LLM``, short enough for exo's TUI; its sidecar and ready models in
``chip``, where exo shows device detail; memory never 0, which hangs exo's partitioner). A
local-engine node with the add-on keeps exo's description and only falls back to psutil
when tinygrad cannot be imported.
"""

from __future__ import annotations

import platform
from typing import Any

from exo_remote_engine.engine.cluster import REMOTE_NODE_LABEL, remote_chip
from exo_remote_engine.engine.exo_hooks.plan import Needs, Patch, Target
from exo_remote_engine.engine_adapter import shared_engine

DEVICE = "exo.topology.device_capabilities"
MIN_MEMORY_MB = 1024  # exo's TUI shows memory // 1024 GB; its partitioner divides by it


def _memory_mb() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total // 2**20)
    except Exception:
        return MIN_MEMORY_MB


def _describe(model: str, chip: str, memory_mb: int) -> Any:
    from exo.topology import device_capabilities as dc

    return dc.DeviceCapabilities(model=model, chip=chip, memory=memory_mb, flops=dc.DeviceFlops(fp32=0, fp16=0, int8=0))


async def remote_device_capabilities(original: Any) -> Any:
    """The remote node's description (exo's own is never asked: it would import tinygrad)."""
    engine = shared_engine()
    ready = [k for k, m in engine.catalog.models.items() if m.ready]
    chip = remote_chip(engine.target.address, ready, len(engine.catalog.models))
    return _describe(REMOTE_NODE_LABEL, chip, max(_memory_mb(), MIN_MEMORY_MB))


async def local_device_capabilities(original: Any) -> Any:
    """exo's description; without tinygrad (a dummy node, say), psutil's instead of a crash."""
    try:
        return await original()
    except ImportError:
        return _describe(f"{platform.system()} box (no tinygrad)", platform.machine() or "CPU", _memory_mb())


NEEDS = [
    Needs(Target(DEVICE, "DeviceCapabilities"), params=("model", "chip", "memory", "flops")),
    Needs(Target(DEVICE, "DeviceFlops"), params=("fp32", "fp16", "int8")),
]
REMOTE_PATCHES = [Patch(Target(DEVICE, "device_capabilities"), remote_device_capabilities)]
LOCAL_PATCHES = [Patch(Target(DEVICE, "device_capabilities"), local_device_capabilities)]
