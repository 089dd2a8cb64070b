"""The gRPC server itself: settings from flags and variables, exposure checks, lifecycle,
interceptor guards, the servicer, the streaming backend that drives a transport under
routing (with its first-token guard: deadline and hedging), health, worker processes and
the stall watch.

May import: every sidecar package; nothing imports it but ``exo_remote_engine.server``.
"""
