"""The exo side's one connection layer to a sidecar: where it is and how we prove who we
are (target), the client (retries, hosts, workers, one error type) and the per-node
multiplexed session that carries many completions on one stream.

May import: contract and the engine's settings; nothing of exo or of the rest of the engine.
"""
