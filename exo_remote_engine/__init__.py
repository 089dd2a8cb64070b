"""exo-remote-engine: hosted and external LLMs as ordinary nodes of an exo cluster."""
