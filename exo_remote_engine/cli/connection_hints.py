"""What a failed connection most likely means, in words a newcomer can act on.

gRPC reports a TLS sidecar dialled in plaintext as "Socket closed" and a missing token as
"missing or invalid sidecar token"; urllib reports a gRPC port asked for exo's HTTP API as a
``BadStatusLine`` full of binary. The command-line tools (``exo-remote`` and its topology
view) ask here for the one sentence that says which side is misconfigured and how to fix it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import urllib.parse

from exo_remote_engine.contract.addresses import AddressError, sidecar_target
from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.engine.connection.target import SidecarTarget


def _host_port(address: str) -> tuple[str, int] | None:
    with contextlib.suppress(AddressError):  # several hosts: the first one tells
        address = (sidecar_target(address).hosts or (address,))[0]
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in address:
        return None
    return host.strip("[]"), int(port)


def speaks_tls(address: str, timeout_s: float = 2.0) -> bool:
    """Whether whatever listens at ``host:port`` completes a TLS handshake (certificate not
    checked: this only tells TLS from plaintext)."""
    where = _host_port(address)
    if where is None:
        return False
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection(where, timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=where[0]),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def sidecar_hint(error: RemoteError, target: SidecarTarget, *, short: bool = False) -> str | None:
    """Why a call to ``target``'s sidecar failed, with the setting to change; ``None`` when
    there is nothing more to say than the error itself. ``short`` fits a topology box."""
    message = error.message
    if error.reason is Reason.UNAUTHENTICATED:
        if not target.token:
            if short:
                return "token missing: set EXO_REMOTE_TOKEN"
            return "the sidecar requires a token and none is set: set EXO_REMOTE_TOKEN or EXO_REMOTE_TOKEN_FILE"
        if short:
            return "token rejected: check EXO_REMOTE_TOKEN"
        return "the sidecar rejected the token: check EXO_REMOTE_TOKEN / EXO_REMOTE_TOKEN_FILE"
    if error.reason is not Reason.SIDECAR_UNAVAILABLE:
        return None
    if "CERTIFICATE_VERIFY_FAILED" in message:
        if short:
            return "certificate not trusted: check EXO_REMOTE_TLS_CA"
        return "the sidecar's certificate is not signed by the CA in EXO_REMOTE_TLS_CA"
    if "Hostname Verification Check failed" in message and target.parsed.several and not target.tls_server_name:
        if short:
            return "certificate name not checked: set EXO_REMOTE_TLS_SERVER_NAME"
        return (
            "a list of sidecar hosts has no host name to check their certificates against: set "
            "EXO_REMOTE_TLS_SERVER_NAME to the name in the hosts' certificates"
        )
    if "WRONG_VERSION_NUMBER" in message and target.tls is not None:
        if short:
            return "plaintext sidecar: unset EXO_REMOTE_TLS_CA"
        return f"the sidecar at {target.address} does not speak TLS: unset EXO_REMOTE_TLS_CA/CERT/KEY"
    if "CERTIFICATE_REQUIRED" in message or "certificate required" in message.lower():
        if short:
            return "client certificate required: set EXO_REMOTE_TLS_CERT/KEY"
        return "the sidecar requires a client certificate: set EXO_REMOTE_TLS_CERT and EXO_REMOTE_TLS_KEY"
    if target.tls is None and "Connection refused" not in message and speaks_tls(target.address):
        if short:
            return "TLS expected: set EXO_REMOTE_TLS_CA"
        return (
            f"TLS expected: the sidecar at {target.address} speaks TLS; set EXO_REMOTE_TLS_CA to the CA "
            "file that signed its certificate (and EXO_REMOTE_TLS_CERT/KEY if it asks for a client certificate)"
        )
    if "Connection refused" in message:
        if short:
            return "connection refused"
        return f"nothing listens at {target.address}: is exo-remote-sidecar running there, on that port?"
    return None


def not_exo_api_hint(first_line: bytes | str, url: str) -> str:
    """What answered ``url`` instead of exo's HTTP API, from the first bytes it sent back
    (an empty line: it closed the connection, as a TLS port does when spoken to in plaintext)."""
    raw = first_line.encode("latin-1", "replace") if isinstance(first_line, str) else first_line
    exo_port = "exo's API is the --chatgpt-api-port of an exo node (default 52415)"
    if raw.startswith(b"\x00\x00"):  # an HTTP/2 frame header: gRPC
        return f"{url}: that is a gRPC port (an exo-remote sidecar?), not exo's HTTP API; {exo_port}"
    netloc = urllib.parse.urlsplit(url).netloc
    if raw[:1] == b"\x15" or speaks_tls(netloc):  # a TLS alert record, or a TLS handshake works
        return f"{url}: that port speaks TLS (a TLS sidecar?), not exo's plain HTTP API; {exo_port}"
    return f"{url} did not answer HTTP; {exo_port}"
