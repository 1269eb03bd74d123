"""Direct Preference Optimization: the pair task of a policy against a frozen reference copy (`gpt2 dpo`, in
`gpt2.commands.dpo`, is its command).

Design decisions:
- The reference is a frozen copy of the policy's starting weights, so training starts at loss ln 2.
- Loss: sigmoid DPO on summed answer log-probs (`gpt2.rlhf.losses.dpo_loss`), beta 0.1 by default; the LM
  head of both models runs on the answer positions only (`answer_logits`).
  `nll_coef` > 0 adds that weight times the chosen answers' per-token negative log-likelihood: RPO (Pang et al.
  2024, "Iterative Reasoning Preference Optimization"; TRL's `rpo_alpha`). Pure DPO only asks that the chosen
  answer gain on the rejected one, and on pairs that differ in a token or two both usually lose likelihood
  (the chosen less), which can leave the greedy answer worse; the NLL term holds the chosen answers up.
  0 by default: plain DPO.
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
from gpt2.rlhf.losses import IGNORE, answer_logits, dpo_loss, picked_logprobs, spread, token_kl
from gpt2.rlhf.pairs import PairTask


class DPOTask(PairTask):
    """The loop's Task for DPO: `model` is the policy (or its DDP wrapper)."""

    def __init__(self, reference: GPT, beta: float, *args, nll_coef: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference.eval().requires_grad_(False)
        self.beta, self.nll_coef = beta, nll_coef

    def pair_loss(self, model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if next(self.reference.parameters()).device != input_ids.device:
            self.reference.to(input_ids.device)
        mask = targets != IGNORE
        logits = answer_logits(model, input_ids, mask)  # (N, V) at the answer positions: chosen rows, then rejected
        with torch.no_grad():
            ref_logits = answer_logits(self.reference, input_ids, mask)
        tokens = targets[mask]
        logp = spread(picked_logprobs(logits, tokens), mask).sum(1)  # (2B,) summed answer log-probs
        ref_logp = spread(picked_logprobs(ref_logits, tokens), mask).sum(1)
        B = input_ids.size(0) // 2
        loss, metrics = dpo_loss(logp[:B], logp[B:], ref_logp[:B], ref_logp[B:], self.beta)
        if self.nll_coef > 0:
            nll = -logp[:B].sum() / mask[:B].sum().clamp(min=1)  # per chosen answer token
            loss = loss + self.nll_coef * nll
            metrics["nll"] = nll.detach()
        with torch.no_grad():
            metrics["kl"] = token_kl(logits.detach(), ref_logits, torch.ones_like(tokens, dtype=torch.bool))
        return loss, metrics
