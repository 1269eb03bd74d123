"""`gpt2 serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) with continuous batching.

    gpt2 serve --model RUN_DIR --port 8000          # http://127.0.0.1:8000/ (chat page), /v1/... (OpenAI API)

Design decisions:
- Binds 127.0.0.1 unless `--host` says otherwise: a model server should not be reachable from the network
  by accident. `--api-key` (or the GPT2_API_KEY environment variable, which keeps the key out of `ps`)
  requires `Authorization: Bearer KEY` on every /v1 route.
- This module only parses flags, takes the address (`gpt2.serve.server.listen`: a port in use or a bad host is
  one line and exit 2, before the model loads), loads the model and runs uvicorn in a thread beside the engine,
  which keeps the main thread (`gpt2.serve.server.serve_http_beside`); FastAPI and uvicorn are imported only
  when serving (`serve_on`, `gpt2.serve.server.http_server`), so that the other `gpt2` commands start without
  them (the CLI imports every command module to build its parser). Models load through
  `gpt2.checkpoint.load_model`, as everywhere.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2.checkpoint import load_model
from gpt2.commands import Command
from gpt2.config import arg
from gpt2.decode import WEIGHTS_DTYPE_HELP, WEIGHTS_DTYPE_METAVAR, Engine, decoder_for, load_dtype
from gpt2.errors import UserError, note
from gpt2.serve.server import http_server, listen, serve_http_beside
from gpt2.tokenizer import get_encoding


@dataclass
class ServeConfig:
    model: str = arg("gpt2", help="training run directory, Hugging Face checkpoint directory or hub name")
    host: str = arg("127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    port: int = arg(8000, help="TCP port")
    api_key: str | None = arg(None, help="require 'Authorization: Bearer KEY' on /v1 routes; "
                                         "none = $GPT2_API_KEY if set")
    model_name: str | None = arg(None, help="model id reported by /v1/models; none = the --model folder's name")
    max_batch_size: int = arg(16, help="sequences decoded together at most; more requests wait their turn",
                              minimum=1)
    max_waiting: int = arg(256, help="queued requests beyond this are refused with 429", minimum=1)
    default_max_tokens: int = arg(256, help="max_tokens for chat requests that do not set it", minimum=1)
    device: str = arg("auto", help="cpu, cuda, mps or auto")
    weights_dtype: str = arg("float32", help=WEIGHTS_DTYPE_HELP, metavar=WEIGHTS_DTYPE_METAVAR, aliases=("--dtype",))
    request_timeout: float = arg(10.0, help="seconds a client has to send a whole request (headers and body) "
                                            "from its first byte; slower ones get 408 and are closed "
                                            "(gpt2.serve.timeouts). The answer is not limited", minimum=0.001)
    shutdown_timeout: float = arg(5.0, help="seconds running requests get to finish on Ctrl+C or SIGTERM; then they "
                                            "end (a 503, or a stream's error event and [DONE]); queued ones get a "
                                            "503 at once, and a second Ctrl+C ends all at once", minimum=0.0)
    threads: int | None = arg(None, help="CPU threads for torch (default: torch's choice)", minimum=1,
                              hint="leave it out for torch's choice")
    compile: bool | None = arg(None, help="decode with the model compiled for this CPU (AOTInductor) once it is "
                                          "ready: the server answers at once, eagerly, while the pieces compile in "
                                          "the background (once per model, torch and CPU; cached, see `gpt2 "
                                          "cache`), then switches; /health says which decoder runs. default: on "
                                          "for models of 50M+ parameters on a CPU; --no-compile: never")


def run(cfg: ServeConfig) -> None:
    if not 0 < cfg.port < 65536:
        raise UserError(f"--port {cfg.port}: must be 1..65535")
    load_dtype(cfg.weights_dtype)  # a bad value is said before the port is taken
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    get_encoding()  # fail now, with the one-line reason, rather than with a 500 on every request
    sockets = listen(cfg.host, cfg.port)  # before the model: a taken port is said at once (the module docstring)
    try:
        serve_on(sockets, cfg)
    finally:
        for s in sockets:  # uvicorn closes them when it ran; not when loading the model failed
            s.close()


def serve_on(sockets: list[socket.socket], cfg: ServeConfig) -> None:
    """Load the model and serve it on `sockets` until Ctrl+C or SIGTERM."""
    # the web stack only when serving (see the module docstring): FastAPI here, uvicorn and h11 in http_server
    from gpt2.serve.api import create_app

    model = load_model(cfg.model, cfg.device, load_dtype(cfg.weights_dtype), reads_text="--model").eval()
    name = cfg.model_name or Path(cfg.model.rstrip("/\\")).name or "gpt2"
    api_key = cfg.api_key or os.environ.get("GPT2_API_KEY") or None
    # eager at once; compiled pieces, when wanted, are made ready in the background and switched to between steps
    # by this thread, which runs the engine
    engine = Engine(model, max_batch_size=cfg.max_batch_size,
                    decoder=decoder_for(model, cfg.compile, label=name, say=note, weights_dtype=cfg.weights_dtype))
    app = create_app(engine, model_name=name, api_key=api_key,
                     default_max_tokens=min(cfg.default_max_tokens, model.config.block_size),
                     max_waiting=cfg.max_waiting, start_engine=False, aliases=model_aliases(cfg))
    if not api_key and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {cfg.host} without --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    print(f"serving {name} ({model.num_params() / 1e6:.1f}M parameters, {engine.decoder.weights_dtype} weights) at "
          f"http://{cfg.host}:{cfg.port}/ "
          f"{'(API key required)' if api_key else ''}", flush=True)
    server = http_server(app, engine, cfg.request_timeout, cfg.shutdown_timeout)
    if not serve_http_beside(engine, server, sockets, cfg.shutdown_timeout):
        raise SystemExit(1)  # uvicorn could not start on the sockets (its lifespan failed) and has said why


def model_aliases(cfg: ServeConfig) -> tuple[str, ...]:
    """The other names a request's `model` may give (see `gpt2.serve.api`): the --model value as given and its
    folder's name."""
    given = cfg.model.rstrip("/\\")
    return tuple(n for n in (given, Path(given).name) if n)


COMMAND = Command("serve", "OpenAI-compatible HTTP server with continuous batching and a web chat page",
                  ServeConfig, run)
