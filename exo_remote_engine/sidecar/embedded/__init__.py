"""The embedded offline model: llama.cpp's server as a child process on loopback, and the
model file it serves when the sidecar has no config.

May import: ``config``, ``telemetry``, ``contract``.
"""
