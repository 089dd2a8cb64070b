"""Talking to one provider deployment: the OpenAI-compatible (aiohttp) and LiteLLM transports,
the stream types they share, what an upstream may send, and provider errors to the contract.

May import: ``config``, ``telemetry``, ``contract``. Never ``control``: a transport serves
whichever deployment it is handed and knows nothing of nodes, limits or budgets.
"""
