"""Every change this add-on makes to classic exo, installed all together or not at all.

Classic exo (commit e4238f9ef) has no plugin mechanism and does all its work while
``exo.main`` is imported, so :func:`install` runs before that import (the ``.pth`` trigger
in :mod:`exo_remote_engine._startup` or the ``exo-remote-node`` launcher). It builds one
:class:`~.plan.PatchPlan` for this node's role, checks that this exo has every target and
everything the hooks read (names, parameter names passed by keyword, instance attributes),
and only then applies it; an error while applying rolls back. On a mismatch it says once
what is missing and leaves exo exactly as shipped.

Each hooked area of exo has its own module, each hook is a named function taking exo's
original as its first argument:

* ``inference``: ``inference_engine_classes`` / ``get_inference_engine`` (remote nodes: the
  ``remote`` engine); ``resolve_tokenizer`` (remote models' tokenizer, never Hugging Face);
* ``device``: ``device_capabilities`` (remote: label ``remote LLM``, sidecar in ``chip``;
  local: psutil when tinygrad is missing);
* ``download``: ``new_shard_downloader`` (remote nodes download nothing);
* ``node``: ``Node.__init__`` / ``start`` / ``update_peers`` (announcements, departed
  peers, the engine's ``on_token``), ``process_prompt`` and the ring methods (relay to the
  serving node, rings that know their model), ``broadcast_result`` (tokens in order),
  ``get_supported_inference_engines`` / ``select_best_inference_engine`` (remote nodes keep
  their engine);
* ``partitioning``: ``RingMemoryWeightedPartitioningStrategy.partition`` (model-aware rings);
* ``api``: ``ChatGPTAPI.__init__`` and its chat-completions, models, topology,
  initial-models, download and delete handlers (OpenAI answers for remote models under
  their own ids, ``gpt-*`` too; 404 for unknown ids on a remote node; truthful tinychat);
* ``tui``: ``AsyncCallbackSystem.trigger_all`` (exo bug: callbacks share one list, which
  the TUI's buffer extends); ``TopologyViz.update_prompt`` (the prompt panel shows the
  user's last message, not the envelope) and ``_generate_main_layout`` (each sidecar host's
  health under a remote node's entry).

What changes for local models on a node with the add-on (everything else is exo's):
their rings never include a remote node (model-aware partitioning); tokens are broadcast
to peers in order by one sender per request, batched while a send is in flight; every
``on_token`` callback gets its own copy of the token list; the TUI's prompt panel and
ring drawing go through the ``tui`` hooks (unchanged for local models); a node without tinygrad
describes itself with psutil instead of failing. ``EXO_REMOTE_DISABLE=1`` runs exo as
shipped.
"""

from __future__ import annotations

import logging
import os
import sys

from exo_remote_engine.engine.exo_argv import ADDON_FLAGS, ENGINE_NAME, engine_requested, strip_addon_flags
from exo_remote_engine.engine.exo_hooks import api, device, download, inference, node, partitioning, state, tui
from exo_remote_engine.engine.exo_hooks.cards import forget_cards, load_model_cards_at_startup
from exo_remote_engine.engine.exo_hooks.plan import PatchPlan
from exo_remote_engine.engine.settings import EngineSettings

__all__ = ["ADDON_FLAGS", "ENGINE_NAME", "build_plan", "engine_requested", "install", "strip_addon_flags", "uninstall"]

log = logging.getLogger("exo_remote_engine.hooks")
EXO_COMMIT = "e4238f9ef"
_installed: PatchPlan | None = None
_refused = False


def build_plan(remote_node: bool) -> PatchPlan:
    """The patches and needs of a node: every add-on node, plus the engine's on a remote one."""
    patches = [
        *inference.TOKENIZER_PATCHES,
        *partitioning.PATCHES,
        *node.every_node_patches(),
        *api.PATCHES,
        *tui.PATCHES,
    ]
    needs = [*partitioning.NEEDS, *node.NEEDS, *api.NEEDS, *tui.NEEDS, *device.NEEDS]
    if remote_node:
        patches += [*inference.ENGINE_PATCHES, *device.REMOTE_PATCHES, *download.PATCHES, *node.REMOTE_PATCHES]
        needs += download.NEEDS
    else:
        patches += device.LOCAL_PATCHES
    return PatchPlan(patches, needs)


def install(argv: list[str] | None = None, environ: os._Environ[str] | dict[str, str] | None = None) -> bool:
    """Install the hooks for this node's role; returns whether they are in place."""
    global _installed, _refused
    argv = sys.argv if argv is None else argv
    env = os.environ if environ is None else environ
    strip_addon_flags(argv, env)
    remote_node = engine_requested(argv) == ENGINE_NAME
    if _installed is not None or _refused:
        return _installed is not None
    log_level = EngineSettings.from_env(env).log_level
    if log_level:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s %(message)s")
        logging.getLogger("exo_remote_engine").setLevel(log_level.upper())
    plan = build_plan(remote_node)
    missing = plan.missing()
    if missing:
        _refused = True
        _say(
            f"this exo is not the classic exo the add-on hooks (commit {EXO_COMMIT}); missing: "
            + "; ".join(missing)
            + ". Nothing was changed: exo runs as shipped"
            + (", without the remote engine." if remote_node else ".")
        )
        return False
    try:
        plan.apply()
    except Exception as exc:
        _refused = True
        _say(f"applying the hooks failed ({exc!r}); every change was rolled back: exo runs as shipped.")
        return False
    _installed = plan
    if remote_node:
        load_model_cards_at_startup()
    return True


def uninstall() -> None:
    """Revert every patch and forget the hooks' state (tests; exo never needs it)."""
    global _installed, _refused
    if _installed is not None:
        _installed.revert()
        forget_cards()
    _installed = None
    _refused = False
    state.reset()


def _say(message: str) -> None:
    log.warning("%s", message)
    print(f"exo-remote: hooks not installed: {message}", file=sys.stderr, flush=True)
