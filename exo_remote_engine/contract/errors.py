"""The one error contract shared by the sidecar and the exo side.

One table maps every failure reason to a gRPC status code (what the sidecar sends) and
an HTTP status (what exo's OpenAI-compatible API answers). The same table is read in
both directions: the sidecar turns a :class:`RemoteError` into a gRPC status with
google.rpc details in the trailers, and the client turns that status back into the same
:class:`RemoteError`. Messages are written by us, never copied from a provider verbatim,
and everything a status carries goes through the process's one redactor
(:mod:`exo_remote_engine.contract.redaction`) on its way out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, NoReturn

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from exo_remote_engine.contract.redaction import redact

ERROR_DOMAIN = "exo-remote-engine"
MAX_RETRY_AFTER_S = 86400.0  # the longest wait a status carries
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class Reason(StrEnum):
    """Why a call failed; travels as google.rpc.ErrorInfo.reason."""

    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    MODEL_NOT_READY = "MODEL_NOT_READY"
    INVALID_REQUEST = "INVALID_REQUEST"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    CONTEXT_WINDOW_EXCEEDED = "CONTEXT_WINDOW_EXCEEDED"
    CONTENT_POLICY = "CONTENT_POLICY"
    PROVIDER_AUTH_FAILED = "PROVIDER_AUTH_FAILED"
    PROVIDER_NOT_FOUND = "PROVIDER_NOT_FOUND"
    RATE_LIMITED = "RATE_LIMITED"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    SPEND_DATABASE_UNAVAILABLE = "SPEND_DATABASE_UNAVAILABLE"
    OVERLOADED = "OVERLOADED"
    PROVIDER_UNAVAILABLE = "PROVIDER_UNAVAILABLE"
    PROVIDER_TIMEOUT = "PROVIDER_TIMEOUT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    SIDECAR_UNAVAILABLE = "SIDECAR_UNAVAILABLE"
    CANCELLED = "CANCELLED"
    CLIENT_STALLED = "CLIENT_STALLED"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True)
class _Kind:
    grpc_code: grpc.StatusCode
    http_status: int
    retryable: bool
    openai_type: str


# The table. Provider auth failures are FAILED_PRECONDITION, not UNAUTHENTICATED: the
# latter would blame the exo node's own sidecar token.
_TABLE: dict[Reason, _Kind] = {
    Reason.MODEL_NOT_FOUND: _Kind(grpc.StatusCode.NOT_FOUND, 404, False, "invalid_request_error"),
    Reason.MODEL_NOT_READY: _Kind(grpc.StatusCode.FAILED_PRECONDITION, 503, False, "model_not_ready"),
    Reason.INVALID_REQUEST: _Kind(grpc.StatusCode.INVALID_ARGUMENT, 400, False, "invalid_request_error"),
    Reason.REQUEST_TOO_LARGE: _Kind(grpc.StatusCode.INVALID_ARGUMENT, 413, False, "invalid_request_error"),
    Reason.CONTEXT_WINDOW_EXCEEDED: _Kind(grpc.StatusCode.INVALID_ARGUMENT, 400, False, "context_length_exceeded"),
    Reason.CONTENT_POLICY: _Kind(grpc.StatusCode.INVALID_ARGUMENT, 400, False, "content_policy_violation"),
    Reason.PROVIDER_AUTH_FAILED: _Kind(grpc.StatusCode.FAILED_PRECONDITION, 502, False, "provider_auth_error"),
    Reason.PROVIDER_NOT_FOUND: _Kind(grpc.StatusCode.NOT_FOUND, 404, False, "not_found_error"),
    Reason.RATE_LIMITED: _Kind(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, True, "rate_limit_error"),
    # A node's spend budget is used up: OpenAI's own "quota" error (429
    # insufficient_quota); not retryable, since waiting seconds does not help.
    Reason.BUDGET_EXCEEDED: _Kind(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, False, "insufficient_quota"),
    # A budgeted node's spend lives in the shared database (--database), which cannot be
    # reached: its budget cannot be checked, so the request is refused (fail closed).
    Reason.SPEND_DATABASE_UNAVAILABLE: _Kind(grpc.StatusCode.UNAVAILABLE, 503, True, "api_error"),
    Reason.OVERLOADED: _Kind(grpc.StatusCode.RESOURCE_EXHAUSTED, 503, True, "overloaded_error"),
    Reason.PROVIDER_UNAVAILABLE: _Kind(grpc.StatusCode.UNAVAILABLE, 502, True, "api_error"),
    Reason.PROVIDER_TIMEOUT: _Kind(grpc.StatusCode.UNAVAILABLE, 504, True, "timeout_error"),
    Reason.DEADLINE_EXCEEDED: _Kind(grpc.StatusCode.DEADLINE_EXCEEDED, 504, False, "timeout_error"),
    Reason.UNAUTHENTICATED: _Kind(grpc.StatusCode.UNAUTHENTICATED, 502, False, "sidecar_auth_error"),
    Reason.PERMISSION_DENIED: _Kind(grpc.StatusCode.PERMISSION_DENIED, 403, False, "permission_error"),
    Reason.SIDECAR_UNAVAILABLE: _Kind(grpc.StatusCode.UNAVAILABLE, 503, True, "api_error"),
    Reason.CANCELLED: _Kind(grpc.StatusCode.CANCELLED, 499, False, "cancelled"),
    # The caller stopped reading; the sidecar stopped reading the provider and, after the
    # stall limit, ended the stream (not the provider's fault, not worth a retry).
    Reason.CLIENT_STALLED: _Kind(grpc.StatusCode.RESOURCE_EXHAUSTED, 408, False, "timeout_error"),
    Reason.INTERNAL: _Kind(grpc.StatusCode.INTERNAL, 500, False, "api_error"),
}

# For statuses that arrive without our ErrorInfo (a proxy, a dead sidecar, grpc itself).
_GRPC_MESSAGE_LIMIT = "larger than max"  # grpc's "Received message larger than max (N vs. M)"
_REASON_FOR_BARE_CODE: dict[grpc.StatusCode, Reason] = {
    grpc.StatusCode.UNAVAILABLE: Reason.SIDECAR_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Reason.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED: Reason.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: Reason.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND: Reason.MODEL_NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT: Reason.INVALID_REQUEST,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Reason.OVERLOADED,
    # A CANCELLED the sidecar did not write (every status it writes has details), on a call
    # this side did not cancel (that raises CancelledError, not a status): grpc cancelled
    # it on the sidecar's side, a server stopping as the call arrived or a reset connection.
    # The sidecar is away, and the client may try another while nothing was received.
    grpc.StatusCode.CANCELLED: Reason.SIDECAR_UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION: Reason.MODEL_NOT_READY,
}


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass
class RemoteError(Exception):
    """The one error type of the remote path, on both sides of the wire."""

    reason: Reason
    message: str
    retry_after_s: float | None = None
    violations: Sequence[FieldViolation] = field(default_factory=tuple)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if self.retry_after_s is not None:
            # A provider's Retry-After of 1e400 (inf), NaN or years must not break the status.
            delay = self.retry_after_s
            self.retry_after_s = min(delay, MAX_RETRY_AFTER_S) if delay >= 0 else 0.0

    def __str__(self) -> str:
        return self.message

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _TABLE[self.reason].grpc_code

    @property
    def http_status(self) -> int:
        return _TABLE[self.reason].http_status

    @property
    def retryable(self) -> bool:
        return _TABLE[self.reason].retryable

    @property
    def openai_type(self) -> str:
        return _TABLE[self.reason].openai_type

    def to_status_proto(self) -> status_pb2.Status:
        """The google.rpc.Status that carries this error's details in the trailers."""
        status = status_pb2.Status(code=self.grpc_code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(reason=self.reason.value, domain=ERROR_DOMAIN, metadata=self.metadata)
        status.details.add().Pack(info)
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in self.violations
                ]
            )
            status.details.add().Pack(bad)
        return status

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return ((STATUS_DETAILS_KEY, self.to_status_proto().SerializeToString()),)

    def to_openai_error(self) -> dict[str, object]:
        """The body exo's API returns: OpenAI's error shape, plus exo's ``detail`` key."""
        return {
            "error": {
                "message": self.message,
                "type": self.openai_type,
                "code": self.reason.value.lower(),
                "param": self.violations[0].field if self.violations else None,
            },
            "detail": self.message,
        }

    @classmethod
    def from_status(
        cls,
        code: grpc.StatusCode | None,
        details: str | None,
        trailing_metadata: Iterable[tuple[str, str | bytes]] | None,
    ) -> RemoteError:
        """Rebuild the error from a received gRPC status (the table read backwards)."""
        message = details or (code.name if code else "unknown error")
        for key, value in trailing_metadata or ():
            if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
                continue
            status = status_pb2.Status.FromString(value)
            return cls._from_status_proto(status, fallback_code=code)
        reason = _REASON_FOR_BARE_CODE.get(code, Reason.INTERNAL) if code else Reason.INTERNAL
        if reason is Reason.SIDECAR_UNAVAILABLE:
            message = f"sidecar unavailable: {message}"
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and _GRPC_MESSAGE_LIMIT in message:
            # grpc's own refusal of a message over the sidecar's receive limit (sized from
            # its max_request_bytes): the request is too large, and no retry will fit it.
            reason, message = Reason.REQUEST_TOO_LARGE, f"request too large: {message}"
        return cls(reason, message)

    @classmethod
    def _from_status_proto(cls, status: status_pb2.Status, fallback_code: grpc.StatusCode | None) -> RemoteError:
        reason: Reason | None = None
        retry_after: float | None = None
        violations: list[FieldViolation] = []
        metadata: dict[str, str] = {}
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                if info.domain == ERROR_DOMAIN and info.reason in Reason.__members__:
                    reason = Reason(info.reason)
                metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [FieldViolation(v.field, v.description) for v in bad.field_violations]
        if reason is None:
            code = _code_from_int(status.code) or fallback_code
            reason = _REASON_FOR_BARE_CODE.get(code, Reason.INTERNAL) if code else Reason.INTERNAL
        return cls(reason, status.message, retry_after, tuple(violations), metadata)


def redacted(error: RemoteError, extra: Iterable[str] = ()) -> RemoteError:
    """``error`` as it may leave the process: message, violations and metadata redacted."""
    extra = tuple(extra)
    return replace(
        error,
        message=redact(error.message, extra),
        violations=tuple(FieldViolation(v.field, redact(v.description, extra)) for v in error.violations),
        metadata={k: redact(v, extra) for k, v in error.metadata.items()},
    )


async def abort(context: Any, error: RemoteError, secrets: Iterable[str] = ()) -> NoReturn:
    """End a server call with ``error``: redacted message as the details, and the same
    redacted google.rpc.Status (ErrorInfo, RetryInfo, BadRequest) in the trailers."""
    shown = redacted(error, secrets)
    context.set_trailing_metadata(shown.trailing_metadata())
    await context.abort(shown.grpc_code, shown.message)
    raise AssertionError("unreachable")  # context.abort always raises


def _code_from_int(value: int) -> grpc.StatusCode | None:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return None


assert set(_TABLE) == set(Reason), "every reason needs a row in the table"
assert code_pb2.INTERNAL == grpc.StatusCode.INTERNAL.value[0]
