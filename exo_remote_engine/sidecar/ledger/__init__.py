"""What was spent: the per-host SQLite ledger, its copy in a shared PostgreSQL (with the
budget reservations several hosts share), the token estimates and bounds charges and
reservations are made of, the price of cache and reasoning tokens, and the outage tracking
of the services several hosts share.

May import: ``config``, ``telemetry``, ``contract``.
"""
