"""The contract both sides share beyond the protos: one error table (both directions), the
OpenAI chat mapping, the health stubs, the sidecar address forms and secret redaction.

May import: ``generated`` only. Everything else (engine, sidecar, cli) builds on it, so it
stays free of LiteLLM and of anything one side alone needs.
"""
