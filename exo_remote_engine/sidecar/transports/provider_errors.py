"""Provider failures to the shared error contract (:mod:`exo_remote_engine.contract.errors`).

Both transports' exceptions go through here. LiteLLM's are mapped by exception class, not
status code: LiteLLM reports a refused connection as a 500 and a stream that died mid-way
as a 503. The direct transport's HTTP errors carry the provider's real status. Provider
text is never passed through for auth failures (OpenAI's 401 echoes part of the key);
elsewhere it is redacted by the process's secret registry (``secrets`` adds values to it
for one call). An outage names where and why ("connection refused to
127.0.0.1:18089"), read from the exception chain both transports keep, so an operator can
tell a dead server from a wrong address without the sidecar's debug log.
"""

from __future__ import annotations

import re
import socket
import ssl
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from litellm import exceptions as lx

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.contract.redaction import redact


class ProviderStatusError(Exception):
    """The provider answered with an HTTP error status."""

    def __init__(self, status_code: int, message: str, headers: Mapping[str, str]) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers


class ProviderConnectionError(Exception):
    """The provider could not be reached, or its stream broke or made no sense."""


class ProviderProtocolError(ProviderConnectionError):
    """The provider's stream broke the protocol: a malformed or oversized event. The
    same table row as LiteLLM's answer to such a stream (PROVIDER_UNAVAILABLE)."""


class ProviderTimeoutError(Exception):
    """The provider sent nothing for longer than the deployment's timeout."""


# Order matters: subclasses before their bases.
_BY_CLASS: tuple[tuple[type[BaseException], Reason], ...] = (
    (lx.ContextWindowExceededError, Reason.CONTEXT_WINDOW_EXCEEDED),
    (lx.ContentPolicyViolationError, Reason.CONTENT_POLICY),
    (lx.AuthenticationError, Reason.PROVIDER_AUTH_FAILED),
    (lx.PermissionDeniedError, Reason.PROVIDER_AUTH_FAILED),
    (lx.NotFoundError, Reason.PROVIDER_NOT_FOUND),
    (lx.RateLimitError, Reason.RATE_LIMITED),
    (lx.Timeout, Reason.PROVIDER_TIMEOUT),
    (lx.UnprocessableEntityError, Reason.INVALID_REQUEST),
    (lx.UnsupportedParamsError, Reason.INVALID_REQUEST),
    (lx.BadRequestError, Reason.INVALID_REQUEST),
    (lx.APIConnectionError, Reason.PROVIDER_UNAVAILABLE),
    (lx.ServiceUnavailableError, Reason.PROVIDER_UNAVAILABLE),
    (lx.InternalServerError, Reason.PROVIDER_UNAVAILABLE),
    (lx.BadGatewayError, Reason.PROVIDER_UNAVAILABLE),
    (lx.APIError, Reason.PROVIDER_UNAVAILABLE),
    (ProviderTimeoutError, Reason.PROVIDER_TIMEOUT),
    (ProviderConnectionError, Reason.PROVIDER_UNAVAILABLE),
    (ProviderStatusError, Reason.PROVIDER_UNAVAILABLE),  # refined by its status below
)
# Only for generic LiteLLM classes that still carry a client-error status.
_BY_CLIENT_STATUS: dict[int, Reason] = {
    400: Reason.INVALID_REQUEST,
    401: Reason.PROVIDER_AUTH_FAILED,
    403: Reason.PROVIDER_AUTH_FAILED,
    404: Reason.PROVIDER_NOT_FOUND,
    413: Reason.REQUEST_TOO_LARGE,
    422: Reason.INVALID_REQUEST,
    429: Reason.RATE_LIMITED,
}
_UNAMBIGUOUS = frozenset({401, 403, 404, 429})
_CONTEXT_WORDING = re.compile(r"context[ _](?:length|window)|maximum context|too many tokens", re.IGNORECASE)
_MAX_PROVIDER_TEXT = 300
_EXPLAINED_BY_PROVIDER = frozenset(
    {
        Reason.INVALID_REQUEST,
        Reason.CONTEXT_WINDOW_EXCEEDED,
        Reason.CONTENT_POLICY,
        Reason.PROVIDER_NOT_FOUND,
    }
)
_SUMMARIES = {
    Reason.CONTEXT_WINDOW_EXCEEDED: "the request exceeds the model's context window",
    Reason.CONTENT_POLICY: "the provider's content policy refused the request",
    Reason.PROVIDER_NOT_FOUND: "the provider does not know this model",
    Reason.INVALID_REQUEST: "the provider rejected the request",
    Reason.REQUEST_TOO_LARGE: "the provider refused the request as too large",
    Reason.PROVIDER_TIMEOUT: "the provider timed out",
    Reason.PROVIDER_UNAVAILABLE: "the provider is unavailable",
}
_MAX_RETRY_AFTER_S = 3600.0  # a provider's Retry-After beyond an hour (or 1e400) is capped
_PYTHON_REPR = re.compile(r"<[A-Za-z_][\w.]*(?:Error|Exception)\b[^>]*>")


