"""What a stage plugs into the training loop: a `Task` gives this rank's micro batches, their loss, an evaluation
and its own data position; the loop (`gpt2.train.loop`) does the rest the same way for every stage.

Batches may be any nest of tuples/lists/dicts of tensors on the CPU; the loop moves them to the device. The
methods below `loss` have defaults that fit a stage whose micro batches all weigh the same (pretraining): a
stage overrides only what it changes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from gpt2.train.runtime import first_tensor

Step = tuple[list[list[Any]], dict[str, float]]  # (updates, each a list of micro batches; the batch's metrics)


class Task:
    def next_batch(self) -> Any:
        """This rank's next micro batch."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """(scalar loss to minimise, extra metrics as floats or 0-d tensors). Called inside autocast; `model`
        is the plain module (the loop compiles/wraps around this call, so gradients sync under DDP)."""
        raise NotImplementedError

    def loss_weight(self, batch: Any) -> int | None:
        """What the batch's loss is a mean over (valid targets, pairs), for the loop's global-count weighting;
        None (the default): every micro batch weighs the same, right when all hold equally many targets."""
        return None

    def num_tokens(self, batch: Any) -> int:
        """Tokens of a micro batch, for tokens/s and MFU (default: the element count of its first tensor)."""
        return first_tensor(batch).numel()

    def step_batches(self, grad_accum_steps: int) -> Step:
        """One optimizer step's batches, fetched on the host before its first backward (the loss weights need
        every micro batch's count first). Default: one update of `grad_accum_steps` micro batches. PPO makes
        several updates from one rollout."""
        return [[self.next_batch() for _ in range(grad_accum_steps)]], {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Evaluation metrics (e.g. {"val_loss": ...}); {} by default. Called on every rank under no_grad,
        autocast and model.eval(); return the same values on every rank (all-reduce if you shard)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position, for exact resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`."""
