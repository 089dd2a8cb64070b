"""Who may read the status page, its JSON and the metrics off loopback: an admin node
(``exo_remote_settings.nodes.<name>.role: admin``, or LiteLLM's ``master_key``), proving
who it is as it does on the gRPC port, with its bearer token or a client certificate
from ``--tls-client-ca`` whose common name is that node. On loopback the port is open, as
it always was (:mod:`~exo_remote_engine.sidecar.serving.exposure` decides which case
applies and refuses the rest at start).
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from exo_remote_engine.sidecar.config.loader import MASTER_KEY_NODE, SidecarConfig
from exo_remote_engine.sidecar.control.auth import ServerTLS


def admin_nodes(config: SidecarConfig) -> frozenset[str]:
    """The nodes with the admin role: ``role: admin`` in their rules, and the master key's."""
    names = {name for name, policy in config.node_policies.items() if policy.admin}
    if config.master_key is not None:
        names.add(MASTER_KEY_NODE)
    return frozenset(names)


@dataclass(frozen=True)
class StatusAccess:
    """``open``: anyone who reaches the port (loopback). Else only an admin node."""

    open: bool
    admin_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)  # node -> token
    admin_names: frozenset[str] = frozenset()
    tls: ServerTLS | None = None

    @classmethod
    def build(
        cls, config: SidecarConfig, named_tokens: Mapping[str, str], tls: ServerTLS | None, on_loopback: bool
    ) -> StatusAccess:
        names = admin_nodes(config)
        return cls(on_loopback, {n: t for n, t in named_tokens.items() if n in names}, names, tls)

    @property
    def possible(self) -> bool:
        """Whether any caller could pass (an admin token, or client certificates to name one)."""
        return self.open or bool(self.admin_tokens) or (self.tls is not None and self.tls.client_ca_file is not None)

    def ssl_context(self) -> ssl.SSLContext | None:
        """HTTPS off loopback when the sidecar has a certificate; client certificates asked
        for (required when no admin token could be used instead) with ``--tls-client-ca``."""
        if self.open or self.tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        if self.tls.client_ca_file is not None:
            context.load_verify_locations(self.tls.client_ca_file)
            context.verify_mode = ssl.CERT_OPTIONAL if self.admin_tokens else ssl.CERT_REQUIRED
        return context

    def decide(self, authorization: str, peer_certificate: object) -> int:
        """HTTP status for a caller: 200 admitted, 401 no credentials, 403 not an admin."""
        if self.open:
            return 200
        if authorization.startswith("Bearer "):
            presented = hashlib.sha256(authorization[7:].encode("latin-1", "replace")).digest()
            # Every admin token compared (digests: equal lengths), so timing says nothing.
            tokens = [hashlib.sha256(t.encode()).digest() for t in self.admin_tokens.values()]
            matches = [hmac.compare_digest(presented, token) for token in tokens]
            return 200 if any(matches) else 403
        name = _common_name(peer_certificate)
        if name is not None:
            return 200 if name in self.admin_names else 403
        return 401


def _common_name(certificate: object) -> str | None:
    """The subject CN of a certificate the TLS layer verified (``getpeercert()``'s form)."""
    if not isinstance(certificate, dict):
        return None
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
