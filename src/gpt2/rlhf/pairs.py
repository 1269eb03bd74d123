"""A training-loop task over preference pairs, shared by DPO and the reward model.

Design decisions:
- A batch is `collate_pairs(pairs)`: 2B rows in the fine-tuning layout, the B chosen answers first, then
  the B rejected ones, so one forward pass scores both sides of every pair.
- Batches come from the fine-tuning `LengthGroupedBatcher` (rank-aware, resumable, little padding), with a
  pair's length taken as prompt + its longer answer.
- A stage only says how a batch becomes a loss (`pair_loss`); training steps and held-out evaluation both
  go through it, so the logged training and validation metrics are the same quantities.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

from gpt2.data.alpaca import LengthGroupedBatcher
from gpt2.data.preferences import Pair, collate_pairs


def pair_length(pair: Pair) -> int:
    return len(pair["prompt"]) + max(len(pair["chosen"]), len(pair["rejected"]))


class PairTask:
    """Implements the loop's Task protocol; subclasses define `pair_loss(model, input_ids, targets)`."""

    def __init__(self, train_pairs: list[Pair], val_pairs: list[Pair], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, eval_batch_size: int | None = None):
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.batcher = LengthGroupedBatcher([pair_length(p) for p in train_pairs], batch_size, seed=seed,
                                            rank=rank, world_size=world_size)
        self.eval_batch_size = eval_batch_size or batch_size
        self.rank, self.world_size = rank, world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.batcher.batches_per_epoch

    def pair_loss(self, model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # ---- the Task protocol

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return collate_pairs([self.train_pairs[i] for i in self.batcher.next_batch()])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        device = next(model.parameters()).device
        input_ids, targets = (t.to(device, non_blocking=True) for t in batch)
        return self.pair_loss(model, input_ids, targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean metrics over this rank's share of the held-out pairs, weighted by pairs; the loss is
        reported as `val_loss`. (Ranks see disjoint shares; the loop averages across ranks.)"""
        mine = self.val_pairs[self.rank::self.world_size]
        if not mine:
            return {}
        was_training = model.training
        model.eval()
        totals: dict[str, float] = defaultdict(float)
        try:
            for start in range(0, len(mine), self.eval_batch_size):
                chunk = mine[start:start + self.eval_batch_size]
                loss, metrics = self.loss(model, collate_pairs(chunk))
                for k, v in {"val_loss": loss.item(), **metrics}.items():
                    totals[k] += v * len(chunk)
        finally:
            model.train(was_training)
        return {k: v / len(mine) for k, v in totals.items()}

    def state_dict(self) -> dict:
        return {"batcher": self.batcher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state["batcher"])
