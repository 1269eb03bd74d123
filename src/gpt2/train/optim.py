"""The optimizer and the learning-rate schedule of every stage.

- AdamW with weight decay on 2-D weights only (matmuls and embeddings; never biases or LayerNorm gains), fused
  kernels where PyTorch has them (one kernel for all parameters).
- LR: linear warmup then cosine decay to min_lr (`lr_at`, a pure function of the step, so resuming never needs
  scheduler state).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gpt2.train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based optimizer step `step`: linear warmup to cfg.lr over warmup_steps, then cosine
    decay to min_lr at max_steps (and min_lr after it)."""
    min_lr = cfg.lr * 0.1 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - min_lr)



def apply_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Set every param group to the schedule's LR for `step` (0-based); return it."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr

def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW decaying only 2-D weights; fused kernels on CUDA and CPU (one kernel for all parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, fused=fused)
