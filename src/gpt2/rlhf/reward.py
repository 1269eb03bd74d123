"""Reward modelling: the pair task of a reward model trained with the Bradley-Terry loss (`gpt2 reward`, in
`gpt2.commands.reward`, is its command).

Design decisions:
- The model is `RewardModel` (`gpt2.rlhf.heads`): the GPT backbone, initialised from the SFT checkpoint,
  plus a scalar head read at each answer's last real token (its `<|endoftext|>`), or with `score="likelihood"`
  the answer's summed log-prob under the backbone's own LM head.
- Loss: -log sigmoid(r_chosen - r_rejected), with chosen and rejected rows scored in one forward pass.
  Logged: loss, mean margin, and pairwise accuracy (r_chosen > r_rejected); evaluation reports the
  held-out pairwise accuracy as `pref_acc`.
- Saved as a Hugging Face GPT-2 folder (the backbone; `transformers` loads it) plus
  `reward_head.safetensors` (weight (1, n_embd), bias (1,)); `RewardModel.from_pretrained(RUN_DIR)`
  loads both, and that is what `gpt2 ppo --reward-model RUN_DIR` reads.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt2.rlhf.losses import bradley_terry_loss
from gpt2.rlhf.pairs import PairTask


class RewardTask(PairTask):
    """The loop's Task for reward modelling: `model` is a RewardModel (or its DDP wrapper)."""

    def pair_loss(self, model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = model(input_ids, targets)  # (2B,)
        B = input_ids.size(0) // 2
        loss, metrics = bradley_terry_loss(scores[:B], scores[B:])
        metrics["reward_chosen"] = scores[:B].detach().mean()
        return loss, metrics
