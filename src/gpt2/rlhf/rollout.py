"""What PPO and GRPO share of a rollout: sampling answers through `gpt2.inference.generate` (the one decoding
engine, the code `gpt2 generate` runs), turning prompt + answer into the fine-tuning layout, the log-probs of
the answer tokens, and the statistics of the answers.

Design decisions:
- An answer that stopped on `<|endoftext|>` keeps it as its last action (`complete`): `generate` drops it, but
  the policy chose it and must be credited or blamed for it.
- Rows use the fine-tuning layout (`gpt2.data.batching.collate`): `targets[b, t]` is the answer token at
  `t + 1`, -100 elsewhere, so every per-token tensor of the RL math is (B, T) with `targets != -100` the mask.
- `answer_logprobs` runs the LM head on the answer positions only: with GPT-2's 50257-token vocabulary the
  head over the prompt's positions would cost more than the rest of the model and is never read.
"""

from __future__ import annotations

import torch

from gpt2.data.batching import collate
from gpt2.inference import generate
from gpt2.losses import IGNORE_INDEX
from gpt2.model import GPT
from gpt2.padding import pad_right
from gpt2.tokenizer import EOT


def complete(prompt: list[int], answer: list[int], max_new_tokens: int, block_size: int) -> list[int]:
    """`generate` drops the final `<|endoftext|>`; put it back when that is why the answer stopped (it is
    an action the policy took and must be credited), i.e. when neither the token budget nor the context
    window ended it."""
    if len(answer) < max_new_tokens and len(prompt) + len(answer) < block_size:
        return answer + [EOT]
    return answer


def sample_answers(policy: GPT, prompts: list[list[int]], temperature: float, max_new_tokens: int,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """One sampled answer per prompt, through `generate`, each with its ending `<|endoftext|>` (`complete`)."""
    ids, masks = pad_right(prompts)
    answers = generate(policy, ids, masks, temperature, max_new_tokens, generator=generator)
    block = policy.config.block_size
    return [complete(p, a, max_new_tokens, block) for p, a in zip(prompts, answers)]


def answer_batch(prompts: list[list[int]], answers: list[list[int]], device: torch.device | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), both (B, T), in the fine-tuning layout, on `device`."""
    input_ids, targets = collate(list(zip(prompts, answers)))
    return input_ids.to(device), targets.to(device)


def answer_logprobs(model: GPT, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | tokens <= t) at answer positions, 0 elsewhere: float32 (B, T), the LM head run on
    the answer positions only (module docstring)."""
    mask = targets != IGNORE_INDEX
    hidden = model.hidden_states(input_ids)[mask]  # (N, C): the answer positions, row by row
    logits = model.logits(hidden).float()  # (N, V)
    picked = logits.gather(1, targets[mask][:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)
    return torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)


def answer_stats(targets: torch.Tensor) -> dict[str, float]:
    """Mean answer length in tokens (its `<|endoftext|>` included) and the share of answers that ended with
    `<|endoftext|>` (the others ran out of tokens or context)."""
    mask = targets != IGNORE_INDEX
    ended = [bool(row[m][-1] == EOT) for row, m in zip(targets, mask)]
    return {"answer_len": mask.sum(1).float().mean().item(), "ended": sum(ended) / len(ended)}
