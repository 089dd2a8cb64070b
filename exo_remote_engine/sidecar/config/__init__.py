"""What the operator writes: the model config (LiteLLM ``config.yaml`` or an alias map), node
rules and limits, the token file, and the list of ``EXO_REMOTE_*`` variables.

May import: ``contract`` and ``generated``. Reading a config never needs the control plane,
a transport or the server.
"""
