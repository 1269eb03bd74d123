"""What the trainer applies to a model from outside, so the model itself stays pure: activation checkpointing
(`checkpoint_activations`) and FSDP2 sharding (`shard_model`; DDP is the trainer's default wrapper).

Activation checkpointing keeps only each block's input for backward and recomputes the block's activations there
(`torch.utils.checkpoint`, non-reentrant: it works with torch.compile, keyword arguments and blocks whose inputs
need no grad). The RNG state is replayed, so dropout draws the same mask twice and the gradients are the ones of
the run without it. It is applied per instance (the block's `forward` attribute), so parameter names, the
checkpoint format and the Hugging Face export do not change.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
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


# ----------------------------------------------------------------------------- data parallelism

PARALLEL = ["ddp", "fsdp"]


def shard_model(root: nn.Module, amp: torch.dtype | None, device: torch.device) -> None:
    """FSDP2 (`fully_shard`): each block is its own unit, gathered for its forward and backward and freed after;
    the root unit holds the rest (embeddings with the tied head, the final LayerNorm, a task's heads). Parameters
    stay fp32 and sharded; on a GPU with autocast they are gathered in the autocast dtype and gradients reduced
    in fp32.

    `root` is the module the trainer calls (the task's loss around the model), not the model: FSDP gathers the
    root unit's parameters in a hook on the root's `__call__`, so every method a loss calls on the model
    (`hidden_states` for the fused loss and the RLHF heads, the tied head's weight) then sees whole tensors. The
    root keeps them gathered from its forward to the end of backward (`reshard_after_forward=False`, FSDP's own
    choice for a root, stated here because the losses rely on it). Its output is the loss, never a view of a
    parameter's product, so FSDP's pre-backward hook always holds."""
    mp = MixedPrecisionPolicy()
    if device.type == "cuda" and amp is not None:
        mp = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    for block in blocks(root):
        fully_shard(block, mp_policy=mp)
    fully_shard(root, mp_policy=mp, reshard_after_forward=False)


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP shards `module` or a module inside it."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def gradient_sync(root: nn.Module, ddp: nn.Module | None, sync: bool) -> AbstractContextManager:
    """Reduce gradients over ranks in this backward only when `sync` (the update's last micro batch). `root`:
    the module the trainer calls (FSDP's root unit when sharded)."""
    if isinstance(root, FSDPModule):
        root.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync or ddp is None else ddp.no_sync()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state for a checkpoint. Sharded: gathered whole to rank 0's memory (a collective: every
    rank calls it; the others get empty dicts), the optimizer state keyed by parameter name."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    return full_model_state(model), get_optimizer_state_dict(model, optimizer, options=_FULL)


def full_model_state(model: nn.Module) -> dict:
    """The model's whole weights (sharded: gathered to rank 0's host memory, a collective; others get {})."""
    return get_model_state_dict(model, options=_FULL) if is_sharded(model) else model.state_dict()


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict,
                    ) -> None:
    """The inverse of `full_state`: every rank passes the whole checkpoint and keeps its shard."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def local_tensor_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds of `t` (its shard, for a sharded parameter)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the whole value of a replicated DTensor (FSDP's gradient norm), else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t
