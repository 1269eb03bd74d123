"""The decoding engine: continuous batching gives the same tokens as one-at-a-time generation, whatever the
arrivals; per-request seeds; cancellation frees slots; the cache stays bounded; a drain (shutdown) ends every
request; a stop string ends its request; `run_batch` raises a row's error. Also TextStream (UTF-8, stop strings)."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from serve_helpers import one_torch_thread

from gpt2.decode import KVCache, score_tokens
from gpt2.decode.engine import SHUTDOWN, Engine, SamplingParams
from gpt2.decode.text import TextStream
from gpt2.inference import generate, pad_right
from gpt2.model import GPT, GPTConfig

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=48)).eval()


class Collector:
    """Sinks that record each request's tokens and finish reason."""

    def __init__(self):
        self.tokens: dict[int, list[int]] = {}
        self.reason: dict[int, str] = {}

    def sink(self, i: int):
        self.tokens[i] = []

        def f(event):
            if event.token is not None:
                assert i not in self.reason, "token after finish"
                self.tokens[i].append(event.token)
            else:
                self.reason[i] = event.finish_reason
        return f


def run_schedule(engine: Engine, arrivals: dict[int, list[tuple[int, list[int], SamplingParams]]],
                 max_steps: int = 500) -> Collector:
    """Submit requests at the given steps, step until all are done; check the cache never outgrows its bound."""
    col = Collector()
    last_arrival = max(arrivals)
    for step in range(max_steps):
        for i, prompt, params in arrivals.get(step, []):
            engine.submit(prompt, params, col.sink(i))
        engine.step()
        assert engine.num_active <= engine.max_batch_size
        if engine.cache is not None:
            assert engine.cache.capacity <= engine.block_size + engine.headroom
        if step >= last_arrival and not engine.has_work():
            return col
    raise AssertionError("engine did not finish")


def random_requests(n: int, seed: int, block: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(50257) for _ in range(rng.randint(1, 20))] for _ in range(n)]
    # some budgets run past the context window (block 48): those rows must stop at its end
    max_tokens = [rng.randint(1, block) for _ in range(n)]
    steps = sorted(rng.randint(0, 30) for _ in range(n))
    return prompts, max_tokens, steps


class PoisonedCache(KVCache):
    """Fill new caches with NaN to prove that decoding never reads a slot before it was written (a NaN
    value survives even a zero attention weight)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for t in self.k + self.v:
            t.fill_(float("nan"))


@pytest.mark.parametrize("seed,max_batch", [(0, 3), (1, 8)])
def test_batched_greedy_equals_one_at_a_time(model, seed, max_batch, monkeypatch):
    monkeypatch.setattr("gpt2.decode.decoder.KVCache", PoisonedCache)
    prompts, max_tokens, steps = random_requests(10, seed, model.config.block_size)
    arrivals: dict = {}
    for i, (p, m, s) in enumerate(zip(prompts, max_tokens, steps)):
        arrivals.setdefault(s, []).append((i, p, SamplingParams(max_tokens=m, temperature=0.0)))
    # a small headroom forces re-packing (cache growth and compaction) while rows run
    engine = Engine(model, max_batch_size=max_batch, eos_id=None, headroom=3)
    col = run_schedule(engine, arrivals)
    for i, p in enumerate(prompts):
        ref = generate(model, *pad_right([p]), 0.0, max_tokens[i], eos_id=None)[0]
        assert col.tokens[i] == ref, f"request {i} (prompt {len(p)} tokens, arrived at step {steps[i]})"
        assert col.reason[i] == "length"
    assert engine.num_active == 0 and engine.cache is None


def test_end_of_text_finishes_with_stop(model):
    prompts, _, steps = random_requests(6, 2, model.config.block_size)
    free = [generate(model, *pad_right([p]), 0.0, 20, eos_id=None)[0] for p in prompts]
    # declare a token that request 0 produces after a few others "end of text": it stops there (others may too)
    cut = next(i for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i])
    eos = free[0][cut]
    arrivals: dict = {}
    for i, (p, s) in enumerate(zip(prompts, steps)):
        arrivals.setdefault(s, []).append((i, p, SamplingParams(max_tokens=20, temperature=0.0)))
    col = run_schedule(Engine(model, max_batch_size=4, eos_id=eos), arrivals)
    for i, f in enumerate(free):
        expected = f[: f.index(eos)] if eos in f else f
        assert col.tokens[i] == expected
        assert col.reason[i] == ("stop" if eos in f else "length")
    assert col.tokens[0] == free[0][:cut] and col.reason[0] == "stop"


def test_the_end_of_text_token_gets_its_logprob(model):
    """A request asking for log-probs gets one for the <|endoftext|> it stopped on too (clients list that token
    last; lm-eval drops it), equal to a full forward's (float32 sums in another order: 1e-4)."""
    eos = 7
    got: list = []
    engine = Engine(model, eos_id=eos)
    params = SamplingParams(max_tokens=4, temperature=0.0, logit_bias={eos: 100.0}, logprobs=1)
    engine.submit([1, 2, 3], params, got.append)
    while engine.has_work():
        engine.step()
    assert [(e.token, e.finish_reason) for e in got] == [(None, "stop")]
    entry = got[0].logprob
    expected = score_tokens(model, [[1, 2, 3, eos]], 1)[0][-1]
    assert entry.token == eos and entry.logprob == pytest.approx(expected.logprob, abs=1e-4)


