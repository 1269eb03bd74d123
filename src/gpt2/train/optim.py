"""The optimizer and the learning-rate schedule of every stage.

- AdamW (the default, the seed's recipe) with weight decay on 2-D weights only (matmuls and embeddings; never
  biases or LayerNorm gains), fused kernels where PyTorch has them (one kernel for all parameters).
- Muon (`--optimizer muon`, `torch.optim.Muon`, as modded-nanogpt's GPT-2 speedrun uses it): the momentum of each
  2-D weight inside the transformer blocks is orthogonalised (Newton-Schulz) before the step. The embeddings,
  the tied head, biases and LayerNorm gains stay on AdamW: Muon is for hidden matrices only. Each of the two has
  its own peak LR and weight decay (`--muon-lr`, `--muon-weight-decay`; `--lr`, `--weight-decay` for AdamW),
  both on the same schedule shape. They step as one `CombinedOptimizer`, so the loop, the gradient scaler and
  checkpoints see one optimizer. Not with FSDP: Newton-Schulz needs each whole matrix, FSDP holds shards.
- LR: linear warmup then cosine decay to min_lr (`lr_at`, a pure function of the step, so resuming never needs
  scheduler state); a Muon group follows the same curve scaled to its own peak.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gpt2.errors import UserError
from gpt2.train.config import TrainConfig
from gpt2.train.parallel import blocks

OPTIMIZERS = ["adamw", "muon"]


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
    """Set every param group to the schedule's LR for `step` (0-based): AdamW's groups to `lr_at`, Muon's to the
    same fraction of --muon-lr. Returns AdamW's."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * cfg.muon_lr / cfg.lr if group.get("muon") else lr
    return lr


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device, sharded: bool = False,
                    scaled: bool = False):
    """The optimizer of --optimizer (module docstring). Sharded (FSDP) with float16 loss scaling (`scaled`),
    AdamW runs unfused: the fused kernel takes the sharded gradient scaler's inf flag in a shape it refuses
    (torch 2.13)."""
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = []
    if cfg.optimizer == "muon":
        if sharded:
            raise UserError("--optimizer muon needs each weight matrix whole, and --parallel fsdp shards them: "
                            "use --parallel ddp with Muon, or AdamW with FSDP")
        in_blocks = {id(p) for b in blocks(model) for p in b.parameters()}
        hidden = [p for p in params if p.dim() == 2 and id(p) in in_blocks]
    chosen = {id(p) for p in hidden}
    fused = device.type in ("cuda", "cpu") and not (sharded and scaled)
    adamw = adamw_for([p for p in params if id(p) not in chosen], cfg, fused)
    if not hidden:
        return adamw
    muon = torch.optim.Muon([{"params": hidden, "muon": True}], lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                            momentum=cfg.muon_momentum)
    return CombinedOptimizer(adamw, muon)


def adamw_for(params: list[nn.Parameter], cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW decaying only 2-D weights; fused kernels on CUDA and CPU (one kernel for all parameters)."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-8, fused=fused)


class CombinedOptimizer:
    """Several optimizers stepped as one: the loop, `torch.amp.GradScaler` (which unscales every group of
    `param_groups`) and checkpoints (one state dict holding each one's) see a single optimizer."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self, closure=None) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise UserError("--resume: the checkpoint's optimizer state is not this --optimizer's")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)
