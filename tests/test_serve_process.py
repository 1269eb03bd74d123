"""`gpt2 serve` as a process: the engine runs in its main thread and uvicorn beside it, so these check what that
arrangement owns: echo's scoring (tensor work handed to the engine's thread) in the real server; a graceful exit
on Ctrl+C and on SIGTERM that ends every request with an answer (a stream's final events, a 503) and logs no
traceback; a taken port or a bad host ending the command with one line before it serves; and, with real clients
over raw sockets (HTTP/1.0, `Connection: close`, keep-alive), the request deadline that cuts a slow client but
never an answer, and a client that hangs up stopping its generation."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import ServerProcess, tiny_checkpoint, wait_until

from gpt2.cli import main
from gpt2.decode import score_tokens
from gpt2.model import GPT
from gpt2.serve.server import quiet_at_shutdown


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


def _assert_one_error_line(code, out: str, err: str, named: str, reason: str) -> None:
    """The CLI's one line for bad input (exit 2) naming the flags, and nothing said about serving."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("gpt2 serve: error: ") and named in lines[0] and reason in lines[0], lines[0]
    assert out == ""  # it never said it was serving


def test_a_taken_port_is_one_line_before_serving(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "gpt2", "serve", "--model", str(checkpoint), "--port",
                               str(port), "--threads", "1", "--no-compile"], capture_output=True, text=True,
                              timeout=120)
    _assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, f"--host 127.0.0.1 --port {port}",
                           "already in use")


@pytest.mark.parametrize("host", ["999.1.1.1", "x" * 300], ids=["999.1.1.1", "label too long"])
def test_a_bad_host_is_one_line_before_serving(checkpoint, host, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--model", str(checkpoint), "--host", host, "--no-compile"])
    out, err = capsys.readouterr()
    _assert_one_error_line(exited.value.code, out, err, f"--host {host}", "resolve")


def _trickle(port: int, parts: list[bytes], pause: float) -> tuple[bytes, float]:
    """Send `parts` on a new connection `pause` seconds apart (stopping if the server closes), then read until
    it closes: (what came back, seconds from connecting to the close)."""
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


# ------------------------------------------------------------------ answers outlast the deadline; hang-ups stop work

STEP_DELAY = 0.1  # seconds added to each engine step: a 15-token answer takes 1.4 s or more, a 127-token one 12.6 s
REQUEST_TIMEOUT = 0.5
MODES = ["HTTP/1.0", "Connection: close", "keep-alive"]
NO_END_OF_TEXT = {"50256": -100}  # every answer runs to max_tokens, so its length is known
LONG = {"prompt": "hi", "max_tokens": 127, "temperature": 0, "logit_bias": NO_END_OF_TEXT}


@pytest.fixture(scope="module")
def slow_server(checkpoint):
    with ServerProcess(checkpoint, "--request-timeout", str(REQUEST_TIMEOUT), step_delay=STEP_DELAY) as s:
        yield s


def _request(body: dict, mode: str) -> bytes:
    """A whole POST /v1/completions, sent as `mode` says."""
    data = json.dumps(body).encode()
    version = "1.0" if mode == "HTTP/1.0" else "1.1"
    close = "Connection: close\r\n" if mode == "Connection: close" else ""
    head = (f"POST /v1/completions HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{close}\r\n")
    return head.encode() + data


def _parse(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of a raw HTTP response, its chunked encoding (if any) undone."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if b"transfer-encoding: chunked" not in head.lower():
        return status, body
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return status, out
        out, body = out + body[:size], body[size + 2:]


def _ask(server, body: dict, mode: str) -> tuple[int, bytes, float]:
    """(status, body, seconds) of one completion: a raw socket read to its close, or an httpx keep-alive client."""
    start = time.monotonic()
    if mode == "keep-alive":
        with httpx.Client(timeout=60) as client:
            r = client.post(server.url + "/v1/completions", json=body)
        return r.status_code, r.content, time.monotonic() - start
    raw, _ = _trickle(server.port, [_request(body, mode)], pause=0)
    return (*_parse(raw), time.monotonic() - start)


def _sse_events(body: bytes) -> list:
    """A stream's `data:` payloads, parsed ("[DONE]" kept as is)."""
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def _health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def _idle(server) -> bool:
    health = _health(server)
    return health["active"] == 0 and health["waiting"] == 0


def test_a_request_that_has_arrived_is_answered_however_long_its_answer_takes(slow_server):
    """The deadline is for the request to arrive: an answer that takes longer (every one here takes more than
    twice as long) is sent whole, on a keep-alive connection as on one that closes after it (HTTP/1.0,
    `Connection: close`), streamed or not."""
    cases = [(mode, stream) for mode in MODES for stream in (False, True)]
    body = {**LONG, "max_tokens": 15}
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda case: _ask(slow_server, {**body, "stream": case[1]}, case[0]), cases))
    for (mode, stream), (status, content, took) in zip(cases, answers):
        assert status == 200 and took > 2 * REQUEST_TIMEOUT, (mode, stream, status, content[:200], took)
        if stream:
            events = _sse_events(content)
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length", (mode, content)
            assert not any("error" in e for e in events[:-1]), (mode, content)
        else:
            assert json.loads(content)["usage"]["completion_tokens"] == body["max_tokens"], (mode, content)


