"""What one call may ask of the sidecar: request limits, deadlines, concurrency, and which
node may use which model.

Checks raise :class:`RemoteError` so they reach clients through the one error table.
A node is named by the bearer token it presents (the name the token is registered under);
without a registered token, by its mTLS client certificate's common name; else it is
``anonymous``. A call presenting both a certificate and a token must name the same node in
both, or it is refused: a certificate cannot move a token's node out of its rules. Once the
config has node rules, a name without rules of its own may use every model only when the
operator declared it (a token file name, ``master-key``, or ``anonymous``); any other name,
a certificate's CN the operator never wrote down, may use nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exo_remote_engine.contract.errors import FieldViolation, Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.sidecar.config.rules import ANONYMOUS, Limits, NodePolicy
from exo_remote_engine.sidecar.config.types import MASTER_KEY_NODE
from exo_remote_engine.sidecar.telemetry.safe_logging import printable

REFRESH_INTERVAL_S = 10.0  # one ListModels(refresh=true) per node per this many seconds
_MAX_REFRESH_NODES = 4096


@dataclass
class Policy:
    limits: Limits = field(default_factory=Limits)
    nodes: Mapping[str, NodePolicy] = field(default_factory=dict)
    token_names: Mapping[str, str] = field(default_factory=dict)  # sha256(token) -> node name
    declared: frozenset[str] = frozenset({ANONYMOUS, MASTER_KEY_NODE})  # names the operator wrote down
    _active: dict[str, int] = field(default_factory=dict)
    _total: int = 0
    _refreshed: dict[str, float] = field(default_factory=dict)  # node -> when it last refreshed

    @classmethod
    def build(cls, limits: Limits, nodes: Mapping[str, NodePolicy], tokens: Mapping[str, str]) -> Policy:
        """``tokens`` maps node name -> token; only token digests are kept."""
        declared = frozenset({ANONYMOUS, MASTER_KEY_NODE, *tokens})
        return cls(limits, dict(nodes), {_digest(t): name for name, t in tokens.items()}, declared)

    def identify(self, metadata: Sequence[tuple[str, Any]] | None, auth_context: Mapping[str, Any]) -> str:
        """The node a call is from: its token's name, else its certificate's CN, else
        ``anonymous``; UNAUTHENTICATED when certificate and token name different nodes."""
        common_names = auth_context.get("x509_common_name") or []
        value = common_names[0] if common_names else None
        common_name = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        named = self.token_names.get(_digest(header[7:])) if header.startswith("Bearer ") else None
        if named is None:
            return str(common_name) if common_name else ANONYMOUS
        if common_name and common_name != named:
            raise RemoteError(
                Reason.UNAUTHENTICATED,
                f"the client certificate names node {printable(common_name, 64)!r} but the token is node "
                f"{named!r}'s; a call's certificate and token must name the same node",
            )
        return named

    def may_use(self, node: str, alias: str) -> bool:
        """Whether ``node``'s rules let it use ``alias``. A node without rules may use all
        when no rules exist or the operator declared its name; an undeclared name (a
        certificate's CN) without rules may use nothing once rules exist."""
        policy = self.nodes.get(node)
        if policy is None:
            return not self.nodes or node in self.declared
        return policy.allows(alias)

    def fallbacks(self, node: str, table: Mapping[str, Sequence[str]], alias: str) -> list[str]:
        """The aliases ``alias`` falls back to in ``table`` (``fallbacks`` or
        ``context_window_fallbacks``) that ``node`` may use, in the table's order: a fallback
        is the node's request on another model, under the node's rules and budget."""
        return [a for a in table.get(alias, ()) if self.may_use(node, a)]

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
            unruled = node not in self.nodes and bool(self.nodes)
            why = f"; node {printable(node, 64)!r} has no rules in the config" if unruled else ""
            raise RemoteError(
                Reason.PERMISSION_DENIED,
                f"node {printable(node, 64)!r} may not use model {printable(request.model, 200)!r}{why}",
            )
        if time_remaining is None:
            if limits.require_deadline:
                raise RemoteError(
                    Reason.INVALID_REQUEST,
                    "a deadline is required: set a timeout on the call",
                    violations=(FieldViolation("grpc-timeout", "missing"),),
                )
            return limits.max_deadline_s
        return min(time_remaining, limits.max_deadline_s)

    def may_refresh(self, node: str, now: float) -> bool:
        """Whether ``node`` may make discovery list the providers again now: once per
        :data:`REFRESH_INTERVAL_S` each, so no node can have the sidecar's keys hammer a
        provider's listing (and be rate limited there, for every node)."""
        last = self._refreshed.get(node)
        if last is not None and 0 <= now - last < REFRESH_INTERVAL_S:
            return False
        if len(self._refreshed) >= _MAX_REFRESH_NODES:  # bounded: names come from callers
            self._refreshed.clear()
        self._refreshed[node] = now
        return True

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
