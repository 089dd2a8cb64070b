"""The exo side: the connection to the sidecar, engine settings, codec, tokenizer, catalog,
cluster, the OpenAI-faithful handler, the launcher and the exo hooks."""
