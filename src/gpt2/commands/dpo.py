"""`gpt2 dpo`: Direct Preference Optimization of a fine-tuned policy against a frozen reference copy.

    gpt2 dpo --model runs/finetune --data data/hh --out runs/dpo

The policy starts from the SFT checkpoint (`gpt2.checkpoint.load_model`: a run folder, an HF folder or a
hub name) and the reference is a frozen copy of the same weights, so training starts at loss ln 2; the loss
and what is logged are `gpt2.rlhf.dpo.DPOTask`'s. The flags shared with `gpt2 reward` and the setup
(`run_pair_stage`: the run's length, evaluation once an epoch) are `gpt2.rlhf.pairs`'.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn as nn

from gpt2.commands import Command
from gpt2.config import arg
from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.rlhf.dpo import DPOTask
from gpt2.rlhf.pairs import PairStageConfig, run_pair_stage


@dataclass
class DPOConfig(PairStageConfig):
    out: str = arg("runs/dpo", "run directory: checkpoint.pt, model/ (HF export), metrics.jsonl, loss.png")
    beta: float = arg(0.1, "DPO beta: strength of the implicit KL constraint to the reference")
    nll_coef: float = arg(0.0, "weight of the chosen answers' per-token NLL added to the DPO loss (RPO, TRL's "
                               "rpo_alpha); 0 = plain DPO", minimum=0)

    def validate(self) -> None:
        super().validate()
        if not self.beta > 0:
            raise UserError(f"--beta must be > 0 (got {self.beta}): at 0 the DPO loss is ln 2 whatever the policy "
                            "does, so nothing would be trained")


def run(cfg: DPOConfig) -> nn.Module:
    def make_task(start: GPT, train_pairs, val_pairs, dist) -> DPOTask:
        return DPOTask(copy.deepcopy(start), cfg.beta, train_pairs, val_pairs, cfg.batch_size, seed=cfg.seed,
                       rank=dist.rank, world_size=dist.world_size, nll_coef=cfg.nll_coef)

    return run_pair_stage(cfg, COMMAND.name, lambda start: start, make_task)


COMMAND = Command("dpo", "align a fine-tuned model to preference pairs with DPO", DPOConfig, run)
