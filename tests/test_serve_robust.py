"""No request can break the server or another request: property-based fuzzing of OpenAI's request schemas
(hypothesis) against a live server with zero 5xx allowed while valid requests run beside it and stay exact;
an error inside one request fails that request alone; /health stays fast while 32 clients stream."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import LiveServer, ServerProcess, one_torch_thread, tiny_checkpoint

from gpt2.decode.engine import Engine
from gpt2.inference import generate, pad_right
from gpt2.model import GPT
from gpt2.serve.api import create_app
from gpt2.serve.schema import ENGINE_FIELDS
from gpt2.tokenizer import decode, encode

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

FUZZ_CASES = int(os.environ.get("GPT2_FUZZ_CASES", "100"))  # per endpoint; more: GPT2_FUZZ_CASES=N


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_ok) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return GPT.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def server_process(checkpoint):
    with ServerProcess(checkpoint, "--default-max-tokens", "8") as s:
        yield s


@pytest.fixture(scope="module")
def server(model):
    with LiveServer(create_app(Engine(model), model_name="tiny")) as s:
        yield s


# ------------------------------------------------------------------ strategies: every field, typed and not

def _json_values() -> st.SearchStrategy:
    """Any JSON value, with the extremes that break naive servers: huge ints, NaN/inf, odd unicode."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)


def _extreme(typed: st.SearchStrategy) -> st.SearchStrategy:
    """Extreme values of the field's own type, sometimes anything at all."""
    return st.one_of(typed, typed, _json_values())


TINY_FLOATS = st.sampled_from([0.0, 5e-324, 1e-300, 1e-100, 1e-45, 1e-40, 1e-8, 1e-5, 0.5, 1.0, 2.0, 2.0000001])
FLOATS = st.one_of(TINY_FLOATS, st.floats(allow_nan=True, allow_infinity=True))
INTS = st.one_of(st.integers(-3, 20), st.sampled_from([128, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]),
                 st.integers())
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", "<|endoftext|>", "\u202e\u0000\ufeff", "🦜" * 30,
                                                        "\ud800", "x" * 2000]))
TOKENS = st.lists(st.one_of(st.integers(0, 50256), INTS), max_size=12)
SHORT = st.text(max_size=12)
VALID_TOKENS = st.lists(st.integers(0, 50256), max_size=6)
PENALTY = st.floats(-2, 2)


def engine_knob(name: str, valid: st.SearchStrategy, off) -> st.SearchStrategy:
    """A knob the server may not have yet: its valid values once it has, else only its "off" value."""
    return valid if name in ENGINE_FIELDS else st.just(off)


