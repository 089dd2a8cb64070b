"""The ``grpc.health.v1`` stubs for the sidecar and the engine: import them from here only.

Why a compiled-in copy (protos/grpc/health/v1, generated into
``exo_remote_engine/generated/grpc_health``) rather than the ``grpcio-health-checking``
package: its releases that go with classic exo's grpcio 1.70.0 (1.69.0, 1.70.0) carry
protobuf gencode 5.29.0 and refuse to import under exo's protobuf 5.28.1 (``VersionError:
gencode 5.29.0 runtime 5.28.1``), and 1.68.1, which imports there, requires protobuf < 6,
which the sidecar's LiteLLM environment is past. Our copy (gencode 5.28.1) imports in both.

The catch: both copies define the same symbols (``grpc.health.v1.HealthCheckRequest``, ...)
and protobuf's default descriptor pool takes each symbol once, so whichever module is
imported second raises ``TypeError: Couldn't build proto file into descriptor pool:
duplicate symbol`` (the pure-Python runtime: "Conflict register"). The wire name must stay
``grpc.health.v1`` for health checkers, so the names cannot differ. Hence: when the
standard package imports in this process it is used and our copy is never loaded (either
import order is then safe); otherwise our copy is used.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exo_remote_engine.generated.grpc_health import health_pb2, health_pb2_grpc
else:
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except Exception:  # not installed, or its gencode is newer than this protobuf runtime
        if "grpc_health.v1.health_pb2" in sys.modules:
            raise  # its messages are registered already: ours would collide with them
        from exo_remote_engine.generated.grpc_health import health_pb2, health_pb2_grpc

__all__ = ["health_pb2", "health_pb2_grpc"]
