"""Where the sidecar is and how to prove who we are: the exo side's one connection config.

:class:`SidecarTarget` is read from environment variables (through
:class:`~exo_remote_engine.engine.settings.EngineSettings`) so exo's own argv stays
untouched, and builds every channel the engine side opens: TLS, token metadata, the
service config (``round_robin`` and short reconnect backoffs for several hosts,
``pick_first`` for one; health checking only under mTLS alone, see
:mod:`~exo_remote_engine.engine.connection.client` for why).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from exo_remote_engine.contract.addresses import DEFAULT_PORT, SidecarAddress, sidecar_target
from exo_remote_engine.engine.settings import EngineSettings

DEFAULT_SIDECAR = f"127.0.0.1:{DEFAULT_PORT}"
SERVICE_NAME = "exo.remote.v1.RemoteInferenceService"
WORKERS_REFRESH_S = 30.0
# A host that comes back is dialled again within about this long (the issue asks 5 s).
RECONNECT_BACKOFF_MS = (250, 2000)


@dataclass(frozen=True)
class ClientTLS:
    """Trust anchor for the sidecar's certificate, plus our own for mutual TLS."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes() if self.ca_file else None,
            private_key=self.key_file.read_bytes() if self.key_file else None,
            certificate_chain=self.cert_file.read_bytes() if self.cert_file else None,
        )


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded, jittered retries before the first event of a stream."""

    attempts: int = 4
    max_total_s: float = 20.0
    base_delay_s: float = 0.25
    max_delay_s: float = 5.0


@dataclass(frozen=True)
class SidecarTarget:
    address: str = DEFAULT_SIDECAR
    token: str | None = field(default=None, repr=False)
    tls: ClientTLS | None = None
    deadline_s: float = 900.0
    retry: RetryPolicy = RetryPolicy()
    # Completions share a Session stream per connection (engine/connection/session.py);
    # False: one Generate call each.
    multiplex: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SidecarTarget:
        """The target the ``EXO_REMOTE_*`` variables describe (:class:`EngineSettings`)."""
        return cls.from_settings(EngineSettings.from_env(environ))

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> SidecarTarget:
        """A sidecar address without a port means port 50505; raises AddressError (a
        ValueError) for a URL, OSError for an unreadable token file."""
        token = settings.token
        if settings.token_file is not None:
            token = settings.token_file.read_text().strip() or None
        tls = None
        if settings.tls_ca is not None or settings.tls_cert is not None:
            tls = ClientTLS(
                ca_file=settings.tls_ca,
                cert_file=settings.tls_cert,
                key_file=settings.tls_key,
                server_name=settings.tls_server_name,
            )
        return cls(
            address=sidecar_target(settings.sidecar or DEFAULT_SIDECAR, flag="EXO_REMOTE_SIDECAR").target,
            token=token,
            tls=tls,
            deadline_s=settings.deadline_s,
            multiplex=settings.multiplex,
        )

    @property
    def parsed(self) -> SidecarAddress:
        """The target's typed form: its kind and, when written out, its hosts."""
        return sidecar_target(self.address)

    @property
    def tls_server_name(self) -> str | None:
        return self.tls.server_name if self.tls else None

    @property
    def health_checked(self) -> bool:
        """Whether gRPC's client-side health checking is on: several hosts, authenticated by
        a client certificate alone (the module doc says why only there)."""
        mtls_alone = self.tls is not None and self.tls.cert_file is not None and not self.token
        return mtls_alone and self.parsed.several

    def service_config(self) -> str | None:
        """round_robin for several hosts; None (gRPC's pick_first) for one (module doc)."""
        if not self.parsed.several:
            return None
        config: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}]}
        if self.health_checked:
            config["healthCheckConfig"] = {"serviceName": SERVICE_NAME}
        return json.dumps(config)

    def channel_options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", 32 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
        ]
        service_config = self.service_config()
        if service_config is not None:
            options.append(("grpc.service_config", service_config))
        if self.tls and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options

    def metadata(self, request_id: str = "") -> tuple[tuple[str, str], ...]:
        md: list[tuple[str, str]] = []
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if request_id:
            md.append(("x-request-id", request_id))
        return tuple(md)

    def sync_channel(self) -> grpc.Channel:
        """A blocking channel, for callers that have no event loop yet (exo's import time)."""
        if self.tls:
            return grpc.secure_channel(self.address, self.tls.credentials(), self.channel_options())
        return grpc.insecure_channel(self.address, self.channel_options())

    def aio_channel(self, port: int | None = None, *, address: str | None = None) -> grpc.aio.Channel:
        """A channel to the target (or to ``address``), or to a worker's ``port`` on its host."""
        address = address or self.address
        if port is not None:
            address = f"{address.rsplit(':', 1)[0]}:{port}"
        if self.tls:
            return grpc.aio.secure_channel(address, self.tls.credentials(), self.channel_options())
        return grpc.aio.insecure_channel(address, self.channel_options())
