"""Fetching a listing over HTTP: bounded bodies, no redirects, pagination with a cursor-loop
guard, and every failure reduced to a :class:`ListingFailed` kind that
:func:`failure_reason` turns into words a person can act on (never a key, never the
provider's own text)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, Literal

import aiohttp
from yarl import URL

from exo_remote_engine.sidecar.discovery.parsers.untrusted_json import Malformed, as_str
from exo_remote_engine.sidecar.discovery.types import AuthStyle, ListedModel, Paging, ProviderSpec

MAX_LISTING_BYTES: Final = 32 * 1024 * 1024  # OpenRouter's full listing is ~2 MB
MAX_PAGES: Final = 50
ANTHROPIC_VERSION: Final = "2023-06-01"

FailureKind = Literal["auth", "http", "unreachable", "timeout", "malformed", "bad_url"]


class ListingFailed(Exception):
    def __init__(self, kind: FailureKind, status: int | None = None) -> None:
        super().__init__(kind, status)
        self.kind: FailureKind = kind
        self.status = status


def shown_url(url: str) -> str:
    """A URL fit for a reason or a log line: no user, password, query or fragment."""
    try:
        parsed = URL(url)
        if not parsed.is_absolute():
            return "(invalid URL)"
        return str(parsed.with_user(None).with_query(None).with_fragment(None)).rstrip("/")
    except (ValueError, TypeError):
        return "(invalid URL)"


async def read_bounded(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await response.content.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_LISTING_BYTES:
            raise ListingFailed("malformed")
        chunks.append(chunk)


async def request_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: Mapping[str, str],
    params: Mapping[str, str] | None = None,
    body: Any = None,
) -> Any:
    try:
        target = URL(url)
        if not target.is_absolute() or target.scheme not in ("http", "https"):
            raise ListingFailed("bad_url")
        async with session.request(
            method, target, headers=dict(headers), params=params, json=body, allow_redirects=False
        ) as response:
            if response.status in (401, 403):
                raise ListingFailed("auth", response.status)
            if response.status != 200:
                raise ListingFailed("http", response.status)
            raw = await read_bounded(response)
    except ListingFailed:
        raise
    except (aiohttp.InvalidURL, ValueError) as exc:
        raise ListingFailed("bad_url") from exc
    except aiohttp.ClientPayloadError as exc:
        raise ListingFailed("malformed") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise ListingFailed("unreachable") from exc
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ListingFailed("malformed") from exc


def auth_headers(style: AuthStyle, key: str) -> dict[str, str]:
    if style == "anthropic":
        return {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
    if style == "gemini":
        return {"x-goog-api-key": key}
    return {"Authorization": f"Bearer {key}"}


async def list_provider(
    session: aiohttp.ClientSession, spec: ProviderSpec, api_base: str, key: str
) -> list[ListedModel]:
    url = api_base + spec.list_path
    headers = auth_headers(spec.auth, key)
    params: dict[str, str] = {}
    if spec.paging == "anthropic":
        params = {"limit": "1000"}
    elif spec.paging == "gemini":
        params = {"pageSize": "1000"}
    models: list[ListedModel] = []
    seen_cursors: set[str] = set()
    for _ in range(MAX_PAGES):
        page = await request_json(session, "GET", url, headers, params or None)
        try:
            models += spec.parse(page)
        except Malformed as exc:
            raise ListingFailed("malformed") from exc
        cursor = next_cursor(spec.paging, page)
        if cursor is None:
            return models
        if cursor in seen_cursors:
            raise ListingFailed("malformed")  # a cursor loop would page forever
        seen_cursors.add(cursor)
        params = {**params, ("after_id" if spec.paging == "anthropic" else "pageToken"): cursor}
    raise ListingFailed("malformed")  # more than MAX_PAGES pages: not a model list


def next_cursor(paging: Paging, page: Any) -> str | None:
    if not isinstance(page, Mapping):
        return None
    if paging == "anthropic" and page.get("has_more") is True:
        return as_str(page.get("last_id")) or None
    if paging == "gemini":
        return as_str(page.get("nextPageToken")) or None
    return None


def failure_reason(failure: ListingFailed | TimeoutError, shown: str, timeout: float, auth_text: str) -> str:
    """What a person can do about a failed listing. ``auth_text``: e.g. "the sidecar's
    ANTHROPIC_API_KEY was rejected" (names the variable, never the key)."""
    if isinstance(failure, TimeoutError):
        return f"server at {shown} did not answer within {timeout:g}s"
    if failure.kind == "auth":
        return f"{auth_text} (HTTP {failure.status})"
    if failure.kind == "http":
        return f"server at {shown} answered HTTP {failure.status} to the model listing"
    if failure.kind == "malformed":
        return f"server at {shown} returned a malformed model list"
    if failure.kind == "bad_url":
        return f"{shown} is not a valid http(s) base URL"
    return f"server at {shown} unreachable"
