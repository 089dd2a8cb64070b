"""Test-support helpers shared by the test suite, one copy each (no test module imports
another's helpers):

- real parts: ``openai_upstream`` (the scriptable upstream), ``servers`` (PostgreSQL, Redis),
  ``processes`` (sidecar and exo processes), ``certs``, ``gemma_server``, ``dns_server``,
  ``provider_listings``, ``load_upstream``;
- starting and asking sidecars: ``sidecars`` (in-process), ``configs`` (config files),
  ``harness`` (requests, clients, ``drain``, key-leak checks), ``transports`` (the
  ``transport`` fixture), ``traffic``, ``topology``;
- time and privileges: ``clock`` (a fake clock), ``waits`` (wait for the event, bounded),
  ``minutes`` (rpm/tpm checks that hold whichever real-clock minute windows a burst
  crossed), ``unprivileged`` (run as nobody when root);
- classic exo: ``fake_exo`` and the pin it is checked against, ``exo_signatures``;
- ``real_parts``: a missing real part skips locally and fails with CI=true.
"""
