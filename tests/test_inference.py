"""Batched generation: right padding handled exactly, parity with HF greedy generate, sampling options."""

from __future__ import annotations

import pytest
import torch

from gpt2.inference import generate, pad_right, sample_next, tokenize_batch_input
from gpt2.model import GPT, GPTConfig
from gpt2.tokenizer import EOT

transformers = pytest.importorskip("transformers")


def make_pair(path, n_layer=2, n_head=2, n_embd=64, block_size=64, seed=1):
    """Our model and HF's with the same random weights."""
    torch.manual_seed(seed)
    ours = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)).eval()
    ours.save_pretrained(path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    return ours, hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("ckpt"))


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 301], [42, 0, 0, 7], [1000]]  # 0 is a real token ("!")
# float sums differ across CPUs and thread counts by ~1e-6: a greedy step whose top two logits are closer
# than this may legitimately go either way, so tokens are compared up to the first such near-tie
NEAR_TIE = 1e-4


def hf_greedy(hf, prompt, steps):
    """HF's greedy tokens, cut before the first step whose top-two logit margin is a near-tie."""
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0,
                      output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    for t, logits in enumerate(out.logits):
        top2 = logits[0].topk(2).values
        if float(top2[0] - top2[1]) < NEAR_TIE:
            return tokens[:t]
    return tokens


@pytest.mark.parametrize("shape", [(2, 2, 64, 64, 1), (3, 4, 128, 96, 7)])
def test_greedy_matches_hf_per_prompt_with_right_padding(tmp_path, shape):
    ours, hf = make_pair(tmp_path, *shape)
    prompts = PROMPTS + [list(range(100, 100 + shape[3] // 2))]
    ids, mask = pad_right(prompts)
    got = generate(ours, ids, mask, temperature=0.0, max_steps=12, eos_id=None)
    compared = 0
    for prompt, tokens in zip(prompts, got):
        ref = hf_greedy(hf, prompt, 12)
        assert tokens[: len(ref)] == ref
        compared += len(ref)
    assert compared >= 12 * len(prompts) // 2  # near-ties are rare: most tokens were compared


def test_output_independent_of_batch_mates(pair):
    ours, _ = pair
    ids, mask = pad_right(PROMPTS)
    batched = generate(ours, ids, mask, 0.0, 10, eos_id=None)
    for i, p in enumerate(PROMPTS):
        alone = generate(ours, *pad_right([p]), 0.0, 10, eos_id=None)
        assert alone[0] == batched[i]


def test_stops_at_eot_and_cuts_it(pair):
    ours, _ = pair
    ids, mask = pad_right(PROMPTS)
    free = generate(ours, ids, mask, 0.0, 10, eos_id=None)
    # declare row 0's third greedy token to be the stop token: row 0 stops there, others are unaffected
    stop = free[0][2]
    got = generate(ours, ids, mask, 0.0, 10, eos_id=stop)
    for f, g in zip(free, got):
        assert g == (f[: f.index(stop)] if stop in f else f)
    assert len(got[0]) <= 2


def test_context_window(pair):
    ours, _ = pair
    long = torch.ones(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="context window"):
        generate(ours, long, torch.ones_like(long), 0.0, 5)
    near = torch.ones(1, 60, dtype=torch.long)
    assert len(generate(ours, near, torch.ones_like(near), 0.0, 50, eos_id=None)[0]) == 4


def test_errors_on_bad_masks(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="empty"):
        generate(ours, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), 0.0, 2)
    with pytest.raises(ValueError, match="right-padded"):
        generate(ours, torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]), 0.0, 2)


def test_seeded_sampling_reproducible(pair):
    ours, _ = pair
    ids, mask = pad_right(PROMPTS)
    a = generate(ours, ids, mask, 1.0, 8, generator=torch.Generator().manual_seed(3), top_k=50, top_p=0.9)
    b = generate(ours, ids, mask, 1.0, 8, generator=torch.Generator().manual_seed(3), top_k=50, top_p=0.9)
    assert a == b


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 1e-30])
def test_tiny_temperature_is_greedy(temperature):
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 5.0 - 1e-6, 1.0, 0.0]])
    assert sample_next(logits, temperature).tolist() == [1, 0]


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 0.0])
def test_tiny_top_p_keeps_the_top_token(top_p):
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]]).repeat(50, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_p=top_p, generator=g).tolist()) == {1}


def test_extreme_logits_never_give_nan():
    logits = torch.tensor([[3e38, -3e38, 0.0], [float("-inf"), 1.0, float("-inf")]])
    g = torch.Generator().manual_seed(0)
    for temperature in (1e-30, 0.5, 100.0):
        assert sample_next(logits, temperature, top_p=0.5, generator=g).tolist() == [0, 1]


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    # probabilities ~[.64,.24,.09,...]: top_p 0.5 keeps only the first, 0.8 the first two
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert sample_next(logits[:1], 0.0).item() == 0


def test_tokenize_batch_input_right_pads(tokenizer_ok):
    ids, mask = tokenize_batch_input(["Hello world, how are you", "Hi"])
    assert ids.dtype == mask.dtype == torch.long
    assert mask.tolist()[1] == [1] + [0] * (ids.size(1) - 1)
    assert ids[1, 1:].eq(0).all() and mask[0].all()
    assert EOT == 50256


def test_sampling_follows_the_softmax():
    """Sampled frequencies match softmax(logits / T) (20000 draws: 6 standard deviations is 0.02), and tokens
    with zero probability (-inf) are never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(20000, 1)
    for temperature in (1.0, 0.5):
        draws = sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        torch.testing.assert_close(freq, (logits[0] / temperature).softmax(-1), atol=0.02, rtol=0)
        assert freq[4] == 0
