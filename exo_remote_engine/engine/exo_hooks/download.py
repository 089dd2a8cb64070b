"""Hook on ``exo.download.new_shard_download``: a remote node downloads nothing.

For any engine but ``dummy`` exo builds its Hugging Face downloader, and tinychat's
``/modelpool`` then makes it contact huggingface.co for every card. A remote node gets a
downloader that reports its *ready* remote models as complete (0 of 0 bytes, which exo's
``/modelpool`` shows as downloaded) and nothing else: models that are not ready are not
downloadable and are left out of tinychat's lists (see :mod:`.api`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from exo_remote_engine.engine.catalog import repo_for
from exo_remote_engine.engine.exo_hooks.plan import Needs, Patch, Target
from exo_remote_engine.engine_adapter import shared_engine

NEW_SHARD_DOWNLOAD = "exo.download.new_shard_download"
REPO_PROGRESS_FIELDS = (
    "shard",
    "repo_id",
    "repo_revision",
    "completed_files",
    "total_files",
    "downloaded_bytes",
    "downloaded_bytes_this_session",
    "total_bytes",
    "overall_speed",
    "overall_eta",
    "file_progress",
    "status",
)


def ready_progress(shard: Any, alias: str) -> Any:
    """exo's progress event for a remote model that is ready: complete, nothing to fetch."""
    from exo.download.download_progress import RepoProgressEvent

    return RepoProgressEvent(
        shard=shard,
        repo_id=repo_for(alias),
        repo_revision="remote",
        completed_files=0,
        total_files=0,
        downloaded_bytes=0,
        downloaded_bytes_this_session=0,
        total_bytes=0,
        overall_speed=0,
        overall_eta=timedelta(0),
        file_progress={},
        status="complete",
    )


class RemoteShardDownloader:
    """exo's shard-downloader interface for a node whose models live behind a sidecar."""

    async def ensure_shard(self, shard: Any, inference_engine_name: str) -> Path:
        return Path("/dev/null")

    @property
    def on_progress(self) -> Any:
        from exo.helpers import AsyncCallbackSystem

        return AsyncCallbackSystem()

    async def get_shard_download_status(self, inference_engine_name: str) -> AsyncIterator[tuple[Path, Any]]:
        from exo.models import build_full_shard

        for exo_id, model in list(shared_engine().catalog.models.items()):
            shard = build_full_shard(exo_id, inference_engine_name) if model.ready else None
            if shard is not None:
                yield Path("/dev/null"), ready_progress(shard, model.alias)


def new_shard_downloader(original: Any, max_parallel_downloads: int = 8) -> Any:
    """Never exo's Hugging Face downloader on a remote node."""
    return RemoteShardDownloader()


NEEDS = [
    Needs(Target("exo.download.download_progress", "RepoProgressEvent"), params=REPO_PROGRESS_FIELDS),
    Needs(Target("exo.models", "build_full_shard"), params=("model_id", "inference_engine_classname")),
    Needs(Target("exo.helpers", "AsyncCallbackSystem")),
]
PATCHES = [Patch(Target(NEW_SHARD_DOWNLOAD, "new_shard_downloader"), new_shard_downloader)]
