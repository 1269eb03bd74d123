"""`gpt2 reward`: train a reward model on preference pairs with the Bradley-Terry loss.

    gpt2 reward --model runs/finetune --data data/hh --out runs/reward

The model is `gpt2.rlhf.heads.RewardModel` (the GPT backbone, initialised from the SFT checkpoint, plus a
scalar head; or, `--score likelihood`, scoring by the backbone's own answer log-probs); the loss and what is
logged are `gpt2.rlhf.reward.RewardTask`'s. It is saved as a Hugging Face GPT-2 folder (the backbone) plus
`reward_model.json` (the score mode) and, with a head, `reward_head.safetensors`: what `gpt2 ppo --reward-model
RUN_DIR` reads. The flags shared with `gpt2 dpo` and the setup (`run_pair_stage`) are `gpt2.rlhf.pairs`'.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt2.commands import Command
from gpt2.config import arg
from gpt2.rlhf.heads import SCORES, RewardModel
from gpt2.rlhf.pairs import PairStageConfig, run_pair_stage
from gpt2.rlhf.reward import RewardTask


@dataclass
class RewardConfig(PairStageConfig):
    out: str = arg("runs/reward", "run directory: checkpoint.pt, model/ (HF backbone + reward_head.safetensors), "
                                  "metrics.jsonl, loss.png")
    lr: float = arg(1e-5, "peak learning rate (reached after warmup)")
    score: str = arg("head", "what scores an answer: head = a scalar head on its last token; likelihood = its "
                             "summed log-prob under the model's own LM head (no head; suits answers of similar "
                             "length)", choices=list(SCORES))


def run(cfg: RewardConfig) -> RewardModel:
    def make_task(start, train_pairs, val_pairs, dist) -> RewardTask:
        return RewardTask(train_pairs, val_pairs, cfg.batch_size, seed=cfg.seed, rank=dist.rank,
                          world_size=dist.world_size)

    return run_pair_stage(cfg, COMMAND.name, lambda start: RewardModel(start, cfg.score), make_task)


COMMAND = Command("reward", "train a reward model (GPT + scalar head) on preference pairs", RewardConfig, run)
