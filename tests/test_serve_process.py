"""`gpt2 serve` as a process: the engine runs in its main thread and uvicorn beside it, so these check what that
arrangement owns: echo's scoring (tensor work handed to the engine's thread) in the real server, a graceful exit
on Ctrl+C and on SIGTERM, and a taken port ending the command with uvicorn's reason."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx
import pytest
from serve_helpers import ServerProcess, tiny_checkpoint

from gpt2.decode import score_tokens
from gpt2.model import GPT


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_ok):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serves_echo_logprobs_then_exits_cleanly_on_a_signal(checkpoint, sig):
    prompt = [5, 17, 99, 3]
    with ServerProcess(checkpoint) as s:
        body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["logprobs"]["token_logprobs"][1:len(prompt)]
        want = [lp.logprob for lp in score_tokens(GPT.from_pretrained(checkpoint).eval(), [prompt])[0][1:]]
        assert got == pytest.approx(want, abs=1e-4)  # another process, threads and batch shapes: last bits differ
        s.proc.send_signal(sig)
        assert s.proc.wait(timeout=20) == 0
        assert "Traceback" not in s.proc.stderr.read()


def test_a_taken_port_ends_the_command_with_the_reason(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "gpt2", "serve", "--model", str(checkpoint), "--port",
                               str(port), "--threads", "1", "--no-compile"], capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 1
    assert "address already in use" in proc.stderr.lower() and "Traceback" not in proc.stderr


def _trickle(port: int, parts: list[bytes], pause: float) -> tuple[bytes, float]:
    """Send `parts` on a new connection `pause` seconds apart (stopping if the server closes), then read until
    it closes: (what came back, seconds from connecting to the close)."""
    import select
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=15) as c:
        start = time.monotonic()
        for part in parts:
            c.sendall(part)
            if select.select([c], [], [], pause)[0]:  # the server answered (or closed): stop sending
                break
        got = b""
        while chunk := c.recv(4096):
            got += chunk
        return got, time.monotonic() - start


def test_a_client_that_sends_its_headers_slowly_is_cut_off(checkpoint):
    """Slowloris: uvicorn's keep-alive timer stops at a client's first byte, so a request trickled byte by byte
    held its connection forever; --request-timeout gives the whole request that long to arrive."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n\r\n"
    with ServerProcess(checkpoint, "--request-timeout", "1") as s:
        # 2 bytes every 0.4 s: the whole request would take 10 s; cut off after 1 s (slack for a loaded machine)
        got, took = _trickle(s.port, [request[i:i + 2] for i in range(0, len(request), 2)], pause=0.4)
        assert got.startswith(b"HTTP/1.1 408 Request Timeout") and 0.9 < took < 6, (got, took)
        got, took = _trickle(s.port, [], pause=0)  # connects and says nothing
        assert got.startswith(b"HTTP/1.1 408") and 0.9 < took < 6, (got, took)
        got, _ = _trickle(s.port, [request.replace(b"Host: x", b"Host: x\r\nConnection: close")], pause=0)
        assert got.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in got  # a prompt request is answered
        with httpx.Client() as client:  # a keep-alive connection's later requests get the same deadline
            assert client.get(s.url + "/health").status_code == 200
            assert client.get(s.url + "/health").status_code == 200
    assert "Traceback" not in s.proc.stderr.read()