# field -> (valid values, extreme values): a body is valid values for a random subset of the fields, then a few
# fields replaced by extreme ones, so the fuzzing reaches generation as well as every validation path
COMMON = {
    "model": (SHORT, _extreme(TEXT)),
    "max_tokens": (st.integers(1, 6), _extreme(INTS)),
    "temperature": (st.one_of(TINY_FLOATS, st.floats(0, 2)), _extreme(FLOATS)),
    "top_p": (st.one_of(TINY_FLOATS, st.floats(0, 1)), _extreme(FLOATS)),
    "n": (st.integers(1, 3), _extreme(INTS)),
    "stop": (st.one_of(SHORT, st.lists(SHORT, max_size=4)), _extreme(st.one_of(TEXT, st.lists(TEXT, max_size=6)))),
    "seed": (st.integers(-(2**63), 2**63 - 1), _extreme(INTS)),
    "stream": (st.booleans(), _json_values()),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), _json_values()),
    "presence_penalty": (engine_knob("presence_penalty", PENALTY, 0.0), _extreme(FLOATS)),
    "frequency_penalty": (engine_knob("frequency_penalty", PENALTY, 0.0), _extreme(FLOATS)),
    "logit_bias": (engine_knob("logit_bias", st.dictionaries(st.integers(0, 50256).map(str), st.floats(-100, 100),
                                                             max_size=3), {}),
                   _extreme(st.dictionaries(st.one_of(INTS.map(str), TEXT), FLOATS, max_size=4))),
    "user": (SHORT, _json_values()),
    "service_tier": (st.sampled_from(["auto", "default"]), _extreme(TEXT)),
    "store": (st.just(False), _json_values()),
    "metadata": (st.dictionaries(SHORT, SHORT, max_size=3), _json_values()),
}
COMPLETION = {
    **COMMON,
    "prompt": (st.one_of(SHORT, st.lists(SHORT, min_size=1, max_size=3), VALID_TOKENS),
               _extreme(st.one_of(TEXT, st.lists(TEXT, max_size=4), TOKENS, st.lists(TOKENS, max_size=4)))),
    "suffix": (st.just(""), _extreme(TEXT)),
    "echo": (st.booleans(), _json_values()),
    "logprobs": (engine_knob("logprobs", st.integers(0, 5), None), _extreme(INTS)),
    "best_of": (st.just(1), _extreme(INTS)),
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                                 "content": st.one_of(SHORT, st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text"), "text": SHORT}), max_size=2))})
ODD_MESSAGE = st.fixed_dictionaries(
    {"role": _extreme(st.sampled_from(["user", "tool", "function", ""]))},
    optional={"content": _extreme(st.one_of(TEXT, st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": TEXT}), max_size=3))), "name": _json_values()})
USER = st.fixed_dictionaries({"role": st.just("user"), "content": SHORT})
CHAT = {
    **COMMON,
    "messages": (st.builds(lambda history, last: history + [last], st.lists(MESSAGE, max_size=3), USER),
                 _extreme(st.lists(st.one_of(MESSAGE, ODD_MESSAGE), max_size=4))),
    "max_completion_tokens": (st.integers(1, 6), _extreme(INTS)),
    "logprobs": (engine_knob("logprobs", st.booleans(), False), _json_values()),
    "top_logprobs": (st.none(), _extreme(INTS)),
    "response_format": (st.just({"type": "text"}),
                        _extreme(st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "x"])}))),
    "tool_choice": (st.just("none"), _json_values()),
    "parallel_tool_calls": (st.booleans(), _json_values()),
    "modalities": (st.just(["text"]), _json_values()),
    **{name: (st.none(), _json_values()) for name in ("tools", "functions", "function_call", "audio", "prediction",
                                                       "reasoning_effort", "verbosity", "web_search_options")},
}


@st.composite
def bodies(draw, schema: dict, required: str):
    """A request body: valid values for the required field and a random subset of the others, then up to three
    fields given extreme values; now and then not a JSON object at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_json_values())
    optional = {k: valid for k, (valid, _) in schema.items() if k != required}
    body = draw(st.fixed_dictionaries({required: schema[required][0]}, optional=optional))
    for key in draw(st.lists(st.sampled_from(sorted(schema)), max_size=3, unique=True)):
        body[key] = draw(schema[key][1])
    return body


def send(server, path: str, body, client: httpx.Client | None = None) -> tuple[int, str]:
    """POST `body` (JSON; NaN/Infinity written as JavaScript does) and read the whole answer, streamed or not.
    Pass a `client` to reuse its connections (a new httpx client costs ~0.1 s: it builds an SSL context)."""
    content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    with (client or httpx).stream("POST", server.url + path, content=content, timeout=60,
                                  headers={"Content-Type": "application/json"}) as r:
        text = r.read().decode("utf-8", "replace")
    return r.status_code, text


def check_answer(status: int, text: str) -> None:
    """A 2xx is a completion (or a stream of them); anything else OpenAI's error object."""
    assert status < 500, text
    if status == 200 and text.startswith("data:"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e[:10] for e in events), text
    elif status == 200:
        assert json.loads(text)["choices"], text
    else:
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}


# ------------------------------------------------------------------ valid requests beside the fuzzing

class ValidTraffic:
    """Background threads sending valid greedy requests whose answers are known; every one must be exact."""

    PROMPTS = ["The quick brown fox", "Once upon a time", "To be or not to be"]

    def __init__(self, server, model, threads: int = 2):
        self.server, self.expected = server, {p: decode(generate(model, *pad_right([encode(p)]), 0.0, 8)[0])
                                              for p in self.PROMPTS}
        self.stop, self.ok, self.failures = threading.Event(), 0, []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        k, client = 0, httpx.Client(timeout=60)
        while not self.stop.is_set():
            prompt = self.PROMPTS[(i + k) % len(self.PROMPTS)]
            k += 1
            try:
                r = client.post(self.server.url + "/v1/completions",
                                json={"prompt": prompt, "max_tokens": 8, "temperature": 0})
                if r.status_code != 200 or r.json()["choices"][0]["text"] != self.expected[prompt]:
                    self.failures.append(r.text)
                else:
                    self.ok += 1
            except Exception as e:  # a reset connection is a failure too
                self.failures.append(repr(e))

    def __enter__(self) -> ValidTraffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


@pytest.mark.parametrize("path,schema,required", [("/v1/completions", COMPLETION, "prompt"),
                                                  ("/v1/chat/completions", CHAT, "messages")])
def test_fuzzed_requests_never_get_5xx_and_never_disturb_valid_ones(server_process, model, path, schema,
                                                                    required):
    server = server_process
    seen = {"cases": 0, "5xx": 0, "2xx": 0}

    @hypothesis.settings(max_examples=FUZZ_CASES, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(bodies(schema, required))
    def fuzz(body):
        status, text = send(server, path, body, client)
        seen["cases"] += 1
        seen["5xx"] += status >= 500
        seen["2xx"] += status == 200
        check_answer(status, text)

    with ValidTraffic(server, model) as traffic, httpx.Client() as client:
        fuzz()
    print(f"\n{path}: {seen['cases']} fuzzed cases, {seen['5xx']} 5xx, {seen['2xx']} 200; "
          f"{traffic.ok} valid requests beside them, {len(traffic.failures)} failed")
    assert seen["5xx"] == 0 and seen["cases"] >= FUZZ_CASES
    assert seen["2xx"] > FUZZ_CASES // 20  # the fuzzing reaches generation, not only validation
    assert traffic.failures == [] and traffic.ok > 0


@pytest.mark.parametrize("body", [
    {"prompt": [[]]}, {"prompt": [""]}, {"prompt": []}, {"prompt": [[1, 2], []]}, {"prompt": [[[1]]]},
    {"prompt": [50256] * 127, "max_tokens": 1}, {"prompt": "hi", "max_tokens": 128, "n": 16},
    {"prompt": "\ud83e\udd9c" * 10, "stop": ["\u0000", "🦜"], "max_tokens": 5},
    {"prompt": "hi", "seed": 2**63 - 1, "n": 16, "max_tokens": 1},
    {"prompt": "hi", "temperature": 5e-324, "top_p": 5e-324, "max_tokens": 3, "stream": True},
])
def test_edge_cases_answer_below_500(server, body):
    check_answer(*send(server, "/v1/completions", body))


def test_an_error_inside_one_request_fails_only_that_request(server, model, monkeypatch, caplog):
    """A bug hit by one request (here: the text stream raises for it once it has released some text, so that a
    stream has begun) is that request's 500 (or its stream's error event), logged as one line with the cause;
    requests running beside it finish exactly."""
    from gpt2.serve import api

    class Poisoned(api.TextStream):
        def push(self, token: int) -> str:
            if "POISON" in self.stop and self.sent:
                raise RuntimeError("poisoned request")
            return super().push(token)

    monkeypatch.setattr(api, "TextStream", Poisoned)
    with caplog.at_level("ERROR", logger="gpt2.serve"), ValidTraffic(server, model) as traffic:
        time.sleep(0.2)
        poisoned = {"prompt": "x", "stop": "POISON", "max_tokens": 8, "seed": 1, "logit_bias": {"50256": -100}}
        bad = httpx.post(server.url + "/v1/completions", json=poisoned, timeout=30)
        status, text = send(server, "/v1/completions", {**poisoned, "stream": True})
        time.sleep(0.2)
    assert bad.status_code == 500 and "RuntimeError" in bad.json()["error"]["message"]
    assert status == 200 and '"error"' in text and text.rstrip().endswith("data: [DONE]")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("poisoned request" in m and "in push" in m for m in lines), lines
    assert not any(r.exc_info for r in caplog.records)
    assert traffic.failures == [] and traffic.ok > 0


CLIENTS = Path(__file__).with_name("stream_clients.py")


def test_health_is_fast_while_32_clients_stream(server):
    """32 streaming clients (another process, as real clients are) keep the engine busy; /health must still
    answer within 0.5 s at the 99th percentile: it reads counters and never waits on the engine."""
    seconds = 6.0
    clients = subprocess.Popen([sys.executable, str(CLIENTS), server.url, "32", str(seconds + 1)],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # all 32 connected and streaming
        latencies, busy = [], 0
        with httpx.Client(timeout=10) as c:
            end = time.time() + seconds
            while time.time() < end:
                t0 = time.perf_counter()
                health = c.get(server.url + "/health").json()
                latencies.append(time.perf_counter() - t0)
                busy += health["active"] > 0
                time.sleep(0.03)
        out, _ = clients.communicate(timeout=60)
    finally:
        if clients.poll() is None:
            clients.kill()
    latencies.sort()
    p99 = latencies[math.ceil(0.99 * len(latencies)) - 1]
    print(f"\n/health under 32 streams: {len(latencies)} probes, p50 {latencies[len(latencies) // 2]:.4f} s, "
          f"p99 {p99:.4f} s, max {latencies[-1]:.4f} s; clients: {out.strip()}")
    assert busy > len(latencies) // 2  # the engine really was busy while we measured
    assert int(out.split()[1]) > 32 * 10  # and the clients really streamed
    assert p99 < 0.5
