"""Pretraining's Task: next-token prediction on token shards, for the shared loop (`gpt2 pretrain`, in
`gpt2.commands.pretrain`, is its command).

Design decisions:
- On CPU the loss is `gpt2.losses.gpt_loss_chunked` (same values and gradients as `GPT.loss`,
  without materialising the (B*T, 50257) logits), which is most of the CPU speed-up in bench/train.py.
- The task is thin: a rank-aware `ShardLoader` on the train split gives micro batches and its position
  (resume), its windows in a seeded random order by default (`--no-shuffle`: stream order; see
  `gpt2.data.loader` for why windows rather than blocks); evaluation is `gpt2.evaluate.val_loss` over a
  *fresh* val loader (in order) on a fixed token budget (the same tokens every time, shared out between
  ranks, averaged with an all-reduce) and optionally HellaSwag.
- Gradient accumulation follows from the batch in tokens (`grad_accum_steps`) and must divide exactly.
"""

from __future__ import annotations

from typing import Protocol

import torch

from gpt2.data.loader import ShardLoader, checked_batch
from gpt2.data.shards import list_shards
from gpt2.distributed import DistInfo, all_reduce_mean
from gpt2.errors import UserError
from gpt2.evaluate import hellaswag_eval, load_hellaswag
from gpt2.evaluate import val_loss as mean_loss_over
from gpt2.losses import gpt_loss_chunked
from gpt2.model import GPT
from gpt2.train.task import Task


class PretrainSettings(Protocol):
    """What the task reads of its run's config (`gpt2 pretrain`'s `PretrainConfig` is one)."""

    data: str
    micro_batch: int
    seq_len: int
    shuffle: bool
    seed: int
    val_tokens: int
    vocab_size: int
    fused_loss: bool | None
    eval_every: int
    hellaswag: bool
    hellaswag_source: str | None
    hellaswag_limit: int | None


def grad_accum_steps(global_batch: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that micro_batch x seq_len x world_size x steps == global_batch."""
    per_step = micro_batch * seq_len * world_size
    if min(global_batch, micro_batch, seq_len, world_size) < 1:
        raise UserError("--global-batch, --micro-batch and --seq-len must be >= 1")
    if global_batch % per_step:
        raise UserError(f"--global-batch {global_batch} is not a multiple of --micro-batch {micro_batch} x "
                        f"--seq-len {seq_len} x {world_size} process(es) = {per_step} tokens; choose e.g. "
                        f"--global-batch {max(1, global_batch // per_step) * per_step}")
    return global_batch // per_step


class PretrainTask(Task):
    """Next-token prediction on shards: train batches from a rank-aware ShardLoader, val loss on a fixed
    budget of val tokens, optionally HellaSwag."""

    def __init__(self, cfg: PretrainSettings, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.fused_loss = cfg.fused_loss if cfg.fused_loss is not None else dist.device.type == "cpu"
        self.loader = ShardLoader(cfg.data, "train", cfg.micro_batch, cfg.seq_len, dist.rank, dist.world_size,
                                  shuffle=cfg.shuffle, seed=cfg.seed)
        self.has_val = bool(list_shards(cfg.data, "val"))
        if not self.has_val and cfg.eval_every and dist.is_main:
            print(f"note: {cfg.data} has no val shards; no validation loss will be measured", flush=True)
        self.hellaswag = None
        if cfg.hellaswag:
            self.hellaswag = load_hellaswag(cfg.hellaswag_source, "val", limit=cfg.hellaswag_limit)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return checked_batch(self.loader, self.cfg.vocab_size)

    def loss(self, model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        x, y = batch
        return (gpt_loss_chunked(model, x, y) if self.fused_loss else model.loss(x, y)), {}

    def evaluate(self, model: GPT) -> dict[str, float]:
        results = {}
        if self.has_val:
            results["val_loss"] = self.val_loss(model)
        if self.hellaswag:
            hs = hellaswag_eval(model, self.hellaswag, rank=self.dist.rank, world_size=self.dist.world_size,
                                batch_size=max(1, self.cfg.micro_batch // 4))
            results["hellaswag_acc"] = hs["acc_norm"]
        return results

    def val_loader(self):
        """(a fresh val loader, the number of its batches one evaluation reads). Fresh and in order: every
        evaluation sees the same val tokens, split between the ranks; --val-tokens of them, at most one pass.
        Its batch is --micro-batch rows, or as many as the val split holds per rank when that is fewer (a
        small val split, such as tinyshakespeare's 33 windows of 1024 at micro batch 64, is then still
        measured instead of stopping the run at its first evaluation)."""
        cfg, dist = self.cfg, self.dist
        probe = ShardLoader(cfg.data, "val", 1, cfg.seq_len, dist.rank, dist.world_size)  # raises if < 1 window
        rows = min(cfg.micro_batch, probe.num_windows // dist.world_size)
        loader = ShardLoader(cfg.data, "val", rows, cfg.seq_len, dist.rank, dist.world_size) if rows > 1 else probe
        steps = max(1, min(cfg.val_tokens // (loader.window * dist.world_size), loader.steps_per_epoch))
        return loader, steps

    def val_loss(self, model: GPT) -> float:
        """The mean loss over this evaluation's val tokens (`val_loader`), averaged over the ranks."""
        loader, steps = self.val_loader()
        loss = mean_loss_over(model, (checked_batch(loader, self.cfg.vocab_size) for _ in range(steps)))
        return all_reduce_mean(torch.tensor(loss, dtype=torch.float64, device=self.dist.device)).item()

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
