"""The gRPC server itself: settings from flags and variables, exposure checks, lifecycle,
interceptor guards, the servicer (one call per completion: Generate), the multiplexed
Session (many completions of one node on one stream), health and worker processes. What a
completion does once admitted is the relay's (sidecar/relay/).

May import: every sidecar package; nothing imports it but ``exo_remote_engine.server``.
"""
