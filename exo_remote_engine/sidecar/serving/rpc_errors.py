"""Every servicer method's edge: a RemoteError becomes its rich status, anything else a
generic INTERNAL naming only the request id (the exception goes to the log, not the
client). A request id that is too long or not printable is refused here, first. One
place, so no method formats a status of its own; the reasons, codes and details themselves
are the table in :mod:`~exo_remote_engine.contract.errors`."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from exo_remote_engine.contract.errors import Reason, RemoteError, abort
from exo_remote_engine.contract.openai_chat import check_request_id
from exo_remote_engine.sidecar.telemetry.safe_logging import printable, safe_logger

log = safe_logger("exo_remote_engine.sidecar")

T = TypeVar("T")


def rpc_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn RemoteError into a rich status and anything unexpected into a generic INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Any) -> T:
        request_id = getattr(request, "request_id", "")
        try:
            check_request_id(request_id)  # before anything logs or stores it
        except RemoteError as refused:
            log.warning("request_id=(refused) failed reason=%s: %s", refused.reason.value, refused.message)
            await abort(context, refused)
        try:
            return await method(self, request, context)
        except RemoteError as exc:
            error = exc
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:
            log.exception("request_id=%s unexpected error", request_id)
            error = RemoteError(Reason.INTERNAL, f"internal error (request id {printable(request_id)})")
        log.warning(
            "request_id=%s failed reason=%s code=%s: %s",
            request_id,
            error.reason.value,
            error.grpc_code.name,
            error.message,  # every log record is redacted (install_log_redaction)
        )
        await abort(context, error)

    return wrapper
