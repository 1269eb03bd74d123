"""Log-probabilities through the HTTP API, checked against a full forward of the same model: legacy completions
(`logprobs` 0-5, `echo`, `max_tokens: 0`, n > 1, streaming), chat (`logprobs` + `top_logprobs`), stop strings,
the <|endoftext|> a choice ends on, logit_bias and penalties end to end, and lm-evaluation-harness's
`local-completions` request shapes.

Tolerance: the server's numbers come from float32 forwards (cached decoding steps, or one padded full forward
for `echo`) whose summation order differs from the reference's; float32 log-softmax over 50257 entries is
good to ~1e-6, so 1e-4 leaves two orders of margin while any wrong position, token or temperature shifts a
log-prob of a random tiny model by far more (they sit near -log(50257) = -10.8, with spreads of ~1e-2).
"""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from serve_helpers import one_torch_thread, tiny_model, tiny_server

from gpt2.model import GPT
from gpt2.serve.logprobs import token_text
from gpt2.template import format_chat
from gpt2.tokenizer import EOT, decode, encode

TOL = 1e-4
single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

model = pytest.fixture(scope="module", name="model")(tiny_model)
server = pytest.fixture(scope="module", name="server")(tiny_server)


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@torch.no_grad()
def reference(model: GPT, ids: list[int]) -> torch.Tensor:
    """log_softmax of a full forward in float64: row t is the distribution of token t + 1. (T, V)"""
    return model(torch.tensor([ids])).double()[0].log_softmax(-1)


def assert_legacy(model: GPT, prompt: list[int], out: dict, k: int, echo: bool) -> None:
    """`out` (a legacy `logprobs` object) lists `prompt` (if echo) then the generated tokens, each with its
    log-prob under the reference and the reference's top k."""
    generated = [encode_token(t) for t in out["tokens"][len(prompt) if echo else 0:]]
    ids = prompt + generated
    ref = reference(model, ids)
    first = 0 if echo else len(prompt)
    assert [encode_token(t) for t in out["tokens"]] == ids[first:]
    for i, (lp, top) in enumerate(zip(out["token_logprobs"], out["top_logprobs"]), start=first):
        if i == 0:
            assert lp is None and top is None  # echo's first token: nothing predicts it
            continue
        assert lp == pytest.approx(ref[i - 1, ids[i]].item(), abs=TOL)
        values, top_ids = ref[i - 1].topk(k)
        assert len(top) == k
        for t, v in zip(top_ids.tolist(), values.tolist()):
            assert top[token_text(t)] == pytest.approx(v, abs=TOL)


def encode_token(name: str) -> int:
    """A legacy token name back to its id (names are the token's text, or `bytes:\\xNN` for partial UTF-8)."""
    from gpt2.tokenizer import get_encoding

    raw = bytes.fromhex(name[6:].replace("\\x", "")) if name.startswith("bytes:") else name.encode()
    return get_encoding().encode_single_token(raw)


# ------------------------------------------------------------------ legacy completions

@pytest.mark.parametrize("k", [0, 1, 5])
def test_completion_logprobs_equal_a_full_forward(server, model, k):
    prompt = encode("The quick brown fox")
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": k})
    choice = r["choices"][0]
    assert_legacy(model, prompt, choice["logprobs"], k, echo=False)
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    offsets = choice["logprobs"]["text_offset"]
    assert offsets[0] == 0 and all(choice["text"][o:].startswith(t) for o, t in
                                   zip(offsets, choice["logprobs"]["tokens"]))
    # greedy: every chosen token is the reference's argmax
    ids = prompt + [encode_token(t) for t in choice["logprobs"]["tokens"]]
    assert reference(model, ids)[len(prompt) - 1:-1].argmax(-1).tolist() == ids[len(prompt):]


def test_echo_scores_the_prompt_then_the_completion(server, model):
    prompt = encode("Echo this prompt, please.")
    r = post(server, "/v1/completions", {"prompt": decode(prompt), "max_tokens": 3, "temperature": 0,
                                         "logprobs": 2, "echo": True})
    choice = r["choices"][0]
    lps = choice["logprobs"]
    assert choice["text"].startswith(decode(prompt)) and len(lps["tokens"]) == len(prompt) + 3
    assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    assert_legacy(model, prompt, lps, 2, echo=True)
    assert "".join(lps["tokens"]) == choice["text"]
    assert lps["text_offset"][len(prompt)] == len(decode(prompt))  # the completion's offsets follow the echo


