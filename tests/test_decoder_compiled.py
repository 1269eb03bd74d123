"""The compiled decoder (`Decoder(model, compile=True)`, `gpt2.decode.compiled`) against the eager one: the same tokens
and log-probabilities through `generate`, the serving engine (rows admitted and dropped) and echo scoring; the
compiled pieces are cached (a second start compiles nothing) and a cache entry is whole or absent; with
`release_weights` the model holds no weights and decoding is unchanged."""

from __future__ import annotations

import copy
import shutil
import stat
import threading
from types import SimpleNamespace

import pytest
import torch
from serve_helpers import one_torch_thread

import gpt2.decode.compile_cache
import gpt2.decode.compiled
from gpt2.decode import Decoder, SamplingParams, score_tokens
from gpt2.decode.compiled import cache_key
from gpt2.decode.engine import Engine
from gpt2.inference import generate
from gpt2.model import GPT, GPTConfig

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

# The compiled pieces multiply with other kernels (inductor's generated GEMMs, fused layer norms) than eager
# PyTorch, so logits differ in the last bits: ~1e-6 relative on this model. 1e-4 on log-probabilities leaves
# two orders of magnitude of room while catching a real error (a wrong column, mask or row: >= 1e-2).
ATOL = 1e-4
VOCAB = 300
CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=48, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    # a small vocabulary: greedy tokens are compared exactly, and the gap between the two likeliest of a few
    # hundred logits is far wider than the compiled pieces' last-bit differences (no near-ties to flip)
    return GPT(CONFIG).eval()


@pytest.fixture(scope="module")
def compiled(model):
    return Decoder(model, compile=True)  # compiles the pieces into the test session's cache (conftest)


def prompts(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(lengths))
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("lengths", [[5], [1], [7, 2, 11], [3, 3, 3, 3, 3, 3]])
def test_generate_equals_eager(model, compiled, lengths):
    ids, mask = prompts(lengths)
    eager = generate(model, ids, mask, 0.0, 20, eos_id=None)
    assert generate(model, ids, mask, 0.0, 20, eos_id=None, decoder=compiled) == eager


def test_logits_equal_eager_at_every_step(model, compiled):
    eager = Decoder(model)
    batch = [[11, 12, 13], [7], [1, 2, 3, 4, 5, 6, 7, 8]]
    a, b = eager.prefill(batch, room=12), compiled.prefill(batch, room=12)
    for step in range(12):
        la, lb = a.logits.log_softmax(-1), b.logits.log_softmax(-1)
        torch.testing.assert_close(lb, la, atol=ATOL, rtol=0, msg=f"step {step}")
        tokens = la.argmax(-1).tolist()
        if step == 4:  # a row leaves mid-way, as in the engine
            a.keep([True, False, True]), b.keep([True, False, True])
            tokens = [tokens[0], tokens[2]]
        if step == 8:  # and then another: one row is left
            a.keep([True, False]), b.keep([True, False])
            tokens = tokens[:1]
        eager.step(a, tokens), compiled.step(b, tokens)


def serve(model, decoder: Decoder | None, at_step=lambda step: None) -> list[tuple[list[int], list[float]]]:
    """Requests that arrive at different steps and end at different lengths, with log-probs (`at_step(step)` runs
    before each engine step)."""
    engine = Engine(model, max_batch_size=3, eos_id=None, headroom=2, decoder=decoder)
    arrivals = {0: [[1, 2, 3], [9]], 3: [[4, 5, 6, 7, 8, 9, 10]], 5: [[20, 21]], 9: [[30]]}
    requests: list[list] = []
    for step in range(60):
        for prompt in arrivals.get(step, []):
            events: list = []
            engine.submit(prompt, SamplingParams(max_tokens=4 + 2 * len(requests), temperature=0, logprobs=0),
                          events.append)
            requests.append(events)
        at_step(step)
        if not engine.has_work() and step > max(arrivals):
            break
        engine.step()
    return [([e.token for e in events if e.token is not None],
             [e.logprob.logprob for e in events if e.logprob is not None]) for events in requests]


