"""Validation loss: equals a manual token-weighted mean, no grad, restores train mode."""

from __future__ import annotations

import pytest
import torch

from gpt2.evaluate import val_loss
from gpt2.model import GPT, GPTConfig


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.1))


def make_batches(n=3, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, 50257, (B, T + 1), generator=g)
        out.append((tok[:, :-1], tok[:, 1:]))
    return out


def test_val_loss_is_the_mean_of_batch_losses_in_eval_mode(tiny):
    batches = make_batches()
    tiny.train()
    got = val_loss(tiny, batches)
    assert tiny.training  # mode restored
    tiny.eval()
    with torch.no_grad():
        manual = sum(tiny.loss(x, y).item() for x, y in batches) / len(batches)
    assert got == pytest.approx(manual, rel=1e-6)
    tiny.train()
    assert val_loss(tiny, batches) == pytest.approx(got, rel=1e-6)  # dropout off: deterministic


def test_val_loss_weights_by_non_ignored_tokens(tiny):
    (x1, y1), (x2, y2) = make_batches(2)
    y2 = y2.clone()
    y2[:, :12] = -100  # 4 of 16 targets per row left
    tiny.eval()
    with torch.no_grad():
        l1, l2 = tiny.loss(x1, y1).item(), tiny.loss(x2, y2).item()
    expected = (l1 * 32 + l2 * 8) / 40
    assert val_loss(tiny, [(x1, y1), (x2, y2)]) == pytest.approx(expected, rel=1e-6)
    assert not tiny.training  # it was in eval mode before the call: stays there


def test_val_loss_takes_no_grad_and_handles_autocast(tiny):
    batches = make_batches(1)
    for p in tiny.parameters():
        p.grad = None
    full = val_loss(tiny, iter(batches), device="cpu")
    assert all(p.grad is None for p in tiny.parameters())
    low = val_loss(tiny, batches, autocast_dtype=torch.bfloat16)
    assert low == pytest.approx(full, rel=2e-2)


def test_val_loss_without_batches_is_an_error(tiny):
    with pytest.raises(ValueError, match="no batches"):
        val_loss(tiny, [])
