"""Helpers shared by the serving tests: a tiny random checkpoint and a uvicorn server in a thread."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import torch

from gpt2.model import GPT, GPTConfig

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)


def tiny_checkpoint(path: Path) -> Path:
    """A random tiny model saved with save_pretrained (deterministic weights)."""
    torch.manual_seed(1)
    GPT(TINY).save_pretrained(path)
    return path


class LiveServer:
    """Run an ASGI app with uvicorn on 127.0.0.1 on a free port, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def tiny_model(tmp_path_factory, tokenizer_ok) -> GPT:
    """Fixture body: the tiny checkpoint, loaded as the server loads it."""
    return GPT.from_pretrained(tiny_checkpoint(tmp_path_factory.mktemp("tiny"))).eval()


def tiny_server(model: GPT):
    """Fixture body: the API on `model` (named "tiny") served on 127.0.0.1 in this process."""
    from gpt2.decode.engine import Engine
    from gpt2.serve.api import create_app

    with LiveServer(create_app(Engine(model), model_name="tiny")) as s:
        yield s


def one_torch_thread():
    """Fixture body: tiny models run fastest on one thread, and far faster than on two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# `python -c SLOW_STEPS SECONDS serve ...`: the CLI with every engine step delayed by SECONDS, so that an answer
# outlasts a deadline or a signal (a tiny model's whole answer takes milliseconds)
SLOW_STEPS = """
import sys, time
from gpt2.decode.engine import Engine
delay, step = float(sys.argv.pop(1)), Engine.step
def slow_step(self):
    time.sleep(delay)
    step(self)
Engine.step = slow_step
from gpt2.cli import main
main()
"""


class ServerProcess:
    """`gpt2 serve` in a child process on 127.0.0.1 (its own interpreter, so a test's client threads do not
    compete with the server for one GIL, as real clients do not). `step_delay`: seconds added to every engine
    step (`SLOW_STEPS`)."""

    def __init__(self, model_dir: Path, *flags: str, step_delay: float = 0.0):
        import os
        import subprocess
        import sys

        with socket.socket() as s:  # a free port (the tiny race with other processes is acceptable in tests)
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
        launch = ["-c", SLOW_STEPS, str(step_delay)] if step_delay else ["-m", "gpt2"]
        self.proc = subprocess.Popen([sys.executable, *launch, "serve", "--model", str(model_dir), "--host",
                                      "127.0.0.1", "--port", str(self.port), "--threads", "1", "--no-compile", *flags],
                                     env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> ServerProcess:
        import httpx

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpt2 serve exited: {self.proc.stderr.read()[-2000:]}")
            try:
                return httpx.get(self.url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        if not wait_until(up, timeout=60, interval=0.2):
            self.__exit__()
            raise RuntimeError("gpt2 serve did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait(timeout=10)
