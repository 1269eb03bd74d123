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


def one_torch_thread():
    """Fixture body: tiny models run fastest on one thread, and far faster than on two on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
