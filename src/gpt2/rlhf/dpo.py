"""Direct Preference Optimization: the pair task of a policy against a frozen reference copy (`gpt2 dpo`, in
`gpt2.commands.dpo`, is its command).

Design decisions:
- The reference is a frozen copy of the policy's starting weights, so training starts at loss ln 2.
- Loss: sigmoid DPO on summed answer log-probs (`gpt2.rlhf.losses.dpo_loss`), beta 0.1 by default.
  Chosen and rejected rows go through one forward pass (`collate_pairs`), and the reference's forward is
  under `no_grad`.
- Logged per step: loss, the implicit rewards beta * (log pi - log ref) of chosen and rejected answers and
  their margin, preference accuracy (margin > 0), and the exact per-token KL(policy || reference) on
  the answer positions of the batch. Evaluated on the held-out pairs (once an epoch by default): the same
  quantities, with the loss as `val_loss` and the held-out preference accuracy as `pref_acc`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gpt2.model import GPT
from gpt2.rlhf.losses import dpo_loss, sequence_logprobs, token_kl
from gpt2.rlhf.pairs import PairTask


class DPOTask(PairTask):
    """The loop's Task for DPO: `model` is the policy (or its DDP wrapper)."""

    def __init__(self, reference: GPT, beta: float, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference.eval().requires_grad_(False)
        self.beta = beta

    def pair_loss(self, model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if next(self.reference.parameters()).device != input_ids.device:
            self.reference.to(input_ids.device)
        logits = model(input_ids)  # (2B, T, V): chosen rows, then rejected rows
        with torch.no_grad():
            ref_logits = self.reference(input_ids)
        logp, ref_logp = sequence_logprobs(logits, targets), sequence_logprobs(ref_logits, targets)  # (2B,)
        B = input_ids.size(0) // 2
        loss, metrics = dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], self.beta)
        with torch.no_grad():
            metrics["kl"] = token_kl(logits.detach(), ref_logits, targets != -100)
        return loss, metrics