def classify(exc: BaseException, *, alias: str, provider: str, secrets: Iterable[str] = ()) -> RemoteError:
    """The RemoteError a client should see for ``exc`` raised while serving ``alias``."""
    if isinstance(exc, RemoteError):
        return exc
    reason = next((r for cls, r in _BY_CLASS if isinstance(exc, cls)), Reason.INTERNAL)
    status = getattr(exc, "status_code", None)
    if isinstance(exc, ProviderStatusError):
        reason = _reason_of_status(exc)
    if status in _BY_CLIENT_STATUS and (
        status in _UNAMBIGUOUS or reason in (Reason.PROVIDER_UNAVAILABLE, Reason.INTERNAL)
    ):
        # LiteLLM wraps some provider 4xx in a generic APIError, and some 401s (those
        # without OpenAI's wording) in BadRequestError; the status says what happened.
        reason = _BY_CLIENT_STATUS[status]
    if reason is Reason.PROVIDER_UNAVAILABLE and _timed_out(exc):
        # LiteLLM reports a read timeout mid-stream (stream_timeout) as a 500: a
        # MidStreamFallbackError around an APIConnectionError around httpx.ReadTimeout.
        reason, status = Reason.PROVIDER_TIMEOUT, None
    http = f" (HTTP {status})" if isinstance(status, int) else ""
    meta = {"model": alias, "provider": provider}
    if reason is Reason.PROVIDER_AUTH_FAILED:
        return RemoteError(
            reason,
            f"provider {provider} rejected the sidecar's credentials for model {alias!r}{http}; "
            "check the key configured on the sidecar",
            metadata=meta,
        )
    if reason is Reason.RATE_LIMITED:
        return RemoteError(
            reason,
            f"provider {provider} is rate limiting model {alias!r}{http}",
            retry_after_s=_retry_after(exc),
            metadata=meta,
        )
    if reason is Reason.INTERNAL:
        return RemoteError(reason, f"internal error while serving model {alias!r}", metadata=meta)
    # Provider wording helps with request problems; for outages it is transport noise.
    detail = _provider_text(exc, secrets) if reason in _EXPLAINED_BY_PROVIDER else ""
    summary = _SUMMARIES.get(reason, "the provider failed")
    if reason in (Reason.PROVIDER_UNAVAILABLE, Reason.PROVIDER_TIMEOUT) and not detail:
        detail = redact(connection_failure(exc) or "", secrets)
    message = f"{summary} (model {alias!r}, provider {provider}{http})"
    if detail:
        message = f"{message}: {detail}"
    return RemoteError(reason, message, retry_after_s=_retry_after(exc), metadata=meta)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it (LiteLLM wraps the OpenAI SDK's, which wraps
    httpx's, which wraps aiohttp's or httpcore's, which wraps the OSError)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__, getattr(current, "os_error", None)]


def _address(chain: list[BaseException]) -> str | None:
    """host:port the transport dialled: aiohttp says it; httpx and the OpenAI SDK carry the
    request (LiteLLM's own exceptions carry placeholder requests, so they are not asked)."""
    for exc in chain:
        host, port = getattr(exc, "host", None), getattr(exc, "port", None)
        if isinstance(host, str) and host and isinstance(port, int):
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    for exc in chain:
        if type(exc).__module__.split(".")[0] not in ("httpx", "openai", "httpcore"):
            continue
        try:
            url = str(exc.request.url)  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            continue
        parts = urllib.parse.urlsplit(url)
        if parts.hostname:
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            return f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    return None


# The network errors worth naming, most specific first: (class, phrase, preposition).
_NETWORK_CAUSES: tuple[tuple[type[BaseException], str, str], ...] = (
    (ConnectionRefusedError, "connection refused", "to"),
    (socket.gaierror, "cannot resolve the host name", "of"),
    (ConnectionResetError, "connection reset", "by"),
    (ssl.SSLError, "TLS handshake failed", "with"),
)
# Exceptions (by class name, to need neither aiohttp nor httpx here) of a response cut short.
_CUT_SHORT = frozenset({"ServerDisconnectedError", "RemoteProtocolError", "ClientPayloadError"})


def connection_failure(exc: BaseException) -> str | None:
    """Why and where a connection failed, e.g. "connection refused to 127.0.0.1:18089";
    ``None`` when the chain holds no network error."""
    chain = list(_chain(exc))
    address = _address(chain)

    def at(phrase: str, preposition: str) -> str:
        return f"{phrase} {preposition} {address}" if address else phrase

    # aiohttp's connector errors are OSErrors themselves: look for the specific cause first.
    for cls, phrase, preposition in _NETWORK_CAUSES:
        if any(isinstance(cause, cls) for cause in chain):
            return at(phrase, preposition)
    if any(type(cause).__name__ in _CUT_SHORT for cause in chain):
        return at("connection closed mid-response", "by")
    if address and any(isinstance(cause, TimeoutError) for cause in chain):
        return at("no answer", "from")
    for cause in chain:
        if isinstance(cause, OSError) and cause.strerror and type(cause).__module__ == "builtins":
            return f"{at('cannot connect', 'to')}: {cause.strerror.lower()}"
    return None


def _timed_out(exc: BaseException) -> bool:
    """Whether a timeout is among the causes of ``exc``."""
    import httpx

    return any(isinstance(cause, TimeoutError | httpx.TimeoutException | lx.Timeout) for cause in _chain(exc))


def _reason_of_status(exc: ProviderStatusError) -> Reason:
    """A real HTTP status from an OpenAI-compatible server (no LiteLLM reinterpretation)."""
    status = exc.status_code
    if status == 408:
        return Reason.PROVIDER_TIMEOUT
    if status >= 500 or status < 400:
        return Reason.PROVIDER_UNAVAILABLE
    if status == 400 and _CONTEXT_WORDING.search(exc.message):
        return Reason.CONTEXT_WINDOW_EXCEEDED
    return _BY_CLIENT_STATUS.get(status, Reason.INVALID_REQUEST)


def _provider_text(exc: BaseException, secrets: Iterable[str]) -> str:
    text = str(getattr(exc, "message", "") or exc)[: _MAX_PROVIDER_TEXT * 16]  # bounded before redaction
    # LiteLLM prefixes "litellm.BadRequestError: OpenAIException - ..."; keep the provider part.
    text = text.split(" - ", 1)[-1] if " - " in text else text
    text = _PYTHON_REPR.sub("", text)  # "<SomeError: ...>" is ours to hide, not the client's to read
    text = redact(text, secrets).strip()
    return text[:_MAX_PROVIDER_TEXT]


def _retry_after(exc: BaseException) -> float | None:
    """The provider's Retry-After(-ms), in seconds from 0 to an hour; None if absent or
    unreadable (a header is the provider's text: inf, NaN and garbage included)."""
    try:
        seconds = _retry_after_header(exc)
    except Exception:
        return None
    if seconds is None or not seconds >= 0:  # NaN too
        return None
    return min(seconds, _MAX_RETRY_AFTER_S)


def _retry_after_header(exc: BaseException) -> float | None:
    headers: Any = None
    response = getattr(exc, "response", None)
    if response is not None:
        headers = getattr(response, "headers", None)
    headers = headers or getattr(exc, "litellm_response_headers", None) or getattr(exc, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            import time

            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
