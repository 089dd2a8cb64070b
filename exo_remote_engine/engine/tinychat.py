"""What the add-on adds to exo's web page (tinychat) for remote models.

tinychat (exo's ``index.js``) starts every chat with ``llama-3.2-1b`` selected, which a
remote-only node cannot run, and groups its sidebar by the first two dash-separated parts
of each model id, so every remote model landed in a family of its own named after its id
("SLOW > OTHER > Slow (OpenAI)"). exo serves the page from its own files, so the add-on
serves ``index.html`` with one extra script after ``index.js`` (exo's files are not
changed): once Alpine has started it

* groups models that carry a ``provider`` field (the add-on's remote entries in
  ``/initial_models`` and ``/modelpool``) by provider, then family, under readable names,
  and leaves exo's own models to exo's grouping;
* selects the node's default remote model whenever the selection is not a model this page
  lists (tinychat's hard-coded default, or a model that went away).

Pure text in, text out: the hook in :mod:`~exo_remote_engine.engine.exo_hooks.api` serves it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from exo_remote_engine.engine.catalog import PROVIDER_NAMES, base_name
from exo_remote_engine.generated import remote_inference_pb2 as pb

# After exo's own script, so exo's Alpine component is registered first.
_ANCHOR = '<script src="/index.js"></script>'
REMOTE_PROVIDER_UNKNOWN = "Remote"

_SCRIPT = """<script id="exo-remote-tinychat">
(() => {
  const config = %s;
  document.addEventListener("alpine:initialized", () => {
    const main = document.querySelector("main");
    const data = main && window.Alpine && Alpine.$data(main);
    if (!data || typeof data.groupModelsByPrefix !== "function") return;
    const exoGrouping = data.groupModelsByPrefix;
    data.groupModelsByPrefix = function (models) {
      const own = {};
      const remote = [];
      for (const [id, model] of Object.entries(models || {})) {
        if (model && typeof model.provider === "string") remote.push([id, model]);
        else own[id] = model;
      }
      const groups = exoGrouping.call(this, own);
      for (const [id, model] of remote) {
        if (this.showDownloadedOnly && !model.downloaded) continue;
        const provider = (groups[model.provider] ||= {});
        (provider[model.family || "Models"] ||= {})[id] = model;
      }
      return groups;
    };
    Alpine.effect(() => {
      const models = data.models || {};
      const selected = data.cstate && data.cstate.selectedModel;
      if (!data.cstate || selected in models) return;
      const fallback = Object.keys(models).find((id) => models[id] && models[id].provider && models[id].downloaded);
      const choice = config.default_model in models ? config.default_model : fallback;
      // Set outside the effect's run: a change made inside it does not reach tinychat's
      // other bindings (the model name above the input kept showing the old selection).
      if (!choice) return;
      setTimeout(() => {
        if (!(data.cstate.selectedModel in data.models)) data.cstate.selectedModel = choice;
      });
    });
  });
})();
</script>"""


def page_with_addon(index_html: str, default_model: str | None) -> str:
    """exo's index.html with the add-on's script after exo's own (unchanged if exo's page
    does not load ``index.js`` the way the script expects)."""
    if _ANCHOR not in index_html:
        return index_html
    config = json.dumps({"default_model": default_model}).replace("</", "<\\/")
    return index_html.replace(_ANCHOR, _ANCHOR + "\n" + _SCRIPT % config, 1)


def sidebar_fields(exo_id: str, model: pb.Model | None) -> dict[str, Any]:
    """The fields the script groups by: provider and family, and the readable name shown
    inside the provider's group (so without the provider, which the group names)."""
    if model is None:  # served by a peer: its announcement names the model only
        return {"provider": REMOTE_PROVIDER_UNKNOWN, "family": family_of(exo_id), "name": base_name(exo_id, None)}
    provider = PROVIDER_NAMES.get(model.provider, model.provider.title() or REMOTE_PROVIDER_UNKNOWN)
    return {"provider": provider, "family": family_of(model.alias), "name": base_name(model.alias, model.display_name)}


def family_of(alias: str) -> str:
    """A model's family for the sidebar: its id's first word, as exo groups its own models
    ("gpt-4o-mini" -> "GPT", "claude-3-5-haiku" -> "Claude")."""
    first = next((w for w in re.split(r"[-_/:.\s]+", alias) if w), alias)
    return base_name(first, None)
