"""What the sidecar tells its operator: Prometheus metrics and log records a client cannot
forge or inflate.

May import: ``contract``. Every other sidecar package may import it.
"""