def test_seeded_sampling_is_independent_of_batch_mates(model):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=123)
    alone = run_schedule(Engine(model), {0: [(0, [1, 2, 3], params)]})
    others = [(i, [7] * i, SamplingParams(max_tokens=15, temperature=0.8, seed=i)) for i in range(1, 5)]
    crowd = run_schedule(Engine(model), {0: others[:2], 2: [(0, [1, 2, 3], params)] + others[2:]})
    assert alone.tokens[0] == crowd.tokens[0]
    other_seed = run_schedule(Engine(model), {0: [(0, [1, 2, 3], SamplingParams(12, 1.0, 0.9, seed=124))]})
    assert other_seed.tokens[0] != alone.tokens[0]


def test_cancel_frees_the_slot_and_keeps_others_exact(model):
    engine = Engine(model, eos_id=None)
    col = Collector()
    a = engine.submit([5, 6, 7], SamplingParams(max_tokens=40, temperature=0.0), col.sink(0))
    engine.submit([9, 10], SamplingParams(max_tokens=10, temperature=0.0), col.sink(1))
    engine.step()
    engine.step()
    assert engine.num_active == 2
    a.cancel()
    engine.step()
    assert engine.num_active == 1
    while engine.has_work():
        engine.step()
    assert 0 not in col.reason  # a cancelled request gets no more events
    assert col.tokens[1] == generate(model, *pad_right([[9, 10]]), 0.0, 10, eos_id=None)[0]
    # a request cancelled while still waiting never runs
    b = engine.submit([1], SamplingParams(max_tokens=5), col.sink(2))
    b.cancel()
    engine.step()
    assert not engine.has_work() and col.tokens[2] == []


def test_failing_sink_cancels_its_request(model):
    engine = Engine(model, eos_id=None)

    def broken(event):
        raise RuntimeError("event loop closed")

    engine.submit([1, 2], SamplingParams(max_tokens=30, temperature=0.0), broken)
    engine.step()
    engine.step()
    assert not engine.has_work()


def test_background_thread_serves_requests(model):
    engine = Engine(model, eos_id=None)
    engine.start()
    try:
        done = [threading.Event() for _ in range(3)]
        col = Collector()
        for i in range(3):
            sink = col.sink(i)

            def f(event, sink=sink, i=i):
                sink(event)
                if event.token is None:
                    done[i].set()
            engine.submit([i + 1] * (i + 2), SamplingParams(max_tokens=8, temperature=0.0), f)
        assert all(d.wait(20) for d in done)
        for i in range(3):
            assert col.tokens[i] == generate(model, *pad_right([[i + 1] * (i + 2)]), 0.0, 8, eos_id=None)[0]
    finally:
        engine.stop()


def test_call_runs_in_the_engine_thread_between_steps(model):
    """Tensor work besides decoding (echo's scoring) runs in the engine's thread: its result or its exception
    comes back through the future, and requests go on being served."""
    engine = Engine(model, eos_id=None)
    engine.start()
    try:
        assert engine.call(threading.get_ident).result(20) == engine._thread.ident
        with pytest.raises(ZeroDivisionError):
            engine.call(lambda: 1 / 0).result(20)
        done = threading.Event()
        engine.submit([1, 2], SamplingParams(max_tokens=3, temperature=0.0), lambda e: e.finish_reason and done.set())
        assert done.wait(20)
    finally:
        engine.stop()


def test_stop_cancels_calls_not_yet_run(model):
    """A caller waiting on a job the engine will never run gets CancelledError, not a hang."""
    from concurrent.futures import CancelledError

    engine = Engine(model)  # not running: the job waits for a step
    future = engine.call(lambda: 1)
    engine.stop()
    with pytest.raises(CancelledError):
        future.result(0)


