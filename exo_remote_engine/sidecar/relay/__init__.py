"""The relay: one completion from a provider to a writer. The streaming backend drives a
transport under routing, retries and fallbacks; the first-token guard gives it a deadline
and hedging; the stall watch ends a stream whose reader stopped. It knows requests and
deployments, not gRPC calls: Generate and Session (serving/) both hand it a writer.

May import: contract, config, control, transports, telemetry.
"""
