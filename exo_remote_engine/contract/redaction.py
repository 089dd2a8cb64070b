"""The one secret registry and redactor of a process.

Every value the sidecar can send to a provider (configured ``api_key`` values,
``extra_headers`` values, credentials in ``api_base`` URLs, keys the transports take
implicitly from the environment, discovery keys from the environment or ``--env-file``,
the sidecar's own node tokens) is registered here once, and :func:`redact` removes it
from every text anyone else reads: gRPC status messages and details, log records (all
loggers, every level, tracebacks included), metric labels and CLI output.

A registered secret is removed whole and by any fragment of :data:`FRAGMENT_CHARS` or
more characters, so an echo without the key's ``sk-`` prefix, or of only its tail, is
removed too. Values that only look like credentials (``key=...``, ``Bearer ...``,
``sk-...``, URL user info, long mixed-case tokens) are removed as well. Ids are not:
a UUID or a hex request id survives, because operators look errors up by it.

The registry is process-wide because logging is: a record written by any library, on any
thread, must be redacted against everything this process has ever sent. Values are never
forgotten (a stream started with an old key may still echo it).
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "FRAGMENT_CHARS",
    "MIN_SECRET_CHARS",
    "REDACTED",
    "SECRETS",
    "SecretRegistry",
    "install_log_redaction",
    "looks_like_credential_name",
    "redact",
    "redact_shapes",
    "url_credentials",
]

REDACTED = "[REDACTED]"
# Shorter values are no secret worth the name ("none", "EMPTY", "dummy") and would shred
# every text they occur in; values up to FRAGMENT_CHARS are matched as whole words only.
MIN_SECRET_CHARS = 6
FRAGMENT_CHARS = 8

# Words of a variable name (split at "_") that say its value is a credential; whole words
# only: TIKTOKEN_CACHE_DIR is a directory, not a token.
_CREDENTIAL_WORDS = frozenset(
    {"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASS", "PAT", "CREDENTIAL", "AUTH", "SIG"}
)
_QUERY_CREDENTIAL = re.compile(r"(?i)(key|token|secret|password|sig|auth)")
# Shapes of credentials in provider text. The value group is what gets replaced.
_KEY_VALUE = re.compile(
    r"(?i)\b(?:api[_-]?key|x-api-key|key|token|access[_-]?token|secret|password|passwd|pwd)\b"
    r"(?:[\"']?\s*[:=]\s*[\"']?)(?!\[REDACTED\])([^\s\"',;&}\]]{4,})"
)
# "Bearer <value>" / "Basic <value>" where the value has a digit (not "Basic authentication").
_AUTH_SCHEME = re.compile(r"(?i)\b(?:bearer|basic)\s+(?!\[REDACTED\])(?=[A-Za-z._~+/=\-]*\d)([A-Za-z0-9._~+/=\-]{6,})")
_PREFIXED_KEY = re.compile(
    r"\bsk-[A-Za-z0-9_\-]{4,}"
    r"|\b(?:sk|pk|rk|gsk|xai|hf|ghp|gho|ghs|github_pat|glpat)[-_][A-Za-z0-9_\-]{16,}"
    r"|\b(?:AKIA|ASIA)[A-Z0-9]{16}\b|\bAIza[A-Za-z0-9_\-]{30,}"
)
_URL_USERINFO = re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+@")
_LONG_TOKEN = re.compile(r"[A-Za-z0-9_\-+/]{32,}")
# Redacted results of short texts are remembered: log arguments and status texts repeat
# (a model alias, a node name, "OK", a format string), and a miss costs tens of us.
_CACHED_CHARS = 512
_CACHE_ENTRIES = 4096
_UUID_OR_HEX = re.compile(r"(?i)[0-9a-f]{8}(?:-?[0-9a-f]{4}){3}-?[0-9a-f]{12}|[0-9a-f\-]+")


def url_credentials(url: Any) -> list[str]:
    """What a URL may carry that is secret: ``user:password@`` and credential-named
    query values (``?key=...``)."""
    if not isinstance(url, str) or "://" not in url:
        return []
    try:
        parts = urllib.parse.urlsplit(url.strip())
        found = [urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")]
        found += [v for k, v in urllib.parse.parse_qsl(parts.query) if _QUERY_CREDENTIAL.search(k)]
    except ValueError:
        return []
    return [v for v in found if v]


def looks_like_credential_name(name: str) -> bool:
    """An environment variable whose value a provider client may send (``*_API_KEY``,
    ``*_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ...): LiteLLM reads dozens of them implicitly."""
    return any(word in _CREDENTIAL_WORDS for word in name.upper().split("_"))


class SecretRegistry:
    """Secret values, matched whole and by fragment. Reads take no lock (immutable
    snapshots are swapped in); adds are serialised."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: frozenset[str] = frozenset()
        self._grams: frozenset[str] = frozenset()  # every FRAGMENT_CHARS-long piece of a long secret
        self._short: re.Pattern[str] | None = None  # secrets shorter than a fragment, as whole words
        # text -> its redacted form under the current secrets. Replaced (never cleared in
        # place) when a secret is added, after the new secrets are in: a redaction that
        # began before the add stores its stale result only in the abandoned dict.
        self._cache: dict[str, str] = {}

    def __contains__(self, value: object) -> bool:
        return value in self._values

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: Any) -> None:
        """Register one value the process may send (ignored when too short to be secret)."""
        if not isinstance(value, str):
            return
        value = value.strip()
        if len(value) < MIN_SECRET_CHARS or value in self._values:
            return
        with self._lock:
            if value in self._values:
                return
            values = self._values | {value}
            if len(value) >= FRAGMENT_CHARS:
                grams = {value[i : i + FRAGMENT_CHARS] for i in range(len(value) - FRAGMENT_CHARS + 1)}
                self._grams = self._grams | grams
            else:
                short = sorted((v for v in values if len(v) < FRAGMENT_CHARS), key=len, reverse=True)
                self._short = re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(map(re.escape, short)) + r")(?![A-Za-z0-9])")
            self._values = values
            self._cache = {}

    def add_all(self, values: Iterable[Any]) -> None:
        for value in values:
            self.add(value)

    def add_url(self, url: Any) -> None:
        """Credentials a URL carries (see :func:`url_credentials`)."""
        self.add_all(url_credentials(url))

    def add_environment(self, environ: Mapping[str, str]) -> None:
        """Every credential-named variable, and URL credentials in any variable (proxies)."""
        for name, value in environ.items():
            if looks_like_credential_name(name) and not value.startswith(("/", "~", "./")):  # not a file path
                self.add(value)
            if "@" in value and "://" in value:
                self.add_url(value)

    def redact(self, text: str, extra: Iterable[str] = ()) -> str:
        """``text`` without registered secrets (whole or any fragment), ``extra`` values,
        or anything shaped like a credential."""
        if not text:
            return text
        if not extra and len(text) <= _CACHED_CHARS:
            cache = self._cache  # before the secrets are read: see __init__
            done = cache.get(text)
            if done is None:
                if len(cache) >= _CACHE_ENTRIES:
                    cache.clear()
                done = cache[text] = self._redact(text)
            return done
        for value in extra:
            if value and len(value) >= 4:
                text = text.replace(value, REDACTED)
        return self._redact(text)

    def _redact(self, text: str) -> str:
        text = self._remove_fragments(text)
        short = self._short
        if short is not None:
            text = short.sub(REDACTED, text)
        return redact_shapes(text)

    def _remove_fragments(self, text: str) -> str:
        grams = self._grams
        size = FRAGMENT_CHARS
        if not grams or len(text) < size:
            return text
        hits = [i for i in range(len(text) - size + 1) if text[i : i + size] in grams]
        if not hits:
            return text
        out: list[str] = []
        cursor = 0
        start = end = -1
        for i in hits:
            if i <= end:  # overlapping or adjacent piece of the same echo
                end = i + size
                continue
            if start >= 0:
                out += [text[cursor:start], REDACTED]
                cursor = end
            start, end = i, i + size
        out += [text[cursor:start], REDACTED, text[end:]]
        return "".join(out)