def test_a_client_that_hangs_up_stops_its_generation(slow_server):
    """Six clients (each connection kind, streamed or not) hang up mid-answer: the engine drops their rows,
    well before any of their answers could have ended by itself."""
    sent = time.monotonic()
    clients = []
    for mode in MODES:
        for stream in (False, True):
            c = socket.create_connection(("127.0.0.1", slow_server.port), timeout=15)
            c.sendall(_request({**LONG, "stream": stream}, mode))
            clients.append(c)
    assert wait_until(lambda: _health(slow_server)["active"] == len(clients), timeout=5, interval=0.05)
    for c in clients:
        c.close()
    natural_end = sent + (LONG["max_tokens"] - 1) * STEP_DELAY  # the earliest an answer could end by itself
    assert wait_until(lambda: _idle(slow_server), timeout=natural_end - time.monotonic() - 1, interval=0.05), \
        _health(slow_server)


# ------------------------------------------------------------------ a signal ends every request with an answer

@pytest.mark.parametrize("signals,grace", [([signal.SIGTERM], 0.5), ([signal.SIGINT, signal.SIGINT], 600)],
                         ids=["SIGTERM", "Ctrl+C twice"])
def test_a_signal_ends_every_request_with_an_answer_and_no_traceback(checkpoint, signals, grace):
    """Two requests run (a stream and a plain one, each far from its end) and two wait for a slot: on the signal
    the waiting ones get a 503 at once; the running ones, once the grace has passed (or at a second Ctrl+C),
    a 503 and, for the stream, an error event, its last chunk and [DONE]; the server exits 0 without a
    traceback."""
    with ServerProcess(checkpoint, "--max-batch-size", "2", "--shutdown-timeout", str(grace),
                       step_delay=STEP_DELAY) as s, ThreadPoolExecutor(4) as pool:
        def ask(stream: bool):
            return pool.submit(_ask, s, {**LONG, "stream": stream}, "keep-alive")

        running = [ask(True), ask(False)]
        assert wait_until(lambda: _health(s)["active"] == 2, timeout=30, interval=0.05)
        queued = [ask(True), ask(False)]
        assert wait_until(lambda: _health(s)["waiting"] == 2, timeout=30, interval=0.05)
        s.proc.send_signal(signals[0])
        for status, content, _ in (f.result(timeout=30) for f in queued):
            assert status == 503 and json.loads(content)["error"]["code"] == "server_shutting_down", content
        for sig in signals[1:]:  # the queue's answers show that the first signal was handled
            s.proc.send_signal(sig)
        (stream_status, stream, _), (status, content, _) = (f.result(timeout=30) for f in running)
        assert status == 503 and json.loads(content)["error"]["code"] == "server_shutting_down", content
        events = _sse_events(stream)
        assert stream_status == 200 and events[-1] == "[DONE]", stream
        assert "error" in events[-3] and events[-2]["choices"][0]["finish_reason"] is not None, events[-3:]
        assert s.proc.wait(timeout=30) == 0
        log = s.proc.stderr.read()
    for bad in ("Traceback", "Exception in ASGI application", "CancelledError"):
        assert bad not in log, log


def test_a_request_cut_at_shutdown_is_one_log_line(caplog):
    """uvicorn cancels what still runs once its shutdown limit has passed (a client that stopped reading): during
    a drain that is one info line, not a CancelledError traceback; at any other time the cancellation stands."""
    async def stuck(scope, receive, send) -> None:
        raise asyncio.CancelledError

    engine = SimpleNamespace(draining=False)
    app = quiet_at_shutdown(stuck, engine)
    scope = {"type": "http", "method": "POST", "path": "/v1/completions"}
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(app(scope, None, None))
    engine.draining = True
    with caplog.at_level("INFO", logger="gpt2.serve"):
        asyncio.run(app(scope, None, None))
    assert [r.getMessage() for r in caplog.records] == ["POST /v1/completions: cut at shutdown (the client was not "
                                                        "reading its answer)"]
    assert not any(r.exc_info for r in caplog.records)
