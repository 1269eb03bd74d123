"""The math of RLHF as pure tensor functions: nothing here knows about models, data or the training loop.

Design decisions:
- One token layout everywhere, the fine-tuning one: a row is prompt + answer, right-padded, and
  `targets[b, t]` is the token at `t + 1` when that token belongs to the answer, else -100. Position `t`
  is therefore the *state* (the model has read tokens 0..t) and `targets[b, t]` the *action* taken there.
  Log-probs, KL, rewards, values and advantages are all (B, T) tensors on that grid, with
  `mask = targets != -100` marking the answer (action) positions. Prompt and padding positions are zero.
- Sequence log-probs are *sums* over answer tokens (the DPO paper's log pi(y|x)), computed with
  `F.cross_entropy(..., reduction="none")` so that a (B, T, V) float copy of log-softmax is never kept.
- DPO (Rafailov et al. 2023), sigmoid form: loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).
  At policy == reference the argument is 0, so the loss is exactly ln 2. The "implicit rewards"
  beta * (pi - ref) give the logged margins and the preference accuracy.
- Reward model (Bradley-Terry): P(chosen > rejected) = sigmoid(r_c - r_r); loss = -log sigmoid(r_c - r_r).
- PPO (InstructGPT, Ouyang et al. 2022; the "N implementation details" of Huang et al.): per-token reward
  = -kl_coef * (logp_policy - logp_ref) at every answer token, plus the reward model's score at the last
  answer token; GAE(gamma, lambda) advantages, whitened over the batch; clipped policy ratio loss and
  clipped value loss, both averaged over answer tokens.
- GRPO (DeepSeekMath, Shao et al. 2024, as `gpt2.rlhf.grpo` chooses it): one scalar reward per sampled answer,
  the advantage of each of a prompt's G answers its reward minus the group's mean (optionally over the
  group's std), the same at every token of the answer; the clipped surrogate of PPO on it, plus an optional
  k3 estimate of KL(policy || reference) per token, both averaged over answer tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100  # target of a prompt or padding position (same as F.cross_entropy's ignore_index)


# ----------------------------------------------------------------------------- log-probs on the answer


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | tokens <= t) at answer positions, 0 at prompt/padding positions.

    logits: (B, T, V); targets: (B, T) with -100 where no token is scored. Returns float32 (B, T).
    """
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T), ignore_index=IGNORE,
                          reduction="none")  # (B*T,), exactly 0 at ignored positions
    return -nll.view(B, T)


def answer_logits(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 (N, V) next-token logits at the N positions where `mask` (B, T) is true, row by row. `model` is a
    GPT (or has its `hidden_states` and `logits`); the LM head runs on those positions only: with GPT-2's
    50257-token vocabulary the head over the prompt's positions would cost more than the rest of a small model
    and is never read."""
    return model.logits(model.hidden_states(input_ids)[mask]).float()


def picked_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(N, V) logits, (N,) tokens -> (N,) log-probs of those tokens."""
    return logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)


