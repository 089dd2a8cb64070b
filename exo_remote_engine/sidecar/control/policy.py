"""What one call may ask of the sidecar: request limits, deadlines, concurrency, and which
node may use which model.

Checks raise :class:`RemoteError` so they reach clients through the one error table.
A node is identified by its mTLS client certificate's common name, else by the name its
bearer token is registered under, else it is ``anonymous``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exo_remote_engine.contract.errors import FieldViolation, Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.rules import ANONYMOUS, Limits, NodePolicy


@dataclass
class Policy:
    limits: Limits = field(default_factory=Limits)
    nodes: Mapping[str, NodePolicy] = field(default_factory=dict)
    token_names: Mapping[str, str] = field(default_factory=dict)  # sha256(token) -> node name
    _active: dict[str, int] = field(default_factory=dict)
    _total: int = 0

    @classmethod
    def build(cls, limits: Limits, nodes: Mapping[str, NodePolicy], tokens: Mapping[str, str]) -> Policy:
        """``tokens`` maps node name -> token; only token digests are kept."""
        return cls(limits, dict(nodes), {_digest(t): name for name, t in tokens.items()})

    def identify(self, metadata: Sequence[tuple[str, Any]] | None, auth_context: Mapping[str, Any]) -> str:
        common_names = auth_context.get("x509_common_name") or []
        if common_names:
            value = common_names[0]
            return value.decode() if isinstance(value, bytes) else str(value)
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if header.startswith("Bearer "):
            return self.token_names.get(_digest(header[7:]), ANONYMOUS)
        return ANONYMOUS

    def may_use(self, node: str, alias: str) -> bool:
        """Whether ``node``'s rules let it use ``alias`` (a node without rules may use all)."""
        policy = self.nodes.get(node)
        return policy is None or policy.allows(alias)

    def check_request(self, request: pb.GenerateRequest, node: str, time_remaining: float | None) -> float:
        """Validate ``request`` for ``node``; returns the deadline (s) the call may use."""
        limits = self.limits
        size = request.ByteSize()
        if size > limits.max_request_bytes:
            raise _too_large("request", f"{size} bytes exceeds the limit of {limits.max_request_bytes}")
        if len(request.messages) > limits.max_messages:
            raise _too_large("messages", f"{len(request.messages)} messages exceed the limit of {limits.max_messages}")
        if len(request.tools) > limits.max_tools:
            raise _too_large("tools", f"{len(request.tools)} tools exceed the limit of {limits.max_tools}")
        for i, message in enumerate(request.messages):
            for j, part in enumerate(message.content):
                if part.WhichOneof("part") == "image_data" and len(part.image_data.data) > limits.max_image_bytes:
                    raise _too_large(
                        f"messages[{i}].content[{j}]",
                        f"image of {len(part.image_data.data)} bytes exceeds {limits.max_image_bytes}",
                    )
        if not self.may_use(node, request.model):
            raise RemoteError(Reason.PERMISSION_DENIED, f"node {node!r} may not use model {request.model!r}")
        if time_remaining is None:
            if limits.require_deadline:
                raise RemoteError(
                    Reason.INVALID_REQUEST,
                    "a deadline is required: set a timeout on the call",
                    violations=(FieldViolation("grpc-timeout", "missing"),),
                )
            return limits.max_deadline_s
        return min(time_remaining, limits.max_deadline_s)

    def take_slot(self, node: str, waiting: Collection[str] = ()) -> None:
        """Take one of the sidecar's (and the node's) concurrent stream slots, or OVERLOADED.

        Fair share of the global cap: no node may take the last ``cap // 16`` free slots
        while it holds its share (the cap divided among the nodes holding or ``waiting``
        for slots), so one node filling the sidecar still leaves room for the next node,
        and as its streams end the slots go to the nodes under their share."""
        cap = self.limits.max_concurrent_streams
        held = self._active.get(node, 0)
        node_limit = self.nodes.get(node, NodePolicy()).max_concurrent_streams
        if self._total >= cap:
            raise _overloaded(f"sidecar is at its limit of {cap} concurrent streams")
        if node_limit is not None and held >= node_limit:
            raise _overloaded(f"node {node!r} is at its limit of {node_limit} concurrent streams")
        if self._total >= cap - cap // 16:
            contenders = {n for n, c in self._active.items() if c} | set(waiting) | {node}
            share = max(1, cap // max(2, len(contenders)))  # alone, it still leaves the reserve
            if held >= share:
                raise _overloaded(
                    f"node {node!r} holds {held} of the sidecar's {cap} concurrent streams, its fair share "
                    f"while other nodes may need the last {cap - self._total}"
                )
        self._total += 1
        self._active[node] = held + 1

    def give_back(self, node: str) -> None:
        self._total -= 1
        self._active[node] -= 1

    @property
    def active_streams(self) -> int:
        return self._total


def _too_large(field_name: str, problem: str) -> RemoteError:
    return RemoteError(
        Reason.REQUEST_TOO_LARGE,
        f"request too large: {field_name}: {problem}",
        violations=(FieldViolation(field_name, problem),),
    )


def _overloaded(message: str) -> RemoteError:
    return RemoteError(Reason.OVERLOADED, message, retry_after_s=1.0)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
