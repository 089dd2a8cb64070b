"""The operator's view on the ``--metrics-listen`` port: the status page (``GET /``, one
self-contained HTML page with a server-drawn SVG chart, nothing from outside), its data
(``GET /status.json``) and the Prometheus exposition (``GET /metrics``), with the gauges
that only a look at the control plane can fill (budgets, rpm/tpm use, cooldowns, the
spend copy's lag). Who may read it off loopback (an admin node, by token or client
certificate) is checked here too.

May import: ``config``, ``control``, ``ledger``, ``telemetry``, ``contract``. What it needs
from discovery and the server (which models are ready, the worker ports) is handed to it
by ``serving`` as plain callables.
"""
