"""Frozen-weight decoding products: packed fp32 products, the exact int8-screened greedy argmax, and when the
packed copies are (and are not) reused."""

from __future__ import annotations

import pytest
import torch

from gpt2 import kernels
from gpt2.inference import generate
from gpt2.kernels import FrozenHead, Int8Product, TransposedHead, freeze, frozen, unfreeze
from gpt2.model import GPT, GPTConfig, Projection


def tiny(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, **kw)).eval()


def full_argmax(head: FrozenHead, x: torch.Tensor) -> torch.Tensor:
    return (x @ head.weight.t()).argmax(dim=1)


@pytest.mark.parametrize("seed", range(5))
def test_screened_argmax_equals_fp32_argmax(seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(3000, 64, generator=g) * 0.02
    head = FrozenHead(weight, vocab_size=2950)  # the padding rows past the vocabulary never win
    x = torch.nn.functional.layer_norm(torch.randn(16, 64, generator=g) * 3 + 1, (64,))
    assert torch.equal(head.argmax(x), full_argmax(head, x))
    assert int(head.argmax(x).max()) < 2950


def test_screened_argmax_on_ties_and_near_ties_takes_the_first_index():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(500, 32, generator=g)
    weight[400] = weight[17]  # an exact tie with an earlier token
    weight[300] = weight[5] * (1 + 1e-6)  # a near tie, far below int8 resolution
    head = FrozenHead(weight, vocab_size=500)
    x = torch.stack([weight[17], weight[5], -weight[17]])  # rows whose best token is tied / nearly tied
    assert torch.equal(head.argmax(x), full_argmax(head, x))
    assert int(head.argmax(x[:1])) == 17


def test_outlier_activations_fall_back_to_the_full_product(monkeypatch):
    """A huge activation in a direction the head ignores makes the int8 grid too coarse for the others: the
    bound then admits (nearly) every token, and the full fp32 product decides, still exactly."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(2000, 64, generator=g) * 0.02
    weight[:, 3] = 0
    head = FrozenHead(weight, vocab_size=2000)
    x = torch.randn(4, 64, generator=g)
    x[:, 3] = 1e4
    calls = []
    monkeypatch.setattr(head, "product", lambda v: calls.append(1) or v @ head.weight.t())
    monkeypatch.setattr(kernels, "MAX_CANDIDATES", 10)
    assert torch.equal(head.argmax(x), full_argmax(head, x))
    assert calls  # the fallback ran


def test_int8_product_is_exact_integer_arithmetic():
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (257, 96), generator=g, dtype=torch.int8)
    scale = torch.rand(257, generator=g) + 0.5
    xq = torch.randint(-127, 128, (5, 96), generator=g).float()
    x_scale = torch.rand(5, 1, generator=g) + 0.1
    expected = (xq.double() @ q.double().t()) * x_scale.double() * scale.double()  # exact in float64
    product = Int8Product(q, scale)
    assert product.exact
    torch.testing.assert_close(product(xq, x_scale).double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(product._int_mm(xq, x_scale).double(), expected, rtol=1e-6, atol=0)


def test_without_an_exact_int8_kernel_the_full_product_decides(monkeypatch):
    """A CPU whose int8 kernels saturate fails the check at construction; argmax must then not screen."""
    monkeypatch.setattr(Int8Product, "_int_mm", lambda self, xq, s: torch.zeros(xq.size(0), self.q_t.size(1)))
    monkeypatch.setattr(Int8Product, "_onednn_prepacked", lambda self, q: None)
    g = torch.Generator().manual_seed(6)
    head = FrozenHead(torch.randn(300, 32, generator=g), vocab_size=300)
    assert not head.int8.exact
    x = torch.randn(3, 32, generator=g)
    assert torch.equal(head.argmax(x), full_argmax(head, x))


def test_frozen_installs_packed_products_and_restores_the_model():
    model = tiny()
    x = torch.randn(3, 5, 32)
    layer = model.transformer.h[0].mlp.c_fc
    with torch.inference_mode():
        plain = layer(x)
        with frozen(model, work=kernels.PACK_MIN_WORK) as head:
            assert head is not None
            packed = layer(x)
            if kernels.mkl_packing_available():
                assert layer.product is not None
            logits = model.logits(x[:, -1], head)
        assert all(m.product is None for m in model.modules() if isinstance(m, Projection))
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, model.logits(x[:, -1]), rtol=1e-5, atol=1e-5)


def test_short_calls_skip_packing_and_frozen_models_always_pack():
    model = tiny()
    x = torch.randn(4, 32)
    with torch.inference_mode():
        with frozen(model, work=kernels.PACK_MIN_WORK - 1) as head:  # not worth packing for one short call
            assert isinstance(head, TransposedHead)
            assert all(m.product is None for m in model.modules() if isinstance(m, Projection))
            assert torch.equal(head.argmax(x), (x @ model.lm_head.weight[:50257].t()).argmax(1))
        freeze(model)
        try:
            with frozen(model) as head:
                assert isinstance(head, FrozenHead) == kernels.mkl_packing_available()
        finally:
            unfreeze(model)


def decode_plain(model: GPT, ids: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy decoding by full recompute, with the model's own products only: the reference."""
    seqs = ids.tolist()
    with torch.inference_mode():
        for _ in range(steps):
            nxt = model(torch.tensor(seqs))[:, -1].argmax(-1)
            seqs = [s + [int(t)] for s, t in zip(seqs, nxt)]
    return [s[ids.size(1):] for s in seqs]


@pytest.mark.parametrize("frozen_model", [False, True])
def test_greedy_generation_with_decoding_products_equals_plain_decoding(frozen_model):
    model = tiny(3)
    ids = torch.randint(0, 50257, (4, 6), generator=torch.Generator().manual_seed(3))
    if frozen_model:
        freeze(model)
    got = generate(model, ids, torch.ones_like(ids), 0.0, 12, eos_id=None)
    unfreeze(model)
    assert got == decode_plain(model, ids, 12)


def test_weights_changed_by_a_fused_optimizer_are_seen_unless_frozen():
    """Fused AdamW updates parameters without bumping their version counters, so nothing may be cached
    across calls unless the owner froze the model; after `unfreeze` the new weights are used again."""
    model = tiny(4)
    ids = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    before = generate(model, ids, mask, 0.0, 8, eos_id=None)
    freeze(model)
    assert generate(model, ids, mask, 0.0, 8, eos_id=None) == before
    unfreeze(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    model.train()
    model.loss(ids, ids).backward()
    opt.step()
    model.eval()
    after = generate(model, ids, mask, 0.0, 8, eos_id=None)
    assert after == decode_plain(model, ids, 8)
    assert after != before


def test_rows_on_different_logit_scales_keep_the_screen_short(monkeypatch):
    """Each row's candidates come from its own best logit, so a row with large logits does not flood the
    short list of a row with small ones (which would force the full product)."""
    g = torch.Generator().manual_seed(5)
    head = FrozenHead(torch.randn(5000, 64, generator=g) * 0.02, vocab_size=5000)
    x = torch.randn(2, 64, generator=g)
    x[0] *= 20
    monkeypatch.setattr(head, "product", lambda v: pytest.fail("fell back to the full product"))
    monkeypatch.setattr(kernels, "MAX_CANDIDATES", 500)
    assert torch.equal(head.argmax(x), full_argmax(head, x))


def projection_products(model: GPT) -> list:
    return [m.product for m in model.modules() if isinstance(m, Projection)]


@pytest.mark.skipif(not kernels.mkl_packing_available(), reason="needs PyTorch's MKL packed sgemm")
def test_overlapping_calls_leave_the_model_clean():
    """Two decoding calls on one model whose blocks interleave (two threads, or a generator suspended
    mid-stream) in the order A enters, B enters, A leaves, B leaves: nothing stale stays installed."""
    model = tiny()
    a, b = frozen(model, work=kernels.PACK_MIN_WORK), frozen(model, work=kernels.PACK_MIN_WORK)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    assert all(p is None for p in projection_products(model))


@pytest.mark.skipif(not kernels.mkl_packing_available(), reason="needs PyTorch's MKL packed sgemm")
def test_freeze_installs_until_unfreeze_and_autograd_always_sees_live_weights():
    model = tiny()
    freeze(model)
    try:
        assert all(p is not None for p in projection_products(model))
        with frozen(model, work=kernels.PACK_MIN_WORK):  # a frozen model's products are left alone
            pass
        assert all(p is not None for p in projection_products(model))
        layer = model.transformer.h[0].attn.c_attn
        x = torch.randn(2, 32, requires_grad=True)
        with torch.no_grad():
            layer.weight.mul_(2)  # the packed copy is now stale; a training forward must not use it
        y = layer(x)
        torch.testing.assert_close(y, torch.addmm(layer.bias, x, layer.weight))
        y.sum().backward()
        assert x.grad is not None
    finally:
        unfreeze(model)
    assert all(p is None for p in projection_products(model))
