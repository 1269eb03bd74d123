"""Activation checkpointing applied from outside the model: the same gradients (dropout included), far fewer bytes
kept for backward, the same parameter names, and the training flag."""

from __future__ import annotations

import pytest
import torch
from test_train_loop import ListTask, cfg_for, losses, make_data, make_model

from gpt2.model import GPT, GPTConfig
from gpt2.train.loop import train
from gpt2.train.parallel import checkpoint_activations

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = GPTConfig(block_size=64, vocab_size=128, n_layer=3, n_head=2, n_embd=32, dropout=0.1)


def grads_and_saved_bytes(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, int]:
    """The gradients of one loss, and the bytes autograd kept for backward (the activation memory)."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(5)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(x, y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)


def test_gradients_unchanged_and_activation_memory_cut():
    torch.manual_seed(0)
    plain = GPT(CFG)
    recomputed = GPT(CFG)
    recomputed.load_state_dict(plain.state_dict())
    assert checkpoint_activations(recomputed) == 3 and checkpoint_activations(recomputed) == 3  # idempotent
    assert list(recomputed.state_dict()) == list(plain.state_dict())  # names, checkpoints, HF export unchanged
    x = torch.randint(0, 128, (4, 64))
    y = torch.randint(0, 128, (4, 64))
    want, kept = grads_and_saved_bytes(plain.train(), x, y)
    got, kept_ckpt = grads_and_saved_bytes(recomputed.train(), x, y)
    # The recomputation runs the same kernels on the same inputs with the same dropout masks; the tolerance only
    # allows for a backend that fuses the recomputed forward differently.
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # Without: every block's activations (tens of tensors each); with: one input per block, plus what the
    # embeddings, final LayerNorm and loss keep either way.
    assert kept_ckpt < 0.5 * kept




def test_training_flag_gives_the_same_run(tmp_path):
    torch.manual_seed(0)
    data = make_data()
    train(make_model(dropout=0.1), ListTask(data), cfg_for(tmp_path / "plain"), grad_accum_steps=2)
    train(make_model(dropout=0.1), ListTask(data), cfg_for(tmp_path / "ac", activation_checkpointing=True),
          grad_accum_steps=2)
    assert losses(tmp_path / "ac") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