def test_engine_equals_eager(model, compiled):
    eager = serve(model, None)
    fast = serve(model, compiled)
    assert [t for t, _ in fast] == [t for t, _ in eager]
    for (_, lf), (_, le) in zip(fast, eager):
        torch.testing.assert_close(torch.tensor(lf), torch.tensor(le), atol=ATOL, rtol=0)


def test_scoring_equals_the_full_forward(model, compiled):
    sequences = [[5, 6, 7, 8, 9], [1], [40, 41]]
    eager, fast = score_tokens(model, sequences, top=3), score_tokens(compiled, sequences, top=3)
    for row_e, row_f in zip(eager, fast):
        assert [lp.token if lp else None for lp in row_f] == [lp.token if lp else None for lp in row_e]
        for e, f in zip(row_e[1:], row_f[1:]):
            assert abs(f.logprob - e.logprob) < ATOL
            assert [t for t, _ in f.top] == [t for t, _ in e.top]


def test_a_second_start_loads_the_cached_pieces(model, compiled, monkeypatch):
    def no_build(*args):
        raise AssertionError("compiled again although the pieces are cached")

    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", no_build)
    again = Decoder(model, compile=True)
    ids, mask = prompts([4, 9])
    assert generate(model, ids, mask, 0.0, 8, eos_id=None, decoder=again) == generate(model, ids, mask, 0.0, 8,
                                                                                        eos_id=None)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.transformer.h[1].mlp.c_fc.bias[0] += 1e-3  # other weights: another cache entry
    assert cache_key(other) != cache_key(model)
    padded = copy.deepcopy(model)
    with torch.no_grad():
        padded.transformer.wte.weight[VOCAB:] = 7.0  # padding rows (never an output): the same entry
    assert padded.config.padded_vocab_size > VOCAB and cache_key(padded) == cache_key(model)


def test_released_weights_are_held_by_the_pieces_only(model, compiled):
    own = copy.deepcopy(model)
    decoder = Decoder(own, compile=True, release_weights=True)
    assert all(p.is_meta for p in own.parameters())
    ids, mask = prompts([6, 2])
    assert generate(own, ids, mask, 0.0, 10, eos_id=None, decoder=decoder) == generate(model, ids, mask, 0.0, 10,
                                                                                        eos_id=None)
    # what `gpt2 serve` does with it: the engine and echo scoring, with no weights left in the model
    assert [t for t, _ in serve(own, decoder)] == [t for t, _ in serve(model, None)]
    scored = score_tokens(decoder, [[3, 4, 5]])[0]
    assert all(abs(f.logprob - e.logprob) < ATOL for f, e in zip(scored[1:], score_tokens(model, [[3, 4, 5]])[0][1:]))


def test_a_failed_compile_says_why_and_leaves_no_cache_entry(model, tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'inductor log line'\necho 'CppCompileError: g++ not found'\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(gpt2.decode.compiled.sys, "executable", str(fake))
    monkeypatch.setenv("GPT2_COMPILE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="^CppCompileError: g\\+\\+ not found$"):
        Decoder(model, compile=True, release_weights=True)
    assert not any(p.is_meta for p in model.parameters())  # nothing was released: the caller can decode eagerly
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{cache_key(model)}.lock"]  # no entry


def test_a_damaged_cache_entry_is_compiled_again(model, compiled, tmp_path, monkeypatch):
    """A cut-off piece (a full disk, a copy interrupted) is found before the model's weights are handed over."""
    entry = gpt2.decode.compile_cache.cache_root() / cache_key(model)
    damaged = tmp_path / "cache" / entry.name
    shutil.copytree(entry, damaged)
    piece = damaged / "piece-01.pt2"
    piece.write_bytes(piece.read_bytes()[:1000])
    monkeypatch.setenv("GPT2_COMPILE_CACHE", str(tmp_path / "cache"))
    rebuilt = []

    def build(model, directory, progress, label=""):
        rebuilt.append(directory)
        shutil.copytree(entry, directory)  # stands in for compiling (minutes): the same pieces

    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", build)
    own = copy.deepcopy(model)
    decoder = Decoder(own, compile=True, release_weights=True)
    assert rebuilt == [damaged]
    ids, mask = prompts([5])
    assert generate(own, ids, mask, 0.0, 6, eos_id=None, decoder=decoder) == generate(model, ids, mask, 0.0, 6,
                                                                                       eos_id=None)


def test_compiled_decoder_keeps_no_head_copy(compiled):
    assert compiled.head is None and compiled.compile_seconds > 0


def test_a_decoder_of_another_model_is_refused(compiled):
    other = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=48, vocab_size=VOCAB)).eval()
    with pytest.raises(ValueError, match="another model"):
        generate(other, *prompts([3]), 0.0, 2, eos_id=None, decoder=compiled)


