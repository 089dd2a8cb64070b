"""Dynamic model discovery: what the sidecar's keys and servers make available right now.

Nobody maintains a static model list. At every refresh the sidecar

* asks each hosted provider whose key it holds for its model listing (one declarative
  :class:`ProviderSpec` per provider in :data:`PROVIDERS`), following pagination;
* asks each configured local / OpenAI-compatible server (:class:`ServerSpec`: Ollama,
  llama.cpp, vLLM, LM Studio, generic ``/v1/models``), plus Ollama's default local address
  unless told otherwise;
* keeps chat-capable models only (:func:`is_chat_model`, every filter rule in one place);
* fills per-model metadata (context window, max output tokens, tools, images) from the
  listing where the provider reports it and from LiteLLM's *bundled* model map otherwise,
  and only when the model is in that map: unknown stays ``None``, never a guess;
* marks every model ready or not, with a reason a person can act on
  (``set ANTHROPIC_API_KEY on the sidecar``, ``the sidecar's ANTHROPIC_API_KEY was rejected
  (HTTP 401)``, ``server at http://127.0.0.1:1234 unreachable``, ...).

:class:`ModelDiscovery` caches the result for a TTL, refreshes in the background, queries
every source concurrently under its own timeout (a hung provider never delays the others),
serves a provider's last good listing while its refresh fails, and lets concurrent callers
share one in-flight refresh. :func:`merge` puts explicit config entries first (they win on
alias clashes) and :func:`choose_default` picks a default model deterministically.

Keys come from the ``environ`` mapping the discovery is given (read again at every refresh,
so a key added to a re-read env file is picked up) and travel only in request headers and in
:attr:`ModelEntry.params` (kept out of every ``repr``). No reason, status or log line is ever
built from a key or from a provider's response text.

``litellm.get_valid_models`` is deliberately not used (blocking, unbounded, names only, stale
or wrong for several providers); neither are LiteLLM's ``supports_*`` helpers, which answer
False for unknown models.

Modules, one concern each:

* :mod:`.types`: the records (``ListedModel``, ``DiscoveredModel``, ``SourceStatus``,
  ``ProviderSpec``, ``ServerSpec``);
* :mod:`.chat_filter`: which ids are chat models;
* :mod:`.untrusted_json`: typed readers for listing bodies;
* :mod:`.hosted_parsers`, :mod:`.server_parsers`: one parser per listing shape;
* :mod:`.providers`: the table of hosted providers;
* :mod:`.model_map`: LiteLLM's bundled map, read with guards;
* :mod:`.http_listing`: fetching and paging a listing, failure reasons;
* :mod:`.local_servers`: local / OpenAI-compatible server kinds;
* :mod:`.entries`: discovered models as config entries, merged with the config's;
* :mod:`.default_model`: the default-model heuristic;
* :mod:`.service`: ``ModelDiscovery``, the cache and refresh service.

This package exports only what the rest of the sidecar (and its tests) use.
"""

from exo_remote_engine.sidecar.discovery.chat_filter import is_chat_model
from exo_remote_engine.sidecar.discovery.default_model import choose_default
from exo_remote_engine.sidecar.discovery.entries import merge
from exo_remote_engine.sidecar.discovery.model_map import known_chat_models
from exo_remote_engine.sidecar.discovery.providers import PROVIDERS
from exo_remote_engine.sidecar.discovery.service import ModelDiscovery
from exo_remote_engine.sidecar.discovery.types import DiscoveredModel, ServerSpec, SourceStatus

__all__ = [
    "PROVIDERS",
    "DiscoveredModel",
    "ModelDiscovery",
    "ServerSpec",
    "SourceStatus",
    "choose_default",
    "is_chat_model",
    "known_chat_models",
    "merge",
]
