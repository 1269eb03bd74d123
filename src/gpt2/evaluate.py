"""Evaluation: validation loss and HellaSwag accuracy, as library functions and `gpt2 eval ...` commands.

Design decisions:
- `val_loss` takes any iterable of (x, y) batches, so the training loop (a `ShardLoader` on the val split,
  a fixed number of batches), `gpt2 eval val-loss` and tests share one function. It never knows about data
  files or DDP: averaging across ranks is the caller's job (`gpt2.distributed.all_reduce_mean`).
- The mean is token-weighted (each batch's mean loss times its number of non-ignored targets), so batches
  with -100 targets or a short last batch count for exactly the tokens they hold.
- The model is put in eval mode (no dropout) for the duration and its previous mode restored afterwards,
  since the loop calls this in the middle of training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

IGNORE_INDEX = -100


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (`.module`) and/or `torch.compile` (`._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def autocast(device: torch.device, dtype: torch.dtype | None):
    """`torch.autocast` for `dtype` on `device`, or a no-op when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def val_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None) -> float:
    """Token-weighted mean cross-entropy of `model` over `batches` of (x, y) LongTensors [B, T].

    `device` defaults to the model's; batches are moved there. `autocast_dtype` (e.g. torch.bfloat16)
    runs the forward under autocast; the loss itself is always computed in float32.
    """
    core = unwrap(model)
    device = torch.device(device) if device is not None else next(core.parameters()).device
    was_training = core.training
    core.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            n = int((y != IGNORE_INDEX).sum())
            if n == 0:
                continue
            with autocast(device, autocast_dtype):
                loss = core.loss(x, y)
            total += loss.double() * n
            count += n
    finally:
        core.train(was_training)
    if count == 0:
        raise ValueError("val_loss: no batches (or only ignored targets) to evaluate")
    return float(total) / count
