"""InstructGPT-style PPO against a reward model, with a per-token KL penalty to the reference: the rollout and
the Task of the shared loop (`gpt2 ppo`, in `gpt2.commands.ppo`, is its command).

One iteration:
  1. Rollout (no grad): sample an answer for each prompt with `gpt2.inference.generate` (KV cache), as GRPO
     does (`gpt2.rlhf.rollout`); an answer that stopped on `<|endoftext|>` keeps it as its last action.
     Prompt + answer rows use the fine-tuning layout, so every per-token tensor is (B, T) with `mask` on
     the answer tokens.
     Record the policy's log-probs and values, the reference's log-probs, and the reward model's score (the
     LM heads run on the answer positions only: `ActorCritic.answer_logprobs_values`, `answer_logprobs`).
  2. Rewards: -kl_coef * (logp - ref_logp) at every answer token, plus the score at the last one
     (`kl_penalized_rewards`). Advantages by GAE(gamma, lam), whitened over the batch; returns = A + V.
  3. Update: `ppo_epochs` passes over the rollout batch in shuffled minibatches, one optimizer update each,
     minimising the clipped policy loss + vf_coef * the clipped value loss, with gradient clipping.
Design decisions:
- The value function is a scalar head on the policy's own backbone (`ActorCritic`): one forward pass
  gives logits and values, and there is one model to shard, checkpoint and export. The policy alone is
  exported as a Hugging Face checkpoint; the value head is saved beside it.
- The reward is any function `(input_ids, targets) -> scores (B,)`; the command uses a `RewardModel`
  trained by `gpt2 reward`, the tests a known rule, so the algorithm is checked on its own.
- PPO runs on the shared loop (`gpt2.train.loop.train`) as a Task like every other stage: a loop step is
  one iteration, `step_batches()` makes a rollout and cuts it into the epochs x minibatches
  of optimizer updates (the loop's one extension for this). So resume, metrics, stop signals,
  `--max-minutes`, the NaN check before each optimizer step, evaluation (also at an early stop) and
  checkpoints are the loop's. The policy and value losses are means over answer tokens, weighted by their
  number across minibatches and ranks as every masked loss is (`loss_weight`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from gpt2.data.batching import LengthGroupedBatcher
from gpt2.distributed import all_reduce_mean
from gpt2.model import GPT
from gpt2.precision import autocast_context
from gpt2.rlhf.heads import ActorCritic
from gpt2.rlhf.losses import (
    answer_logprobs,
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from gpt2.rlhf.rollout import RolloutHyper, answer_batch, answer_stats, sample_answers
from gpt2.train.task import Task

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, targets) -> scores (B,)


@dataclass
class PPOHyper(RolloutHyper):
    """The algorithm's knobs (the command's config carries the same names)."""
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    minibatch_size: int = 8


@torch.no_grad()
def rollout(actor: ActorCritic, reference: GPT, reward_fn: RewardFn, prompts: list[list[int]], hp: PPOHyper,
            generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Sample answers and compute everything the update needs. Returns (batch of (B, T) tensors, metrics)."""
    device = next(actor.parameters()).device
    answers = sample_answers(actor.policy, prompts, hp.temperature, hp.max_new_tokens, generator)
    input_ids, targets = answer_batch(prompts, answers, device)
    mask = targets != -100  # (B, T) answer tokens = actions

    was_training = actor.training
    actor.eval()
    logp, values = actor.answer_logprobs_values(input_ids, targets)
    actor.train(was_training)
    ref_logp = answer_logprobs(reference, input_ids, targets)
    values = values * mask
    score = reward_fn(input_ids, targets).float()  # (B,)
    rewards, kl = kl_penalized_rewards(score, logp, ref_logp, mask, hp.kl_coef)
    advantages, returns = gae(rewards, values, mask, hp.gamma, hp.lam)
    batch = {"input_ids": input_ids, "targets": targets, "mask": mask, "logp": logp, "values": values,
             "advantages": whiten(advantages, mask), "returns": returns}
    metrics = {
        "score": score.mean().item(),
        "kl": kl.sum(1).mean().item(),  # per sequence, summed over its tokens
        "reward": rewards.sum(1).mean().item(),
        **answer_stats(answers),
    }
    return batch, metrics