def spread(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) values at the N true positions of `mask` (B, T) -> (B, T), 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def answer_logprobs(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`token_logprobs` of `model` on (input_ids, targets), float32 (B, T), the LM head run on the answer
    positions only (`answer_logits`)."""
    mask = targets != IGNORE
    return spread(picked_logprobs(answer_logits(model, input_ids, mask), targets[mask]), mask)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of each row's answer tokens: (B, T, V), (B, T) -> (B,)."""
    return token_logprobs(logits, targets).sum(dim=1)


def last_token_index(targets: torch.Tensor) -> torch.Tensor:
    """(B, T) targets -> (B,) index of each row's last real token (its final answer token, usually
    `<|endoftext|>`): the last scored target position + 1. Reward and value heads read the hidden state
    there, which right padding cannot reach (attention is causal)."""
    T = targets.size(1)
    scored = (targets != IGNORE).long() * torch.arange(1, T + 1, device=targets.device)  # 1-based positions
    return scored.argmax(dim=1) + 1  # argmax finds the last scored position t (stored as t + 1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is true (a 0-dim tensor; 0 if the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact KL(policy || reference) of the next-token distributions, averaged over masked positions.
    (..., V), (..., V), (...) -> 0-dim. Used for logging how far a policy has moved."""
    logp = F.log_softmax(policy_logits.float(), dim=-1)
    logq = F.log_softmax(ref_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T)
    return masked_mean(kl, mask)


# ----------------------------------------------------------------------------- DPO and the reward model


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss from summed answer log-probs, each (B,). Returns (mean loss, metrics as 0-d
    tensors, so logging them never forces a device sync inside the step)."""
    chosen_reward = beta * (policy_chosen - ref_chosen)  # (B,) implicit rewards
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    margin = margin.detach()
    metrics = {
        "reward_chosen": chosen_reward.detach().mean(),
        "reward_rejected": rejected_reward.detach().mean(),
        "reward_margin": margin.mean(),
        "pref_acc": (margin > 0).float().mean(),
    }
    return loss, metrics


def bradley_terry_loss(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward-model loss -log sigmoid(r_c - r_r), from scores (B,). Returns (mean loss, metrics)."""
    margin = reward_chosen - reward_rejected
    loss = -F.logsigmoid(margin).mean()
    margin = margin.detach()
    return loss, {"reward_margin": margin.mean(), "pref_acc": (margin > 0).float().mean()}


# ----------------------------------------------------------------------------- PPO


def kl_penalized_rewards(score: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's per-token reward: -kl_coef * (logp - ref_logp) at each answer token, plus the
    sequence score at the row's last answer token.

    score: (B,); logp, ref_logp: (B, T) log-probs of the sampled tokens; mask: (B, T) answer positions
    (each row needs at least one). Returns (rewards, kl), both (B, T) and zero outside the mask.
    """
    mask = mask.to(logp.dtype)
    kl = (logp - ref_logp) * mask  # (B, T): sample estimate of the KL, token by token
    rewards = -kl_coef * kl
    T = mask.size(1)
    last = (mask * torch.arange(T, device=mask.device)).argmax(dim=1)  # (B,) last answer position
    rewards[torch.arange(mask.size(0), device=mask.device), last] += score.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's answer span.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, where the next value and
    the next advantage are 0 past the last answer token (the episode ends there). rewards, values, mask:
    (B, T). Returns (advantages, returns = advantages + values), both (B, T) and zero outside the mask.
    """
    mask = mask.to(values.dtype)
    B, T = values.shape
    advantages = torch.zeros_like(values)
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        cont = mask[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)  # 1 if the episode goes on
        delta = rewards[:, t] + gamma * next_value * cont - values[:, t]
        next_adv = (delta + gamma * lam * next_adv * cont) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to zero mean, unit variance over the masked positions (PPO advantage whitening)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over answer tokens of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)).
    All inputs (B, T); only `logp` carries gradient."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():  # 0-d tensors: logging them costs no device sync inside the step
        metrics = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask),  # KL(old || new), Schulman's k2
        }
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * mean over answer tokens of max((V - R)^2, (V_clipped - R)^2), where
    V_clipped stays within `clip` of the rollout-time value. All inputs (B, T)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        frac = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask).item()
    return loss, {"value_clip_frac": frac}


# ----------------------------------------------------------------------------- GRPO


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = False, eps: float = 1e-4,
                     ) -> torch.Tensor:
    """Each answer's reward minus the mean reward of its group, optionally divided by the group's standard
    deviation (Bessel-corrected, + eps). rewards: (P * G,), the G answers of a prompt next to each other.
    Returns (P * G,); a group whose answers all scored the same gets 0 (it carries no signal)."""
    groups = rewards.view(-1, group_size)  # (P, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) from the sampled tokens' log-probs, token by token:
    exp(ref - logp) - (ref - logp) - 1. Unbiased for tokens sampled from the policy, never negative, and 0
    where the two agree. Same shape as its inputs."""
    delta = ref_logp - logp
    return delta.exp() - delta - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip: float = 0.2, kl_coef: float = 0.0, ref_logp: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss, a mean over answer tokens of: the clipped surrogate (`ppo_policy_loss`) with each answer's
    advantage at every one of its tokens, plus kl_coef * k3(policy, reference) when `ref_logp` is given.
    logp (with gradient), old_logp, ref_logp, mask: (B, T); advantages: (B,). Returns (loss, metrics as 0-d
    tensors: policy_loss, clip_frac, approx_kl, and kl when `ref_logp` is given)."""
    per_token_adv = advantages[:, None].to(logp.dtype) * mask
    policy_loss, metrics = ppo_policy_loss(logp, old_logp, per_token_adv, mask, clip)
    metrics["policy_loss"] = policy_loss.detach()
    if ref_logp is None:
        return policy_loss, metrics
    kl = masked_mean(k3_kl(logp, ref_logp), mask)
    metrics["kl"] = kl.detach()
    return policy_loss + kl_coef * kl, metrics
