"""``exo-remote``: the command-line face (models, chat, usage, topology, doctor, connection hints).

May import: ``contract``, ``engine`` (its client) and ``generated``; of the sidecar only
``sidecar.config`` and ``sidecar.ledger``, inside the commands that read a local ledger, and
``sidecar.embedded``, inside ``doctor --host`` (is the embedded model there).
"""