# ---------------------------------------------------------------------------------------------- in the background


def test_decoding_starts_eagerly_and_switches_mid_generation(model, compiled):
    """The pieces (cached by the `compiled` fixture) load in the background while `generate` runs eagerly; the
    switch happens between two steps and the tokens are those of either decoder alone."""
    own = copy.deepcopy(model)
    decoder = Decoder(own, release_weights=True)
    said: list[str] = []
    background = decoder.compile_in_background(say=said.append)
    assert decoder.status()["decoder"] == "eager"
    steps = []

    def on_tokens(produced):
        steps.append(decoder.compiled)
        if len(steps) == 3:
            assert background.wait(120) and background.state == "ready"

    ids, mask = prompts([7, 2, 11])
    out = generate(own, ids, mask, 0.0, 12, eos_id=None, decoder=decoder, on_tokens=on_tokens)
    assert out == generate(model, ids, mask, 0.0, 12, eos_id=None)
    assert steps[:3] == [False] * 3 and all(steps[4:])  # eager first, compiled after the switch
    assert decoder.status() == {"decoder": "compiled", "weights_dtype": "float32", "compile": background.status()}
    assert background.status()["state"] == "ready" and not background.built
    assert all(p.is_meta for p in own.parameters())  # the pieces hold the only copy now
    assert len(said) == 1 and said[0].startswith("switched to compiled decoding")


def test_requests_in_flight_go_on_across_the_switch(model, compiled):
    """Engine rows admitted eagerly keep their cache when the decoder switches; tokens equal and log-probs match
    the eager engine's within the decoders' tolerance."""
    eager = serve(model, None)
    decoder = Decoder(copy.deepcopy(model), release_weights=True)

    def switch_at_step_4(step: int) -> None:
        if step == 4:  # three requests are running, eagerly; the pieces load now (started here, not before: a
            # load begun earlier may finish first on a fast or idle machine), and the next step switches
            assert not decoder.compiled
            assert decoder.compile_in_background(say=lambda line: None).wait(120)

    got = serve(decoder.model, decoder, switch_at_step_4)
    assert decoder.compiled
    assert [t for t, _ in got] == [t for t, _ in eager]
    for (_, lf), (_, le) in zip(got, eager):
        torch.testing.assert_close(torch.tensor(lf), torch.tensor(le), atol=ATOL, rtol=0)


