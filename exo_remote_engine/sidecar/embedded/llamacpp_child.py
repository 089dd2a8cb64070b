"""The embedded model's own process: llama.cpp's server (xllamacpp) on 127.0.0.1.

``python -m exo_remote_engine.sidecar.embedded.llamacpp_child --port N --model FILE ...``, started
and stopped by :class:`~exo_remote_engine.sidecar.embedded.model.EmbeddedModelServer`. A
process of its own so that a crash or a hung C++ shutdown never takes the sidecar down;
it exits when its stdin (a pipe from the sidecar) closes or its parent changes, so even a
SIGKILLed sidecar leaves no orphan.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from exo_remote_engine.sidecar.embedded.model import API_KEY_ENV, DEFAULT_ALIAS, HOST

# The Gemma GGUF carries no chat template, and a builtin template *name* passed with
# use_jinja is taken literally, so this is a real Jinja template with Gemma turns. It is
# lenient about role order: system/tool/developer messages become user turns, assistant
# becomes model. llama.cpp passes bos_token as "" when the tokenizer adds BOS itself.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' or message['role'] == 'model' -%}"
    "{%- set role = 'model' -%}"
    "{%- else -%}"
    "{%- set role = 'user' -%}"
    "{%- endif -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- if message['content'] is string -%}"
    "{%- set ns.text = message['content'] -%}"
    "{%- elif message['content'] -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}"
    "{%- set ns.text = ns.text + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (ns.text | trim) + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<start_of_turn>model\\n' -}}"
    "{%- endif -%}"
)

# SmolLM2-135M-Instruct's own template (ChatML, ending turns with its <|im_end|> stop token)
# as its GGUF carries it, with one change: the default system line. With the GGUF's line
# ("You are a helpful AI assistant named SmolLM, trained by Hugging Face") the Q4_1 file at
# temperature 0 answers "What is the capital of France?" with "L'Étoile, la Marseillaise,
# la femme, ..." until max_tokens; with "You are a helpful assistant." it says "The capital
# of France is Paris." and stops (measured 2026-12-07; a haiku and a greeting also stop).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {"gemma": GEMMA_CHAT_TEMPLATE, "smollm2": SMOLLM2_CHAT_TEMPLATE}


def build_params(
    model_path: str | Path,
    port: int,
    alias: str = DEFAULT_ALIAS,
    *,
    n_ctx: int = 4096,
    n_parallel: int = 2,
    threads: int = 1,
    api_key: str | None = None,
    chat_template: str | None = GEMMA_CHAT_TEMPLATE,
    n_predict: int = -1,
) -> Any:
    """``xllamacpp.CommonParams`` for serving one model on loopback (imports xllamacpp).
    ``n_ctx`` is the total, shared by the ``n_parallel`` slots; ``n_predict`` is the reply
    length of a request without max_tokens (-1: up to the context)."""
    import xllamacpp

    params: Any = xllamacpp.CommonParams()
    params.model.path = str(model_path)
    params.hostnames = [HOST]
    params.port = port
    params.model_alias = {alias}
    params.n_ctx = n_ctx
    params.n_parallel = n_parallel
    # One thread by default: on small shared boxes two collapse generation under any other load.
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.use_jinja = True
    if chat_template:
        params.chat_template = chat_template
    if api_key:
        params.api_keys = [api_key]
    params.n_predict = n_predict
    params.ui = False
    # The default auto-fit probing adds 15-25 s to start-up and changes nothing here.
    params.fit_params = False
    return params


def _serve(args: argparse.Namespace) -> int:
    """Run llama.cpp's server until SIGTERM/SIGINT, stdin EOF (the sidecar is gone) or the
    parent process changing."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(0, 4096):
                pass
        stop.set()

    if args.watch_stdin:
        threading.Thread(target=watch_stdin, name="parent-watch", daemon=True).start()

    import xllamacpp

    model = Path(args.model)
    template = None if args.own_template else TEMPLATES[args.chat_template]
    params = build_params(
        model,
        args.port,
        args.alias,
        n_ctx=args.n_ctx,
        n_parallel=args.n_parallel,
        threads=args.threads,
        api_key=os.environ.get(API_KEY_ENV) or None,
        chat_template=template,
        n_predict=args.n_predict,
    )
    server: Any = xllamacpp.Server(params)
    print(f"READY http://{HOST}:{args.port}/v1 alias={args.alias}", flush=True)
    if args.quiet_after_start:
        # llama.cpp logs ~800 bytes per request; a long-lived sidecar keeps only the start-up
        # output (what explains a failed start), not an ever-growing file.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    while not stop.wait(0.5):
        if os.getppid() != parent:  # orphaned without our stdin closing (e.g. not a pipe)
            break
    # Dropping the server stops its threads; never let a hung C++ shutdown keep us alive.
    watchdog = threading.Timer(5.0, os._exit, args=(0,))
    watchdog.daemon = True
    watchdog.start()
    del server
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a GGUF model with llama.cpp (xllamacpp) on 127.0.0.1.")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help="model id served (default: %(default)s)")
    parser.add_argument("--model", required=True, help="GGUF file path")
    parser.add_argument("--n-ctx", type=int, default=4096, help="total context over all slots (default: %(default)s)")
    parser.add_argument("--n-parallel", type=int, default=2, help="parallel slots (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--own-template", action="store_true", help="use the GGUF's chat template")
    parser.add_argument("--chat-template", choices=sorted(TEMPLATES), default="gemma", help="default: %(default)s")
    parser.add_argument("--n-predict", type=int, default=-1, help="reply tokens when a request names none")
    parser.add_argument("--watch-stdin", action="store_true", help="exit when stdin reaches EOF")
    parser.add_argument("--quiet-after-start", action="store_true", help="drop llama.cpp's output once serving")
    return _serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
