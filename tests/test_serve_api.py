"""The OpenAI-compatible server, in-process on 127.0.0.1: the official `openai` client (streaming and not),
exact outputs against `generate`, stop/n/seed, the 4xx error object, the API key, and slots freed when a
client disconnects."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from serve_helpers import LiveServer, one_torch_thread, tiny_model, tiny_server, wait_until

from gpt2.decode.engine import Engine
from gpt2.errors import UserError
from gpt2.inference import generate, pad_right
from gpt2.serve.api import MAX_BODY_BYTES, create_app
from gpt2.template import format_chat
from gpt2.tokenizer import decode, encode

openai = pytest.importorskip("openai")
single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

model = pytest.fixture(scope="module", name="model")(tiny_model)
server = pytest.fixture(scope="module", name="server")(tiny_server)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def greedy_text(model, prompt: str, n: int) -> str:
    return decode(generate(model, *pad_right([encode(prompt)]), 0.0, n)[0])


# ------------------------------------------------------------------ the schemas, through the official client

def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["active"] == 0


def test_completion_matches_generate(client, model):
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == "tiny"
    assert r.choices[0].text == greedy_text(model, "The capital of France is", 12)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(encode("The capital of France is"))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_uses_the_template(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy_text(model, format_chat(messages), 10)
    assert r.usage.prompt_tokens == len(encode(format_chat(messages)))


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", max_tokens=15, temperature=0)
    full = client.chat.completions.create(messages=[{"role": "user", "content": "Tell me a story"}], **kw)
    chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "Tell me a story"}],
                                                 stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 15 and not chunks[-1].choices
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed

    plain = client.completions.create(prompt="Once upon a time", **kw)
    streamed = list(client.completions.create(prompt="Once upon a time", stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_stop_n_and_seed(client, model):
    full = greedy_text(model, "Hello", 20)
    stop = full[5:8]
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    s = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0, stop=stop,
                                       stream=True))
    assert "".join(c.choices[0].text for c in s) == full[: full.index(stop)]

    kw = dict(model="tiny", prompt="Roses are", max_tokens=8, temperature=1.0, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert len({c.text for c in a.choices}) > 1  # but each choice samples on its own
    assert a.usage.completion_tokens == 24


def test_batch_of_prompts_and_token_prompts(client, model):
    r = client.completions.create(model="tiny", prompt=["One", "Two three"], max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [greedy_text(model, p, 5) for p in ["One", "Two three"]]
    r = client.completions.create(model="tiny", prompt=encode("One"), max_tokens=5, temperature=0)
    assert r.choices[0].text == greedy_text(model, "One", 5)


def test_concurrent_requests_are_batched_and_exact(server, model):
    import concurrent.futures as cf

    prompts = [f"Request number {i} says" + " hi" * i for i in range(6)]

    def ask(p):
        body = {"prompt": p, "max_tokens": 16, "temperature": 0}
        return httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]

    with cf.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(ask, prompts))
    assert texts == [greedy_text(model, p, 16) for p in prompts]


# ------------------------------------------------------------------ bad requests: 4xx with the error object

def post(server, path, content, headers=None):
    h = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=content, headers=h, timeout=30)


def assert_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize("body,param", [
    (b'{"prompt": "hi", "max_tokens": ', None),  # malformed JSON
    (b'\xff\xfe not json', None),
    (b'[1, 2, 3]', None),  # JSON, but not an object
    (b'{"max_tokens": 5}', "prompt"),  # missing field
    (b'{"prompt": "hi", "temperature": "hot"}', "temperature"),  # wrong types
    (b'{"prompt": "hi", "max_tokens": "5"}', "max_tokens"),
    (b'{"prompt": "hi", "stream": "yes"}', "stream"),
    (b'{"prompt": 42}', "prompt"),
    (b'{"prompt": "hi", "max_tokens": -1}', "max_tokens"),  # out of range
    (b'{"prompt": "hi", "max_tokens": 100000000000000000000}', "max_tokens"),  # absurd
    (b'{"prompt": "hi", "temperature": -1}', "temperature"),
    (b'{"prompt": "hi", "top_p": -0.1}', "top_p"),
    (b'{"prompt": "hi", "n": 1000}', "n"),
    (b'{"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
    (b'{"prompt": [99999999]}', "prompt"),
])
def test_bad_completion_requests_get_400(server, body, param):
    assert_error(post(server, "/v1/completions", body), 400, param)


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),  # must end with the user
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
])
def test_bad_chat_requests_get_400(server, body, param):
    assert_error(post(server, "/v1/chat/completions", json.dumps(body)), 400, param)


def test_prompt_longer_than_context_window(server):
    err = assert_error(post(server, "/v1/completions", json.dumps({"prompt": "word " * 200})), 400, "prompt")
    assert err["code"] == "context_length_exceeded"
    body = {"messages": [{"role": "user", "content": "word " * 200}]}
    assert_error(post(server, "/v1/chat/completions", json.dumps(body)), 400, "messages")


def test_oversized_body_gets_413(server):
    big = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10)})
    assert_error(post(server, "/v1/completions", big), 413)

    def chunks():  # no Content-Length: the limit must hold while reading
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'
    assert_error(post(server, "/v1/completions", chunks()), 413)


def test_unknown_route_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/completions"), 405)


def test_unknown_fields_are_ignored(server):
    body = {"prompt": "hi", "max_tokens": 2, "user": "me", "presence_penalty": 0, "logit_bias": {}, "x-mine": 1}
    assert post(server, "/v1/completions", json.dumps(body)).status_code == 200


# ------------------------------------------------------------------ API key

def test_api_key_required(model):
    with LiveServer(create_app(Engine(model), model_name="tiny", api_key="s3cret")) as s:
        body = json.dumps({"prompt": "hi", "max_tokens": 2})
        assert_error(post(s, "/v1/completions", body), 401)
        assert_error(post(s, "/v1/completions", body, {"Authorization": "Bearer wrong"}), 401)
        assert_error(httpx.get(s.url + "/v1/models"), 401)
        assert httpx.get(s.url + "/health").status_code == 200  # liveness probes need no key
        assert httpx.get(s.url + "/").status_code == 200  # the page asks for the key itself
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text is not None


# ------------------------------------------------------------------ disconnects free their slots

class SlowEngine(Engine):
    """Steps slowly, so a client can leave while its request is still running."""

    def step(self):
        time.sleep(0.05)  # a 120-token answer takes 6 s: a slot freed within 2 s was freed by the disconnect
        super().step()


@pytest.fixture(scope="module")
def slow_server(model):
    engine = SlowEngine(model, eos_id=None)
    with LiveServer(create_app(engine, model_name="tiny")) as s:
        s.engine = engine
        yield s


def test_stream_disconnect_frees_slot(slow_server):
    engine = slow_server.engine
    body = {"prompt": "hi", "max_tokens": 120, "temperature": 0, "stream": True}
    with httpx.stream("POST", slow_server.url + "/v1/completions", json=body, timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data:")
            if seen == 3:
                break
        assert engine.num_active == 1
    # leaving the block closed the connection mid-stream
    assert wait_until(lambda: engine.num_active == 0 and not engine.has_work(), timeout=2)


def test_non_stream_disconnect_frees_slot(slow_server):
    engine = slow_server.engine
    body = json.dumps({"prompt": "hi", "max_tokens": 120, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", slow_server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert wait_until(lambda: engine.num_active == 1, timeout=5)
    sock.close()
    assert wait_until(lambda: not engine.has_work(), timeout=2)
    started = engine.steps
    time.sleep(0.2)
    assert engine.steps == started  # nothing left running


def test_a_stream_that_fails_before_its_first_token_gets_a_status_not_a_stream(model, monkeypatch):
    """A stream's headers wait for the engine's first event, so a failed prefill is a 500 with OpenAI's error
    object, as for a plain request, rather than a 200 stream holding only an error."""
    engine = Engine(model)

    def failing_prefill(*args, **kwargs):
        raise MemoryError("no room for the prompt")

    monkeypatch.setattr(engine.decoder, "prefill", failing_prefill)
    with LiveServer(create_app(engine, model_name="tiny")) as s:
        for stream in (False, True):
            r = post(s, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, "stream": stream}))
            assert "MemoryError" in assert_error(r, 500)["message"]


def test_a_draining_server_answers_503(model):
    """Once a shutdown began (`Engine.drain`), a new request gets a 503 with OpenAI's error object."""
    engine = Engine(model)
    with LiveServer(create_app(engine, model_name="tiny")) as s:
        engine.drain(grace=0)
        for stream in (False, True):
            r = post(s, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, "stream": stream}))
            assert assert_error(r, 503)["code"] == "server_shutting_down"