def test_max_tokens_zero_with_echo_is_pure_scoring(server, model):
    prompts = [encode("One prompt"), encode("and a second, longer prompt")]
    r = post(server, "/v1/completions", {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r["usage"]["completion_tokens"] == 0
    for prompt, choice in zip(prompts, r["choices"]):
        assert choice["text"] == decode(prompt) and choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["tokens"]) == len(prompt)
        assert_legacy(model, prompt, choice["logprobs"], 1, echo=True)


def test_scoring_may_fill_the_context_window(server, model):
    prompt = (encode("fill the window ") * 64)[: model.config.block_size]
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert_legacy(model, prompt, r["choices"][0]["logprobs"], 0, echo=True)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_sampled_choices_report_raw_log_probs(server, model):
    """n > 1 at temperature 1.5: log-probs are of the raw logits (before temperature), per choice."""
    prompt = encode("Sampling at a high temperature")
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 1.5, "seed": 7,
                                         "n": 3, "logprobs": 1, "echo": True})
    assert len(r["choices"]) == 3
    for choice in r["choices"]:
        assert_legacy(model, prompt, choice["logprobs"], 1, echo=True)


def test_streamed_logprobs_follow_each_chunk(server):
    body = {"prompt": "Streaming with log-probs", "max_tokens": 8, "temperature": 0, "logprobs": 3, "echo": True}
    whole = post(server, "/v1/completions", body)["choices"][0]
    chunks = [c["choices"][0] for c in stream(server, "/v1/completions", body)]
    for c in chunks:  # each chunk's tokens spell its text (no character of this text spans tokens)
        assert "".join(c["logprobs"]["tokens"]) == c["text"]
    merged = {key: [v for c in chunks for v in c["logprobs"][key]] for key in whole["logprobs"]}
    assert merged == whole["logprobs"]
    assert "".join(c["text"] for c in chunks) == whole["text"]


def test_a_stop_string_cuts_the_tokens_with_the_text(server, model):
    """The tokens returned are those whose text starts before the cut: the one the stop string begins inside
    stays (part of its text is returned), the ones after it go."""
    body = {"prompt": encode("A stop string in the middle"), "max_tokens": 8, "temperature": 0, "logprobs": 0,
            "frequency_penalty": 2.0}  # a random tiny model repeats itself; the penalty makes tokens distinct
    full = post(server, "/v1/completions", body)["choices"][0]
    tokens, text = full["logprobs"]["tokens"], full["text"]
    k = next(i for i, t in enumerate(tokens) if i >= 3 and len(t) >= 4 and t.isprintable() and text.count(t[2:]) == 1)
    stop = tokens[k][2:]  # begins inside token k
    cut = post(server, "/v1/completions", {**body, "stop": stop})["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]
    assert cut["logprobs"]["tokens"] == tokens[: k + 1]
    assert cut["logprobs"]["token_logprobs"] == pytest.approx(full["logprobs"]["token_logprobs"][: k + 1], abs=TOL)
    assert cut["logprobs"]["text_offset"] == full["logprobs"]["text_offset"][: k + 1]
    streamed = [c["choices"][0] for c in stream(server, "/v1/completions", {**body, "stop": stop})]
    assert [t for c in streamed for t in c["logprobs"]["tokens"]] == tokens[: k + 1]


def test_the_end_of_text_token_is_listed_last(server, model):
    """A choice the model ends lists <|endoftext|> (no text) with its raw log-prob, so `echo` + `max_tokens: 1`
    always ends with one generated entry. logit_bias forces the end here; the log-prob is still unbiased."""
    prompt = encode("The end")
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1,
                                         "echo": True, "logit_bias": {str(EOT): 100}})
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == "The end"
    lps = choice["logprobs"]
    assert lps["tokens"][-1] == "<|endoftext|>" and len(lps["tokens"]) == len(prompt) + 1
    ref = reference(model, prompt + [EOT])
    assert lps["token_logprobs"][-1] == pytest.approx(ref[-2, EOT].item(), abs=TOL) and ref[-2, EOT] < -5


# ------------------------------------------------------------------ chat

def test_chat_logprobs_and_streaming(server, model):
    messages = [{"role": "user", "content": "Say something."}]
    body = {"messages": messages, "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 4}
    choice = post(server, "/v1/chat/completions", body)["choices"][0]
    content = choice["logprobs"]["content"]
    prompt = encode(format_chat(messages))
    ids = prompt + [encode_token(e["token"]) for e in content]
    ref = reference(model, ids)
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for i, e in enumerate(content, start=len(prompt)):
        assert e["logprob"] == pytest.approx(ref[i - 1, ids[i]].item(), abs=TOL)
        assert bytes(e["bytes"]).decode() == e["token"]
        values, top_ids = ref[i - 1].topk(4)
        assert [encode_token(t["token"]) for t in e["top_logprobs"]] == top_ids.tolist()
        assert [t["logprob"] for t in e["top_logprobs"]] == pytest.approx(values.tolist(), abs=TOL)
    chunks = [c["choices"][0] for c in stream(server, "/v1/chat/completions", body)]
    assert chunks[0]["logprobs"] is None  # the role chunk
    assert [e for c in chunks[1:] for e in c["logprobs"]["content"]] == content
    without = post(server, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})
    assert without["choices"][0]["logprobs"] is None


# ------------------------------------------------------------------ logit_bias and penalties, end to end