def test_a_slow_first_compile_keeps_nobody_waiting(model, compiled, tmp_path, monkeypatch):
    """An empty cache: the build (here a stand-in that takes its time, then gives the real pieces) runs while the
    decoder answers eagerly; it says so, reports progress, and the switch follows."""
    entry = gpt2.decode.compile_cache.cache_root() / cache_key(model)
    monkeypatch.setenv("GPT2_COMPILE_CACHE", str(tmp_path / "empty"))
    first_piece, release = threading.Event(), threading.Event()

    def slow_build(model, directory, progress, label=""):
        progress("  piece 1/4 compiled in 9 s")
        first_piece.set()
        assert release.wait(60)
        progress("  pieces compiled; the compiling process's peak memory was 1515 MB")
        shutil.copytree(entry, directory)

    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", slow_build)
    own = copy.deepcopy(model)
    decoder = Decoder(own, release_weights=True)
    said: list[str] = []
    background = decoder.compile_in_background(say=said.append, label="tiny")
    ids, mask = prompts([5])
    assert generate(own, ids, mask, 0.0, 6, eos_id=None, decoder=decoder) == generate(model, ids, mask, 0.0, 6,
                                                                                       eos_id=None)
    assert first_piece.wait(60)  # the answer may be done before the thread has hashed the weights and begun
    status = decoder.status()
    assert status["decoder"] == "eager" and status["compile"]["state"] == "compiling"
    assert status["compile"]["pieces_compiled"] == 1 and status["compile"]["pieces"] == 4
    assert said and "decoding eagerly until they are ready" in said[0]
    release.set()
    assert background.wait(60) and background.state == "ready"
    assert generate(own, ids, mask, 0.0, 6, eos_id=None, decoder=decoder) == generate(model, ids, mask, 0.0, 6,
                                                                                       eos_id=None)
    assert decoder.compiled and said[-1].startswith("switched to compiled decoding") and "compiled in" in said[-1]
    assert "the compiling process's peak memory 1515 MB" in said[-1]  # the memory the compile cost, said once


def test_a_failed_background_compile_leaves_decoding_eager(model, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2_COMPILE_CACHE", str(tmp_path / "cache"))

    def broken(model, directory, progress, label=""):
        raise RuntimeError("CppCompileError: g++ not found")

    monkeypatch.setattr(gpt2.decode.compiled, "build_in_child", broken)
    decoder = Decoder(model)
    said: list[str] = []
    assert decoder.compile_in_background(say=said.append).wait(60)
    ids, mask = prompts([4])
    assert generate(model, ids, mask, 0.0, 5, eos_id=None, decoder=decoder) == generate(model, ids, mask, 0.0, 5,
                                                                                         eos_id=None)
    assert not decoder.compiled and decoder.status()["compile"]["state"] == "failed"
    assert said[-1] == ("note: compiling failed (RuntimeError: CppCompileError: g++ not found); decoding stays eager "
                        "(--no-compile skips it)")


def test_small_models_are_not_compiled_by_default(model):
    from gpt2.decode import COMPILE_MIN_PARAMS, wants_compile

    assert model.num_params() < COMPILE_MIN_PARAMS
    assert not wants_compile(model, None) and wants_compile(model, True) and not wants_compile(model, False)
    # the rule reads the size and the device only
    big = SimpleNamespace(num_params=lambda: COMPILE_MIN_PARAMS, lm_head=SimpleNamespace(weight=torch.empty(0)))
    assert wants_compile(big, None)
    assert not wants_compile(SimpleNamespace(num_params=big.num_params,
                                             lm_head=SimpleNamespace(weight=torch.empty(0, device="meta"))), None)


def test_one_rows_head_is_the_plain_product_and_agrees_with_the_head_piece(model, compiled):
    """One row's logits come from `h @ W` on the entry's transposed head (what the eager decoder computes), several
    rows' from the compiled head piece; the two agree within the pieces' tolerance."""
    forward = compiled._compiled
    entry = gpt2.decode.compile_cache.cache_root() / cache_key(model)
    assert gpt2.decode.compiled.HEAD_FILE in gpt2.decode.compile_cache.read_manifest(entry)["files"]  # checksummed
    hidden = torch.randn(3, CONFIG.n_embd, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(forward.head, gpt2.decode.compiled.head_matrix(model), atol=0, rtol=0)
        one = forward.logits(hidden[1:2])  # (1, V)
        assert torch.equal(one, hidden[1:2] @ forward.head)
        several = forward.logits(hidden)  # (3, V): the head piece
        assert several.shape == (3, VOCAB)
        torch.testing.assert_close(several[1:2], one, atol=ATOL, rtol=0)