def test_a_queued_stream_whose_client_leaves_is_cancelled(model):
    """A stream waits for its first event before sending headers; a client that leaves meanwhile (still queued:
    this engine never steps) cancels its request, so the engine never starts it."""
    engine = Engine(model)
    with LiveServer(create_app(engine, model_name="tiny", start_engine=False)) as s:
        body = json.dumps({"prompt": "hi", "max_tokens": 120, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert wait_until(lambda: engine.num_waiting == 1, timeout=5)
        sock.close()
        assert wait_until(lambda: engine.waiting[0].cancelled, timeout=5)
        engine.step()  # drops it without running it
        assert not engine.has_work() and engine.steps == 0


def test_server_survives_disconnects(slow_server):
    r = httpx.post(slow_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_unexpected_error_is_logged_and_a_user_error_keeps_its_message(server, monkeypatch, caplog):
    def broken(text: str) -> list[int]:
        raise UserError("cannot load the GPT-2 tokenizer (offline). Set TIKTOKEN_CACHE_DIR")

    monkeypatch.setattr("gpt2.serve.schema.encode", broken)
    with caplog.at_level("ERROR", logger="gpt2.serve"):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert r.status_code == 500
    assert "TIKTOKEN_CACHE_DIR" in r.json()["error"]["message"]
    lines = [rec.getMessage() for rec in caplog.records if "/v1/completions failed" in rec.getMessage()]
    assert len(lines) == 1 and "UserError" in lines[0] and "in broken" in lines[0]  # the cause, on one line
    assert "\n" not in lines[0] and not any(rec.exc_info for rec in caplog.records)


def test_serve_fails_fast_without_a_tokenizer(monkeypatch, tmp_path):
    from gpt2.commands import serve as serve_module

    def offline():
        raise UserError("cannot load the GPT-2 tokenizer: set TIKTOKEN_CACHE_DIR")

    monkeypatch.setattr(serve_module, "get_encoding", offline)
    monkeypatch.setattr(serve_module, "load_model", lambda *a: pytest.fail("the model was loaded first"))
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR"):
        serve_module.run(serve_module.ServeConfig(model=str(tmp_path)))


# ------------------------------------------------------------------ OpenAI's whole request schema

@pytest.mark.parametrize("path,extra,param", [
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),  # best_of > n: no server-side ranking
    ("/v1/completions", {"best_of": 1, "n": 2}, "best_of"),  # best_of < n
    ("/v1/completions", {"store": True}, "store"),
    ("/v1/completions", {"logit_bias": {"50257": 1}}, "logit_bias"),  # out of the vocabulary
    ("/v1/completions", {"logit_bias": {"hello": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"seed": 2**64}, "seed"),  # beyond int64
    ("/v1/completions", {"seed": -(2**63) - 1}, "seed"),
    ("/v1/completions", {"stop": "x" * 1001}, "stop"),
    ("/v1/completions", {"service_tier": "platinum"}, "service_tier"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),  # needs logprobs: true
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"temperature": 1e400}, "temperature"),  # JSON's overflow is inf: not finite
])
def test_unsupported_or_invalid_openai_fields_get_400_naming_them(server, path, extra, param):
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(server, path, json.dumps({**base, "max_tokens": 2, **extra})), 400, param)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_get_400(server, literal):
    assert_error(post(server, "/v1/completions", b'{"prompt": "hi", "temperature": ' + literal + b"}"), 400,
                 "temperature")


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"best_of": 2, "n": 2, "user": "u", "seed": 2**63 - 1, "echo": False, "suffix": ""}),
    ("/v1/completions", {"stream_options": {"include_usage": True}, "service_tier": "auto", "metadata": {"a": "b"},
                         "store": False, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
                         "safety_identifier": "s", "prompt_cache_key": "k", "seed": -(2**63)}),
    ("/v1/chat/completions", {"tool_choice": "none", "tools": [], "functions": [], "function_call": "none",
                              "parallel_tool_calls": False, "response_format": {"type": "text"},
                              "modalities": ["text"], "prediction": {"type": "content", "content": "x"},
                              "logprobs": False, "max_completion_tokens": 2, "n": 2}),
    ("/v1/chat/completions", {"temperature": None, "top_p": None, "n": None, "stop": None, "seed": None,
                              "max_tokens": None, "audio": None, "reasoning_effort": None}),  # null = default
])
def test_supported_openai_fields_are_accepted(server, path, extra):
    base = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi",
                                                                              "name": "me"}]}
    r = post(server, path, json.dumps({**base, "max_tokens": 2, **extra}))
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == (extra.get("n") or 1)