class PPOTask(Task):
    """PPO as a Task of the shared loop (module docstring): a batch is a rollout, split into updates."""

    def __init__(self, actor: ActorCritic, reference: GPT, reward_fn: RewardFn, train_prompts: list[list[int]],
                 eval_prompts: list[list[int]], hp: PPOHyper, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | None = None, amp: torch.dtype | None = None):
        self.actor, self.reference, self.reward_fn, self.hp = actor, reference, reward_fn, hp
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device, self.amp = device or torch.device("cpu"), amp
        self.sampler = LengthGroupedBatcher([len(p) for p in train_prompts], batch_size, seed=seed, rank=rank,
                                            world_size=world_size)
        self.gen = torch.Generator(device=self.device).manual_seed(seed + rank)  # rollout sampling
        self.shuffle = torch.Generator().manual_seed(seed + rank)  # minibatch order

    def next_batch(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """A rollout of this rank's next prompts: (batch of (B, T) tensors, rollout metrics)."""
        prompts = [self.train_prompts[i] for i in self.sampler.next_batch()]
        with autocast_context(self.device, self.amp):
            return rollout(self.actor, self.reference, self.reward_fn, prompts, self.hp, generator=self.gen)

    def step_batches(self, grad_accum_steps: int) -> tuple[list[list[dict[str, torch.Tensor]]], dict[str, float]]:
        """A rollout, then `ppo_epochs` shuffled passes over it in minibatches: one optimizer update each (the
        loop's accumulation does not apply: a minibatch is one update)."""
        rolled, metrics = self.next_batch()
        B = rolled["input_ids"].size(0)
        steps = []
        for _ in range(self.hp.ppo_epochs):
            order = torch.randperm(B, generator=self.shuffle)
            for start in range(0, B, self.hp.minibatch_size):
                idx = order[start:start + self.hp.minibatch_size]
                steps.append([{k: v[idx.to(v.device)] for k, v in rolled.items()}])
        return steps, metrics

    def loss(self, model: nn.Module, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Clipped policy loss + vf_coef * clipped value loss, both means over the minibatch's answer tokens."""
        logp, values = model.answer_logprobs_values(mb["input_ids"], mb["targets"])
        policy_loss, pm = ppo_policy_loss(logp, mb["logp"], mb["advantages"], mb["mask"], self.hp.clip)
        value_loss, vm = ppo_value_loss(values, mb["values"], mb["returns"], mb["mask"], self.hp.value_clip)
        loss = policy_loss + self.hp.vf_coef * value_loss
        return loss, {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), **pm, **vm}

    def loss_weight(self, mb: dict[str, torch.Tensor]) -> int:
        return int(mb["mask"].sum())

    def num_tokens(self, mb: dict[str, torch.Tensor]) -> int:
        return mb["input_ids"].numel()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean reward-model score and KL of greedy-free (seeded) answers to the held-out prompts."""
        if not self.eval_prompts:
            return {}
        mine = self.eval_prompts[self.rank::self.world_size] or self.eval_prompts[:1]
        _, m = rollout(self.actor, self.reference, self.reward_fn, mine, self.hp,
                       generator=torch.Generator(device=self.device).manual_seed(self.seed))
        score, kl = all_reduce_mean(torch.tensor([m["score"], m["kl"]], device=self.device)).tolist()
        return {"score": score, "kl": kl}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "gen": self.gen.get_state(), "shuffle": self.shuffle.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.gen.set_state(state["gen"])
        self.shuffle.set_state(state["shuffle"])
