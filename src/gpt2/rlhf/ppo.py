"""`gpt2 ppo`: InstructGPT-style PPO against a reward model, with a per-token KL penalty to the reference.

One iteration:
  1. Rollout (no grad): sample an answer for each prompt with `gpt2.inference.generate` (KV cache); an
     answer that stopped on `<|endoftext|>` keeps it as its last action. Prompt + answer rows use the
     fine-tuning layout, so every per-token tensor is (B, T) with `mask` on the answer tokens.
     Record the policy's log-probs and values, the reference's log-probs, and the reward model's score.
  2. Rewards: -kl_coef * (logp - ref_logp) at every answer token, plus the score at the last one
     (`kl_penalized_rewards`). Advantages by GAE(gamma, lam), whitened over the batch; returns = A + V.
  3. Update: `ppo_epochs` passes over the rollout batch in shuffled minibatches, minimising the clipped
     policy loss + vf_coef * the clipped value loss, with gradient clipping.
Design decisions:
- The value function is a scalar head on the policy's own backbone (`ActorCritic`): one forward pass
  gives logits and values, and there is one model to shard, checkpoint and export. The policy alone is
  exported as a Hugging Face checkpoint; the value head is saved beside it.
- The reward is any function `(input_ids, targets) -> scores (B,)`; the command uses a `RewardModel`
  trained by `gpt2 reward`, the tests a known rule, so the algorithm is checked on its own.
- PPO alternates generation and optimisation, which the step-driven shared loop does not do, so it has
  this small outer loop built from the loop's pieces (optimizer, LR schedule, checkpoints, metrics,
  progress bar, plots) rather than a second copy of them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from gpt2.data.alpaca import collate
from gpt2.inference import generate, pad_right
from gpt2.model import GPT
from gpt2.rlhf.heads import ActorCritic
from gpt2.rlhf.losses import (
    gae,
    kl_penalized_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
    whiten,
)
from gpt2.tokenizer import EOT

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, targets) -> scores (B,)


@dataclass
class PPOHyper:
    """The algorithm's knobs (the command's config carries the same names)."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    minibatch_size: int = 8
    grad_clip: float = 1.0


def complete(prompt: list[int], answer: list[int], max_new_tokens: int, block_size: int) -> list[int]:
    """`generate` drops the final `<|endoftext|>`; put it back when that is why the answer stopped (it is
    an action the policy took and must be credited), i.e. when neither the token budget nor the context
    window ended it."""
    if len(answer) < max_new_tokens and len(prompt) + len(answer) < block_size:
        return answer + [EOT]
    return answer


@torch.no_grad()
def rollout(actor: ActorCritic, reference: GPT, reward_fn: RewardFn, prompts: list[list[int]], hp: PPOHyper,
            generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Sample answers and compute everything the update needs. Returns (batch of (B, T) tensors, metrics)."""
    device = next(actor.parameters()).device
    ids, masks = pad_right(prompts)
    answers = generate(actor.policy, ids, masks, hp.temperature, hp.max_new_tokens, generator=generator)
    block = actor.policy.config.block_size
    input_ids, targets = collate([(p, complete(p, a, hp.max_new_tokens, block)) for p, a in zip(prompts, answers)])
    input_ids, targets = input_ids.to(device), targets.to(device)
    mask = targets != -100  # (B, T) answer tokens = actions

    was_training = actor.training
    actor.eval()
    logits, values = actor(input_ids)
    actor.train(was_training)
    logp = token_logprobs(logits, targets)
    ref_logp = token_logprobs(reference(input_ids), targets)
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
        "answer_len": mask.sum(1).float().mean().item(),
        "ended": sum(bool(row[row != -100][-1] == EOT) for row in targets) / len(prompts),  # stopped by EOT
    }
    return batch, metrics


def ppo_update(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], hp: PPOHyper,
               generator: torch.Generator | None = None) -> dict[str, float]:
    """`ppo_epochs` passes of clipped-loss minibatch steps over one rollout batch. `model` is the
    ActorCritic (or its DDP wrapper). Returns metrics averaged over the minibatch steps."""
    B = batch["input_ids"].size(0)
    totals: dict[str, float] = defaultdict(float)
    steps = 0
    model.train()
    for _ in range(hp.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, hp.minibatch_size):
            mb = {k: v[order[start:start + hp.minibatch_size].to(v.device)] for k, v in batch.items()}
            logits, values = model(mb["input_ids"])
            logp = token_logprobs(logits, mb["targets"])
            policy_loss, pm = ppo_policy_loss(logp, mb["logp"], mb["advantages"], mb["mask"], hp.clip)
            value_loss, vm = ppo_value_loss(values, mb["values"], mb["returns"], mb["mask"], hp.value_clip)
            loss = policy_loss + hp.vf_coef * value_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
            optimizer.step()
            step_metrics = {"loss": loss.item(), "policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                            "grad_norm": grad_norm.item(), **pm, **vm}
            for k, v in step_metrics.items():
                totals[k] += v
            steps += 1
    return {k: v / steps for k, v in totals.items()}