@pytest.mark.parametrize("extra", [{"logprobs": 1}, {"logit_bias": {"50256": -100}}, {"presence_penalty": 1.0},
                                   {"frequency_penalty": -0.5}])
def test_engine_controls_are_accepted(server, extra):
    """The decoding core has these knobs (their effects: test_serve_logprobs_api.py)."""
    r = post(server, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2, **extra}))
    assert r.status_code == 200, r.text


def test_echo_and_max_tokens_zero(client, model):
    r = client.completions.create(model="tiny", prompt="Echo me", max_tokens=0, echo=True)
    assert r.choices[0].text == "Echo me" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(encode("Echo me"))
    r = client.completions.create(model="tiny", prompt=encode("Echo me"), max_tokens=4, echo=True, temperature=0)
    assert r.choices[0].text == "Echo me" + greedy_text(model, "Echo me", 4)
    streamed = list(client.completions.create(model="tiny", prompt="Echo me", max_tokens=4, echo=True,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert client.completions.create(model="tiny", prompt="x", max_tokens=0).choices[0].text == ""


@pytest.mark.parametrize("extra", [{"temperature": 1e-300}, {"temperature": 5e-324}, {"temperature": 1e-40},
                                   {"top_p": 1e-300}, {"top_p": 0}, {"top_p": 1e-100, "temperature": 1e-45}])
def test_extreme_sampling_values_behave_as_greedy(server, model, extra):
    """A temperature or top_p that underflows float32 means greedy / the top token, never a 500."""
    body = {"prompt": "The sea", "max_tokens": 6, "seed": 3, **extra}
    r = post(server, "/v1/completions", json.dumps(body))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy_text(model, "The sea", 6)


def test_seed_at_the_int64_edges_is_deterministic(client):
    for seed in (2**63 - 1, -(2**63)):
        a, b = [client.completions.create(model="tiny", prompt="A", max_tokens=5, seed=seed, n=2) for _ in range(2)]
        assert [c.text for c in a.choices] == [c.text for c in b.choices]


# ------------------------------------------------------------------ operability

def test_openapi_and_docs(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(doc["paths"])
    body = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    props = doc["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"messages", "logit_bias", "tools", "response_format", "top_logprobs", "seed"} <= set(props)
    assert "ChatMessage" in doc["components"]["schemas"]  # nested models resolve inside the document
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text


def test_model_by_id(client, server):
    assert client.models.retrieve("tiny").id == "tiny"
    err = assert_error(httpx.get(server.url + "/v1/models/gpt-4"), 404, "model")
    assert err["code"] == "model_not_found"


def test_a_model_this_server_does_not_serve_is_404(model):
    """As OpenAI and vLLM answer: the served name and its aliases are accepted (and listed), others are 404
    model_not_found naming them; a request without `model` gets the served one."""
    with LiveServer(create_app(Engine(model), model_name="tiny", aliases=("runs/tiny/model", "model"))) as s:
        listed = httpx.get(s.url + "/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["tiny", "runs/tiny/model", "model"]
        assert "parent" not in listed[0] and {m["parent"] for m in listed[1:]} == {"tiny"}
        assert httpx.get(s.url + "/v1/models/runs/tiny/model").json()["id"] == "runs/tiny/model"
        prompt = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
        for route, body in (("/v1/completions", prompt), ("/v1/chat/completions", chat)):
            err = assert_error(httpx.post(s.url + route, json={**body, "model": "gpt-4"}, timeout=30), 404, "model")
            assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
            assert err["message"] == ("the model 'gpt-4' does not exist; this server serves 'tiny', "
                                      "'runs/tiny/model', 'model'")
            for name in ("tiny", "model", None):  # an alias answers as the served name
                r = httpx.post(s.url + route, json={**body, **({"model": name} if name else {})}, timeout=30)
                assert r.status_code == 200 and r.json()["model"] == "tiny", r.text


def test_serve_aliases_are_the_model_as_given_and_its_folder():
    from gpt2.commands.serve import ServeConfig, model_aliases

    assert model_aliases(ServeConfig(model="runs/sft/")) == ("runs/sft", "sft")
    assert model_aliases(ServeConfig(model="gpt2")) == ("gpt2", "gpt2")  # create_app drops repeats


def test_405_names_the_allowed_methods(server):
    r = httpx.get(server.url + "/v1/chat/completions")
    assert_error(r, 405)
    assert r.headers["allow"] == "POST"


def test_queue_full_gets_429_with_retry_after(model):
    engine = Engine(model)
    app = create_app(engine, model_name="tiny", max_waiting=1, start_engine=False)
    with LiveServer(app) as s:
        engine.submit([1, 2], engine_params(), lambda *a: None)  # never stepped: stays queued
        r = post(s, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}))
        assert_error(r, 429)
        assert r.headers["retry-after"] == "1"


def engine_params():
    from gpt2.decode.engine import SamplingParams

    return SamplingParams(max_tokens=2)


def test_disconnect_mid_body_is_one_log_line(server, caplog):
    with caplog.at_level("INFO", logger="gpt2.serve"):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": \"hi")
        time.sleep(0.1)
        sock.close()
        assert wait_until(lambda: any("disconnected" in r.getMessage() for r in caplog.records), timeout=5)
    records = [r for r in caplog.records if r.name.startswith("gpt2.serve")]
    assert len(records) == 1 and records[0].exc_info is None and "\n" not in records[0].getMessage()
