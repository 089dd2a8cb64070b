"""The exo side: client, engine, codec, exo hooks."""