def penalised_greedy(model: GPT, prompt: list[int], steps: int, presence: float, frequency: float,
                     bias: dict[int, float]) -> list[int]:
    """OpenAI's definition, from full forwards: logit - count*frequency - (count > 0)*presence + bias."""
    ids = list(prompt)
    for _ in range(steps):
        logits = reference(model, ids)[-1].clone()  # log-softmax shifts all logits alike: same argmax
        counts = torch.bincount(torch.tensor(ids[len(prompt):], dtype=torch.long), minlength=logits.numel())
        logits -= counts * frequency + (counts > 0).double() * presence
        for t, b in bias.items():
            logits[t] += b
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("extra", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                   {"presence_penalty": 1.0, "frequency_penalty": 0.5, "logit_bias": {"11": 5.0}},
                                   {"logit_bias": {"262": 100}}, {"frequency_penalty": -2.0}])
def test_penalties_and_logit_bias_change_the_choice_as_defined(server, model, extra):
    prompt = encode("Repeat repeat repeat")
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0,
                                         **extra})
    got = [encode_token(t) for t in r["choices"][0]["logprobs"]["tokens"]]
    bias = {int(k): v for k, v in extra.get("logit_bias", {}).items()}
    want = penalised_greedy(model, prompt, 8, extra.get("presence_penalty", 0.0),
                            extra.get("frequency_penalty", 0.0), bias)
    assert got == want
    plain = penalised_greedy(model, prompt, 8, 0.0, 0.0, {})
    assert got != plain  # the knob did something (each case is chosen so that it must)


# ------------------------------------------------------------------ lm-evaluation-harness's request shapes

def lm_eval_loglikelihood(server, prompt) -> list[tuple[float, bool]]:
    """What lm_eval 0.4's `local-completions` sends for loglikelihood requests (`_create_payload` with
    generate=False) and how it reads the answer (`parse_logprobs`): per choice, by `index`, the sum of
    `token_logprobs[ctxlen:-1]` (the last entry is the one generated token) and whether each of those equals the
    max of its `top_logprobs`. Returns (logprobs, top-1 values) per choice for the caller to slice."""
    payload = {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    out = post(server, "/v1/completions", payload)
    return [(c["logprobs"]["token_logprobs"], c["logprobs"]["top_logprobs"])
            for c in sorted(out["choices"], key=lambda c: c["index"])]


def lm_eval_parse(token_logprobs: list, top_logprobs: list, ctxlen: int) -> tuple[float, bool]:
    tokens, tops = token_logprobs[ctxlen:-1], top_logprobs[ctxlen:-1]
    return sum(tokens), all(t == max(top.values()) for t, top in zip(tokens, tops))


def direct(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = context + continuation
    ref = reference(model, ids)[len(context) - 1:-1]
    target = torch.tensor(continuation)
    return ref.gather(1, target[:, None]).sum().item(), bool((ref.argmax(-1) == target).all())


@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_loglikelihood_requests(server, model, tokenized):
    """A batch of (context, continuation) pairs as lm-eval sends them: token lists (tokenized_requests=True,
    any batch size) or one decoded string per request (tokenized_requests=False)."""
    pairs = [("Question: what colour is the sky?\nAnswer:", " blue"),
             ("Question: what colour is the sky?\nAnswer:", " green and brown"),
             ("The", " end"),
             ("A", "!")]
    # the greedy token after "The" is a continuation too, so is_greedy is True at least once
    the = encode("The")
    pairs.append(("The", decode([int(reference(model, the)[-1].argmax())])))
    encoded = [(encode(c), encode(x)) for c, x in pairs]
    if tokenized:
        answers = lm_eval_loglikelihood(server, [c + x for c, x in encoded])
    else:
        answers = [lm_eval_loglikelihood(server, decode(c + x))[0] for c, x in encoded]
    greedy = []
    for (c, x), (lps, tops) in zip(encoded, answers):
        got, got_greedy = lm_eval_parse(lps, tops, len(c))
        want, want_greedy = direct(model, c, x)
        assert got == pytest.approx(want, abs=TOL * len(x)) and got_greedy == want_greedy
        greedy.append(got_greedy)
    assert greedy[-1] and not all(greedy)


def test_lm_eval_generate_until_request(server, model):
    """lm-eval's generate payload (`_create_payload` with generate=True): stop = the task's `until` plus the
    end-of-text string; `parse_generations` reads `choices[i].text` by index."""
    prompt = "Question: name a fruit.\nAnswer:"
    payload = {"prompt": prompt, "model": "tiny", "max_tokens": 12, "temperature": 0,
               "stop": ["\n\n", "Question:", "<|endoftext|>"], "seed": 1234}
    out = post(server, "/v1/completions", payload)
    text = out["choices"][0]["text"]
    ids = encode(prompt)
    for _ in range(12):
        ids.append(int(reference(model, ids)[-1].argmax()))
        if ids[-1] == EOT:
            ids.pop()
            break
    want = decode(ids[len(encode(prompt)):])
    for s in payload["stop"]:
        want = want.split(s)[0]
    assert text == want