def _sub_value(pattern: re.Pattern[str], text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        whole, value = match.group(0), match.group(1)
        if not value:
            return whole
        start, end = match.start(1) - match.start(0), match.end(1) - match.start(0)
        return whole[:start] + REDACTED + whole[end:]

    return pattern.sub(replace, text)


def _long_token(match: re.Match[str]) -> str:
    token = match.group(0)
    # An id (UUID, hex digest) is what operators look up; a random mixed-case token is not.
    if _UUID_OR_HEX.fullmatch(token):
        return token
    has_upper = any(c.isupper() for c in token)
    has_lower = any(c.islower() for c in token)
    has_digit = any(c.isdigit() for c in token)
    return REDACTED if has_upper and has_lower and has_digit else token


def redact_shapes(text: str) -> str:
    """Only the credential-shaped parts (for text from a process that holds no registry)."""
    text = _URL_USERINFO.sub(REDACTED + "@", text)
    text = _sub_value(_KEY_VALUE, text)
    text = _sub_value(_AUTH_SCHEME, text)
    text = _PREFIXED_KEY.sub(REDACTED, text)
    return _LONG_TOKEN.sub(_long_token, text)


SECRETS = SecretRegistry()


def redact(text: str, extra: Iterable[str] = ()) -> str:
    """:meth:`SecretRegistry.redact` with the process's registry."""
    return SECRETS.redact(text, extra)


_installed = False
_exception_formatter = logging.Formatter()


MAX_REDACTED_ARG_CHARS = 16 * 1024  # a log argument is cut to this before it is redacted
MAX_REDACTED_TRACEBACK_CHARS = 64 * 1024  # and a traceback to this


def _redacted_arg(value: Any) -> Any:
    # Numbers keep their type so %d and %.2f still format them; everything else is text,
    # bounded first: redaction scans every character, and a client's string may be 15 MiB.
    if isinstance(value, int | float):
        return value
    text = str(value)
    cut = len(text) - MAX_REDACTED_ARG_CHARS
    if cut > 0:
        text = f"{text[:MAX_REDACTED_ARG_CHARS]}...[{cut} more characters]"
    return SECRETS.redact(text)


def install_log_redaction() -> None:
    """Redact every log record this process creates, whichever logger, level or handler.

    A ``logging.Filter`` on a logger does not see records propagated from child loggers, and
    one on a handler misses handlers added later (an embedding application's, a test
    runner's); the record factory sees every record once, when it is made. Message, each
    argument, traceback and stack are redacted then, and only the redacted text stays on
    the record."""
    global _installed
    if _installed:
        return
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            record.getMessage()
        except Exception:  # a malformed call: let logging report it as it would
            return record
        # Message and arguments are redacted one by one, not rendered here: the sidecar's
        # one-line filter (sidecar/telemetry/safe_logging.py) still bounds each argument on its own.
        record.msg = SECRETS.redact(str(record.msg))
        if isinstance(record.args, Mapping):
            record.args = {k: _redacted_arg(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(_redacted_arg(a) for a in record.args)
        if record.exc_info and not record.exc_text:
            traceback = _exception_formatter.formatException(record.exc_info)
            record.exc_text = SECRETS.redact(traceback[:MAX_REDACTED_TRACEBACK_CHARS])  # bounded first
            # Formatters print exc_text; the raw exception (whose text may hold a key) goes.
            record.exc_info = None
        if record.stack_info:
            record.stack_info = SECRETS.redact(record.stack_info[:MAX_REDACTED_TRACEBACK_CHARS])
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
