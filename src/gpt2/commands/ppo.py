"""`gpt2 ppo`: InstructGPT-style PPO of a fine-tuned policy against a reward model trained by `gpt2 reward`.

    gpt2 ppo --model runs/finetune --reward-model runs/reward --data data/hh --out runs/ppo  # or --prompts FILE

The prompts are the unique prompts of a `gpt2 prepare hh` folder (its val split for evaluation), or the lines
of a text file rendered with the fine-tuning template; each must leave room in the context for
`--max-new-tokens`. The reference is a frozen copy of the starting policy, the reward is the `RewardModel`'s
score at each answer's last token, and a "step" of the shared loop's flags is one PPO iteration (a rollout
batch and its update). The algorithm is `gpt2.rlhf.ppo` (`PPOTask` on the shared loop).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path

from gpt2.checkpoint import check_ids_fit, check_vocab, load_model
from gpt2.commands import Command
from gpt2.config import arg, flag_name
from gpt2.data.preferences import highest_token_id, load_pairs, split_file
from gpt2.data.sources import text_lines
from gpt2.distributed import destroy_distributed, init_distributed
from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.precision import autocast_dtype
from gpt2.rlhf.heads import ActorCritic, RewardModel
from gpt2.rlhf.ppo import PPOHyper, PPOTask
from gpt2.rlhf.rollout import RolloutConfig
from gpt2.template import format_prompt
from gpt2.tokenizer import encode
from gpt2.train.loop import train
from gpt2.train.runtime import seed_everything


@dataclass
class PPOConfig(RolloutConfig):
    """The shared loop's flags (a "step" is one PPO iteration: a rollout batch and its update) plus PPO's."""

    stage = "PPO"
    out: str = arg("runs/ppo", "run directory: checkpoint.pt, model/ (HF policy + value_head.safetensors), "
                               "metrics.jsonl, loss.png")
    reward_model: str = arg("runs/reward", "reward model folder written by `gpt2 reward` (its run folder works)")
    data: str = arg("data/hh", "prompts from this `gpt2 prepare hh` folder (train.jsonl; val.jsonl for eval)")
    prompts: str | None = arg(None, "instead of --data: a text file with one question per line, rendered with "
                                    "the fine-tuning template (the first --eval-prompts are also the eval set)")
    max_steps: int = arg(100, "PPO iterations (one rollout batch and its update each; the LR schedule ends here)")
    batch_size: int = arg(16, "prompts rolled out per iteration per process", minimum=1)
    minibatch_size: int = arg(8, "rollouts per optimizer step within an iteration", minimum=1)
    ppo_epochs: int = arg(4, "passes over each rollout batch", minimum=1)
    kl_coef: float = arg(0.05, "per-token KL penalty to the reference (InstructGPT's beta)", minimum=0)
    gamma: float = arg(1.0, "discount of GAE")
    lam: float = arg(0.95, "lambda of GAE")
    value_clip: float = arg(0.2, "value clip range around the rollout-time value", minimum=0)
    vf_coef: float = arg(0.1, "weight of the value loss", minimum=0)
    eval_prompts: int = arg(32, "held-out prompts scored at each evaluation", minimum=0)

    def validate(self) -> None:
        super().validate()
        for flag in ("gamma", "lam"):
            if not 0 <= getattr(self, flag) <= 1:
                raise UserError(f"{flag_name(flag)} must be in [0, 1] (got {getattr(self, flag)})")


def load_prompts(cfg: PPOConfig, max_prompt_len: int, policy: GPT) -> tuple[list[list[int]], list[list[int]]]:
    """(training prompts, evaluation prompts) as token ids, each at most `max_prompt_len` tokens; prepared pairs
    with ids past `policy`'s vocabulary are refused in one line naming the file."""
    if cfg.prompts is not None:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise UserError(f"--prompts {path}: no such file")
        lines = [line.strip() for _, line in text_lines(path) if line.strip()]  # bad bytes name their line
        train = [encode(format_prompt(line)) for line in lines]
        evals = train[: cfg.eval_prompts]
    else:
        def unique_prompts(split: str) -> list[list[int]]:
            file = split_file(cfg.data, split)
            pairs = load_pairs(file) if split == "train" or file.is_file() else []
            check_ids_fit(policy, highest_token_id(pairs), f"--model {cfg.model}", str(file))
            return [list(p) for p in dict.fromkeys(tuple(pair["prompt"]) for pair in pairs)]

        train, evals = unique_prompts("train"), unique_prompts("val")[: cfg.eval_prompts]
    train = [p for p in train if 0 < len(p) <= max_prompt_len]
    evals = [p for p in evals if 0 < len(p) <= max_prompt_len]
    if not train:
        raise UserError(f"no prompt of at most {max_prompt_len} tokens in {cfg.prompts or cfg.data} (the context "
                        f"must also hold --max-new-tokens {cfg.max_new_tokens})")
    return train, evals


def run(cfg: PPOConfig) -> ActorCritic:
    """Load the policy, reference and reward model, and train PPO's Task on the shared loop."""
    cfg.validate()
    dist = init_distributed(cfg.device, cfg.dist_timeout)
    try:
        device = dist.device
        policy = load_model(cfg.model, reads_text="--model" if cfg.prompts is not None else None)
        reference = copy.deepcopy(policy).eval().requires_grad_(False).to(device)
        scorer = RewardModel.from_pretrained(cfg.reward_model).eval().requires_grad_(False).to(device)
        check_vocab(scorer, policy.config.vocab_size, f"--reward-model {cfg.reward_model}", f"--model {cfg.model}")
        context = min(policy.config.block_size, scorer.config.block_size)
        train_prompts, eval_prompts = load_prompts(cfg, context - cfg.max_new_tokens - 1, policy)
        seed_everything(cfg.seed)  # the value head's initial weights (DDP broadcasts rank 0's anyway)
        actor = ActorCritic(policy).to(device)

        hp = PPOHyper(**{f.name: getattr(cfg, f.name) for f in fields(PPOHyper)})
        task = PPOTask(actor, reference, scorer, train_prompts, eval_prompts, hp, cfg.batch_size,
                       seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, device=device,
                       amp=autocast_dtype(cfg.dtype, device, training=True))
        if dist.is_main:
            print(f"{len(train_prompts)} prompts ({len(eval_prompts)} for evaluation); {cfg.max_steps} iterations "
                  f"of {cfg.batch_size * dist.world_size} rollouts", flush=True)
        train(actor, task, cfg, 1, dist=dist, run_config=cfg, command=COMMAND.name)
        return actor
    finally:
        destroy_distributed()


COMMAND = Command("ppo", "InstructGPT-style PPO of a fine-tuned policy against a reward model", PPOConfig, run)
