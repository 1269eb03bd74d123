"""The chunked fused lm_head + cross-entropy gives GPT.loss's value and gradients (with ignored targets)."""

from __future__ import annotations

import torch

from gpt2.losses import gpt_loss_chunked
from gpt2.model import GPT, GPTConfig


def test_chunked_loss_matches_model_loss_and_gradients():
    model = GPT(GPTConfig(block_size=16, vocab_size=300, n_layer=1, n_head=2, n_embd=32))
    x = torch.randint(0, 300, (3, 16))
    y = torch.randint(0, 300, (3, 16))
    y[0, :5] = -100  # prompt / padding positions are ignored
    ref = model.loss(x, y)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = gpt_loss_chunked(model, x, y, chunk=7)  # a chunk that does not divide the 48 rows
    (got * 3).backward()  # the incoming gradient scales the stored ones
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 3 * want[n], atol=1e-6, rtol=1e-4, msg=n)
    assert model.transformer.wte.weight.grad[300:].abs().sum() == 0  # padding rows never trained
