"""The key-holding sidecar: config, LiteLLM backend, error mapping, auth."""
