"""Admission and fairness: who a caller is (auth), what it may ask (policy), its rpm/tpm
windows and budget (a reservation per request, reply_limit holding a reply to it), which
deployment serves it (routing, ranked by tail latency in latency), how it waits for
capacity, fair across nodes (queueing), and what it is charged (accounting).

May import: ``config``, ``ledger``, ``telemetry``, ``contract``. Never a transport or the
server: control decides, the serving layer acts.
"""
