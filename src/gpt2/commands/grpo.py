"""`gpt2 grpo`: GRPO of a fine-tuned policy on a task with a verifiable reward (`gpt2.rlhf.tasks`).

    gpt2 grpo --model runs/finetune --task arithmetic --out runs/grpo

Each step samples `--samples-per-prompt` answers to each of `--prompts-per-step` training questions of the task
(rendered with the fine-tuning template), scores them with the task's exact scorer, and updates the policy on
the group-relative advantages; a "step" of the shared loop's flags is one such rollout and its updates. The
reference for `--kl-coef` is a frozen copy of the starting policy, made only when the coefficient is above 0.
The algorithm and each of its choices are `gpt2.rlhf.grpo`'s (`GRPOTask` on the shared loop).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields

from gpt2.checkpoint import load_model
from gpt2.commands import Command
from gpt2.config import arg
from gpt2.distributed import destroy_distributed, init_distributed
from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.precision import autocast_dtype
from gpt2.rlhf.grpo import GRPOHyper, GRPOTask
from gpt2.rlhf.rollout import RolloutConfig
from gpt2.rlhf.tasks import TASKS, get_task, prompt_ids
from gpt2.train.loop import train


@dataclass
class GRPOConfig(RolloutConfig):
    """The shared loop's flags (a "step" is one rollout of groups and its updates) plus GRPO's."""

    stage = "GRPO"
    out: str = arg("runs/grpo", "run directory: checkpoint.pt, model/ (HF export of the policy), metrics.jsonl, "
                                "loss.png")
    task: str = arg("arithmetic", f"the task whose questions and exact scorer train the policy: "
                                  f"{', '.join(sorted(TASKS))}")
    source: str | None = arg(None, "a local copy of a downloaded task's data (gsm8k: a file or the hub's folder "
                                   "layout) instead of the Hugging Face Hub")
    max_steps: int = arg(100, "GRPO steps (one rollout and its updates each; the LR schedule ends here)")
    prompts_per_step: int = arg(16, "questions per step over all processes (a multiple of their number)",
                                minimum=1)
    samples_per_prompt: int = arg(8, "answers sampled per question (a group); advantages are relative to the "
                                     "group's mean reward", minimum=2,
                                  hint="a group of one answer has no baseline, so its advantage is always 0")
    micro_batch: int = arg(16, "answers per forward pass (memory); the step's loss is the same however it is cut",
                           minimum=1)
    max_new_tokens: int | None = arg(None, "longest sampled answer in tokens, also at evaluation; default: the "
                                           "task's", minimum=1)
    kl_coef: float = arg(0.0, "weight of the per-token k3 KL penalty to the starting policy; 0 = none (no "
                              "reference model is kept)", minimum=0)
    clip: float = arg(0.2, "policy ratio clip range (acts only with --updates-per-rollout above 1)", minimum=0)
    updates_per_rollout: int = arg(1, "optimizer updates on each rollout (TRL's num_iterations): above 1 the "
                                      "later ones are off-policy and the clip bounds them", minimum=1)
    scale_rewards: bool = arg(False, "divide each advantage by its group's reward std (DeepSeekMath's and TRL's "
                                     "default); off: reward minus the group's mean only (nanochat, Dr. GRPO)")
    eval_questions: int = arg(100, "test questions answered greedily (with --max-new-tokens) at each evaluation",
                              minimum=0)

    def validate(self) -> None:
        super().validate()
        if self.temperature == 0:
            raise UserError("--temperature 0 samples every answer of a group alike, so no advantage is ever "
                            "non-zero: GRPO needs a temperature above 0")


def run(cfg: GRPOConfig) -> GPT:
    """Load the task and the policy (and, for a KL term, its frozen copy); train GRPO's Task on the shared loop."""
    cfg.validate()
    task = get_task(cfg.task, cfg.source)
    dist = init_distributed(cfg.device, cfg.dist_timeout)
    try:
        if cfg.prompts_per_step % dist.world_size:
            raise UserError(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the {dist.world_size} "
                            "processes (each samples an equal share)")
        device = dist.device
        policy = load_model(cfg.model, reads_text="--model")
        reference = copy.deepcopy(policy).eval().requires_grad_(False).to(device) if cfg.kl_coef > 0 else None
        train_questions = task.questions("train")
        if not train_questions:
            raise UserError(f"--task {cfg.task}: its train split has no question")
        evals = task.questions("test")[: cfg.eval_questions] if cfg.eval_questions else []
        hp = GRPOHyper(**{f.name: getattr(cfg, f.name) for f in fields(GRPOHyper)})
        hp.max_new_tokens = cfg.max_new_tokens or task.max_new_tokens
        prompts = prompt_ids(policy, train_questions, hp.max_new_tokens)
        prompt_ids(policy, evals, hp.max_new_tokens)  # refused now rather than at the first evaluation
        grpo = GRPOTask(policy, reference, task, train_questions, prompts, evals, hp, cfg.prompts_per_step,
                        seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, device=device,
                        amp=autocast_dtype(cfg.dtype, device, training=True))
        if dist.is_main:
            print(f"{cfg.task}: {len(train_questions)} training questions ({len(evals)} for evaluation); "
                  f"{cfg.max_steps} steps of {cfg.prompts_per_step} questions x {cfg.samples_per_prompt} answers of "
                  f"up to {hp.max_new_tokens} tokens", flush=True)
        train(policy, grpo, cfg, 1, dist=dist, run_config=cfg, command=COMMAND.name)
        return policy
    finally:
        destroy_distributed()


COMMAND = Command("grpo", "GRPO of a fine-tuned policy on a task with a verifiable reward", GRPOConfig, run)
