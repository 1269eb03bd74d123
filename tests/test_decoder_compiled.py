"""The compiled decoding step (`Decoder(model, compile=True)`) against the eager one: the same tokens and
log-probabilities through `generate` and the serving engine (rows admitted and dropped), and no compiling
after the warm-up whatever the batch size, prompt lengths or cache width."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import one_torch_thread

from gpt2.decoder import Decoder, SamplingParams
from gpt2.inference import generate
from gpt2.model import GPT, GPTConfig
from gpt2.serve.engine import Engine

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

# The compiled step multiplies with other kernels (inductor's generated GEMMs, fused layer norms) than eager
# PyTorch, so logits differ in the last bits: ~1e-6 relative on this model. 1e-4 on log-probabilities leaves
# two orders of magnitude of room while catching a real error (a wrong column, mask or row: >= 1e-2).
ATOL = 1e-4
VOCAB = 300


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    # a small vocabulary: greedy tokens are compared exactly, and the gap between the two likeliest of a few
    # hundred logits is far wider than the compiled step's last-bit differences (no near-ties to flip)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=48, vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def compiled(model):
    return Decoder(model, compile=True)  # compiles its one graph (every batch size, cache width) in its warm-up


@pytest.fixture
def no_recompiles():
    """Any compiling after the warm-up raises: the decoder compiles once, at start."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def prompts(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(lengths))
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(0, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("lengths", [[5], [7, 2, 11], [3, 3, 3, 3, 3, 3]])
def test_generate_equals_eager(model, compiled, no_recompiles, lengths):
    ids, mask = prompts(lengths)
    eager = generate(model, ids, mask, 0.0, 20, eos_id=None)
    assert generate(model, ids, mask, 0.0, 20, eos_id=None, decoder=compiled) == eager


def test_logits_equal_eager_at_every_step(model, compiled, no_recompiles):
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
        eager.step(a, tokens), compiled.step(b, tokens)


def serve(model, decoder: Decoder | None) -> list[tuple[list[int], list[float]]]:
    """Requests that arrive at different steps and end at different lengths, with log-probs."""
    engine = Engine(model, max_batch_size=3, eos_id=None, headroom=2, decoder=decoder)
    out: list[tuple[list[int], list[float]]] = []
    arrivals = {0: [[1, 2, 3], [9]], 3: [[4, 5, 6, 7, 8, 9, 10]], 5: [[20, 21]], 9: [[30]]}
    requests = []
    for step in range(60):
        for prompt in arrivals.get(step, []):
            tokens: list[int] = []
            req = engine.submit(prompt, SamplingParams(max_tokens=4 + 2 * len(requests), temperature=0, logprobs=0),
                                lambda t, _reason, tokens=tokens: t is not None and tokens.append(t))
            requests.append((req, tokens))
        if not engine.has_work() and step > max(arrivals):
            break
        engine.step()
    for req, tokens in requests:
        out.append((tokens, [lp.logprob for lp in req.token_logprobs]))
    return out


def test_engine_equals_eager(model, compiled, no_recompiles):
    eager = serve(model, None)
    fast = serve(model, compiled)
    assert [t for t, _ in fast] == [t for t, _ in eager]
    for (_, lf), (_, le) in zip(fast, eager):
        torch.testing.assert_close(torch.tensor(lf), torch.tensor(le), atol=ATOL, rtol=0)


def test_compiled_decoder_keeps_no_head_copy(compiled):
    assert compiled.head is None and compiled.compile_seconds > 0


def test_a_decoder_of_another_model_is_refused(compiled):
    other = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=48, vocab_size=VOCAB)).eval()
    with pytest.raises(ValueError, match="another model"):
        generate(other, *prompts([3]), 0.0, 2, eos_id=None, decoder=compiled)