def test_run_serves_in_the_calling_thread_until_stopped(model):
    """`run()` (what `gpt2 serve` does in its main thread) serves requests there and returns on `stop()`."""
    engine = Engine(model, eos_id=None)
    col = Collector()
    sink = col.sink(0)
    engine.submit([3, 4], SamplingParams(max_tokens=4, temperature=0.0),
                  lambda e: (sink(e), e.finish_reason and threading.Thread(target=engine.stop).start()))
    served_in = engine.call(threading.get_ident)
    engine.run()  # returns once the request's end has stopped it
    assert served_in.result(0) == threading.get_ident()
    assert col.tokens[0] == generate(model, *pad_right([[3, 4]]), 0.0, 4, eos_id=None)[0]


def test_a_stop_before_run_ends_run_at_once(model):
    """`gpt2 serve`'s HTTP thread stops the engine when uvicorn cannot bind, which can happen before the main
    thread reaches `run()`: that stop must hold, or the process never exits."""
    engine = Engine(model)
    engine.stop()
    done = threading.Event()
    threading.Thread(target=lambda: (engine.run(), done.set()), daemon=True).start()
    assert done.wait(10)


def test_a_drain_refuses_the_queue_and_lets_running_requests_finish_within_the_grace(model):
    engine, col = Engine(model, max_batch_size=1, eos_id=None), Collector()
    engine.submit([1, 2], SamplingParams(max_tokens=5), col.sink(0))
    engine.step()
    engine.submit([3], SamplingParams(max_tokens=5), col.sink(1))  # queued: the batch is full
    engine.drain(grace=3600)
    assert engine.draining
    engine.submit([4], SamplingParams(max_tokens=5), col.sink(2))  # after the drain began
    for _ in range(10):
        engine.step()
    assert col.reason == {0: "length", 1: SHUTDOWN, 2: SHUTDOWN}
    assert len(col.tokens[0]) == 5 and col.tokens[1] == col.tokens[2] == []
    assert not engine.has_work()


def test_a_drain_ends_running_requests_once_its_grace_has_passed(model):
    engine, col = Engine(model, eos_id=None), Collector()
    engine.submit([1, 2], SamplingParams(max_tokens=40), col.sink(0))
    engine.step()
    engine.drain(grace=3600)
    engine.step()
    assert engine.num_active == 1 and col.reason == {}  # within the grace: still decoding
    engine.drain(grace=0)  # a second Ctrl+C: now
    engine.drain(grace=3600)  # a later drain never lengthens the grace
    tokens, steps = len(col.tokens[0]), engine.steps
    engine.step()
    assert col.reason == {0: SHUTDOWN} and len(col.tokens[0]) == tokens and engine.steps == steps  # no more work
    assert engine.num_active == 0 and not engine.has_work()


def test_submit_rejects_impossible_prompts(model):
    engine = Engine(model)
    with pytest.raises(ValueError):
        engine.submit([], SamplingParams(), lambda e: None)
    with pytest.raises(ValueError):
        engine.submit([1] * model.config.block_size, SamplingParams(), lambda e: None)


def test_a_stop_string_ends_its_request_after_the_token_that_completes_it(model, tokenizer_ok):
    from gpt2.tokenizer import decode

    prompt = [5, 6, 7]
    plain = run_schedule(Engine(model), {0: [(0, prompt, SamplingParams(max_tokens=12, temperature=0))]})
    tokens = plain.tokens[0]
    stop = decode([tokens[2]]).strip() or decode([tokens[2]])
    end = next(k for k in range(len(tokens)) if stop in decode(tokens[: k + 1]))
    params = SamplingParams(max_tokens=12, temperature=0, stop=[stop])
    got = run_schedule(Engine(model), {0: [(0, prompt, params)]})
    assert got.tokens[0] == tokens[: end + 1] and got.reason[0] == "stop"


def test_run_batch_raises_the_error_of_a_failing_row(model):
    params = SamplingParams(max_tokens=4, temperature=0, logit_bias={10**9: 1.0})  # outside the vocabulary
    with pytest.raises(ValueError, match="logit_bias"):
        list(Engine(model).run_batch([[1, 2, 3]], params))


# ------------------------------------------------------------------ TextStream

def test_text_stream_prints_whole_characters(tokenizer_ok):
    from gpt2.tokenizer import encode

    text = "naïve café 🙂 日本語 done"
    stream = TextStream()
    pieces = [stream.push(t) for t in encode(text)]
    pieces.append(stream.finish())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens are partial characters and print nothing yet


def test_text_stream_stop_strings_across_tokens(tokenizer_ok):
    from gpt2.tokenizer import encode

    stream = TextStream(stop=["o w", "zzz"])
    out = "".join(stream.push(t) for t in encode("Hello world, hello"))
    assert out + stream.finish() == "Hell" and stream.stopped
    # a tail that might begin a stop string is held back until it cannot
    stream = TextStream(stop=["cd"])
    shown = "".join(stream.push(t) for t in encode("abc"))
    assert shown == "ab" and stream.finish() == "c" and not stream.stopped
