"""The OpenAI-compatible server, in-process on 127.0.0.1: the official `openai` client (streaming and not),
exact outputs against `generate`, stop/n/seed, the 4xx error object, the API key, and slots freed when a
client disconnects."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from serve_helpers import LiveServer, one_torch_thread, tiny_checkpoint, wait_until

from gpt2.errors import UserError
from gpt2.inference import generate, pad_right
from gpt2.model import GPT
from gpt2.serve.api import MAX_BODY_BYTES, create_app
from gpt2.serve.engine import Engine
from gpt2.template import format_chat
from gpt2.tokenizer import decode, encode

openai = pytest.importorskip("openai")
single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_ok):
    return GPT.from_pretrained(tiny_checkpoint(tmp_path_factory.mktemp("tiny"))).eval()


@pytest.fixture(scope="module")
def server(model):
    with LiveServer(create_app(Engine(model), model_name="tiny")) as s:
        yield s


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
    (b'{"prompt": "hi", "max_tokens": 0}', "max_tokens"),
    (b'{"prompt": "hi", "max_tokens": 100000000000000000000}', "max_tokens"),  # absurd
    (b'{"prompt": "hi", "temperature": -1}', "temperature"),
    (b'{"prompt": "hi", "top_p": 0}', "top_p"),
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
    body = {"prompt": "hi", "max_tokens": 2, "user": "me", "presence_penalty": 0, "logit_bias": {}}
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


def test_server_survives_disconnects(slow_server):
    r = httpx.post(slow_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_unexpected_error_is_logged_and_a_user_error_keeps_its_message(server, monkeypatch, caplog):
    def broken(text: str) -> list[int]:
        raise UserError("cannot load the GPT-2 tokenizer (offline). Set TIKTOKEN_CACHE_DIR")

    monkeypatch.setattr("gpt2.serve.api.encode", broken)
    with caplog.at_level("ERROR", logger="gpt2.serve"):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=30)
    assert r.status_code == 500
    assert "TIKTOKEN_CACHE_DIR" in r.json()["error"]["message"]
    assert any("/v1/completions failed" in rec.getMessage() and rec.exc_info for rec in caplog.records)


def test_serve_fails_fast_without_a_tokenizer(monkeypatch, tmp_path):
    from gpt2.serve import server as serve_module

    def offline():
        raise UserError("cannot load the GPT-2 tokenizer: set TIKTOKEN_CACHE_DIR")

    monkeypatch.setattr(serve_module, "get_encoding", offline)
    monkeypatch.setattr(serve_module, "load_model", lambda *a: pytest.fail("the model was loaded first"))
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR"):
        serve_module.run(serve_module.ServeConfig(model=str(tmp_path)))
