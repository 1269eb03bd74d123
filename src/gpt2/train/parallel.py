"""What the trainer applies to a model from outside, so the model itself stays pure: activation checkpointing
(`checkpoint_activations`) and the data-parallel wrapper.

Activation checkpointing keeps only each block's input for backward and recomputes the block's activations there
(`torch.utils.checkpoint`, non-reentrant: it works with torch.compile, keyword arguments and blocks whose inputs
need no grad). The RNG state is replayed, so dropout draws the same mask twice and the gradients are the ones of
the run without it. It is applied per instance (the block's `forward` attribute), so parameter names, the
checkpoint format and the Hugging Face export do not change.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from gpt2.model import Block


class _Recomputed:
    """A block's forward run under `checkpoint`: its activations are recomputed in backward."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of a model (a GPT, or a head around a GPT backbone)."""
    return [m for m in model.modules() if isinstance(m, Block)]


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute every transformer block's activations in backward; returns how many blocks. Idempotent."""
    found = blocks(model)
    for block in found:
        if not isinstance(block.__dict__.get("forward"), _Recomputed):
            block.forward = _Recomputed(block.forward)
    return len(found)
