"""The decoding core: log-probabilities equal a full forward's log-softmax, per-row choosing (logit bias,
penalties) and failure isolation in the engine, scoring for `echo`."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

import pytest
import torch
from serve_helpers import one_torch_thread

from gpt2.decode import Decoder, RowSampler, SamplingParams, choose, pad_right, return_freed_memory, score_tokens
from gpt2.decode.engine import Engine
from gpt2.inference import generate
from gpt2.model import GPT, GPTConfig

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

# Log-probs come from the cached step (batched, padded, different shapes of matmuls) and are compared with
# one full forward: fp32 sums in different orders differ by ~1e-6 relative on logits of this size; 1e-4
# absolute on log-probs leaves two orders of magnitude while catching any real error (a wrong position,
# temperature applied, a wrong row), which moves them by >= 1e-2.
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(2)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=48)).eval()


def full_logprobs(model, tokens):
    """log_softmax of one full forward over `tokens`: row t predicts token t + 1."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).float().log_softmax(-1)[0]


class Recorder:
    """A request's sink: its tokens, their log-prob entries (when asked) and its finish reason."""

    def __init__(self):
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.reason: str | None = None

    def __call__(self, event):
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        if event.token is None:
            self.reason = event.finish_reason
        else:
            self.tokens.append(event.token)


def run(engine: Engine) -> None:
    for _ in range(200):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_engine_logprobs_equal_full_forward(model, temperature):
    engine = Engine(model, eos_id=None)
    prompts = [[3, 4, 5, 6, 7], [9], [11, 12, 13]]  # different lengths: padded prefill, then steps
    recs = [Recorder() for _ in prompts]
    for i, (p, r) in enumerate(zip(prompts, recs)):
        engine.submit(p, SamplingParams(max_tokens=6, temperature=temperature, seed=i, logprobs=3), r)
    run(engine)
    for p, rec in zip(prompts, recs):
        assert rec.reason == "length" and len(rec.logprobs) == 6
        full = full_logprobs(model, p + rec.tokens)
        for t, lp in enumerate(rec.logprobs):
            row = full[len(p) - 1 + t]  # the prediction of generated token t
            assert lp.token == rec.tokens[t]
            assert abs(lp.logprob - float(row[lp.token])) < ATOL
            ref_vals, ref_ids = row.topk(3)
            assert len(lp.top) == 3
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), ref_vals, atol=ATOL, rtol=0)
            assert lp.top[0][0] == int(ref_ids[0]) or float(ref_vals[0] - ref_vals[1]) < ATOL


def test_no_logprobs_unless_asked(model):
    engine = Engine(model, eos_id=None)
    rec = Recorder()
    engine.submit([1, 2], SamplingParams(max_tokens=3, temperature=0.0), rec)
    run(engine)
    assert rec.logprobs == [] and len(rec.tokens) == 3


def test_score_tokens_equals_full_forward(model):
    seqs = [[5, 6, 7, 8, 9], [1, 2], [40]]
    scored = score_tokens(model, seqs, top=2)
    for seq, row in zip(seqs, scored):
        assert len(row) == len(seq) and row[0] is None
        full = full_logprobs(model, seq)
        for t in range(1, len(seq)):
            assert row[t].token == seq[t]
            assert abs(row[t].logprob - float(full[t - 1, seq[t]])) < ATOL
            assert [i for i, _ in row[t].top] == full[t - 1].topk(2).indices.tolist()


def test_one_rows_failure_ends_only_that_request(model, caplog):
    engine = Engine(model, eos_id=None)
    good, bad = Recorder(), Recorder()
    engine.submit([5, 6, 7], SamplingParams(max_tokens=8, temperature=0.0), good)
    engine.step()  # the good request is running when the bad one joins
    engine.submit([1, 2], SamplingParams(max_tokens=8, temperature=0.0, logit_bias={10**9: 5.0}), bad)
    with caplog.at_level(logging.ERROR, logger="gpt2.decode.engine"):
        run(engine)
    assert bad.reason == "error" and bad.tokens == []
    assert "logit_bias" in caplog.text  # the cause is logged
    assert good.reason == "length"
    assert good.tokens == generate(model, *pad_right([[5, 6, 7]]), 0.0, 8, eos_id=None)[0]


def test_logit_bias_and_penalties(model):
    decoder = Decoder(model)
    rows = decoder.prefill([[5, 6, 7]], room=4)
    greedy = choose(rows.logits, [RowSampler(SamplingParams(temperature=0.0))])[0].token
    forced = choose(rows.logits, [RowSampler(SamplingParams(temperature=0.0, logit_bias={123: 100.0}))])[0]
    assert forced.token == 123 != greedy
    # a token already generated is pushed down by the penalties, by exactly presence + count * frequency
    sampler = RowSampler(SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=100.0),
                         history=[greedy])
    assert choose(rows.logits, [sampler])[0].token != greedy
    assert sampler.history == [greedy, sampler.history[-1]]  # choosing extends the row's history


def test_tiny_temperature_and_top_p_in_the_engine_are_greedy(model):
    engine = Engine(model, eos_id=None)
    recs = [Recorder() for _ in range(3)]
    params = [SamplingParams(max_tokens=6, temperature=1e-300), SamplingParams(max_tokens=6, temperature=1e-45),
              SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-300, seed=1)]
    for p, r in zip(params, recs):
        engine.submit([8, 9], p, r)
    run(engine)
    ref = generate(model, *pad_right([[8, 9]]), 0.0, 6, eos_id=None)[0]
    assert [r.tokens for r in recs] == [ref] * 3


def test_generate_follows_weight_changes(model):
    """The decoder copies the head for speed: a training step between two calls must show in the second,
    also with a fused optimizer (which changes the weights without bumping their version counters)."""
    torch.manual_seed(5)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    ids, mask = pad_right([[1, 2, 3]])
    before = generate(m, ids, mask, 0.0, 5, eos_id=None)
    opt = torch.optim.AdamW(m.parameters(), lr=0.5, fused=True)
    m(ids).logsumexp(-1).sum().backward()
    opt.step()
    fresh = GPT(m.config).eval()
    fresh.load_state_dict(m.state_dict())
    after = generate(m, ids, mask, 0.0, 5, eos_id=None)
    assert after == generate(fresh, ids, mask, 0.0, 5, eos_id=None) != before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_os():
    """What a compiled decoder does once its pieces are loaded: heap pages that were freed (the released weights,
    the loading buffers) stop counting in the process's resident memory. Freed blocks between blocks still in use
    stay resident until trimmed."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 10  # below malloc's mmap threshold: on the heap
    blocks = [libc.malloc(size) for _ in range(3200)]
    for block in blocks:
        ctypes.memset(block, 1, size)  # touched: resident
    for block in blocks[::2]:  # 100 MB, every other block: each lies between blocks in use, so none coalesce
        libc.free(block)
    before = resident_mb()
    assert return_freed_memory()
    after = resident_mb()
    for block in blocks[1::2]:
        libc.free(block)
    assert before - after > 50, (before, after)


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
