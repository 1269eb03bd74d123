"""What PPO and GRPO share of a rollout: sampling answers through `gpt2.inference.generate` (the one decoding
engine, the code `gpt2 generate` runs), turning prompt + answer into the fine-tuning layout, and the statistics
of the answers; and the knobs and flags of a stage that samples its own training data (`RolloutHyper`,
`RolloutConfig`, the base of `gpt2 ppo`'s and `gpt2 grpo`'s configs).

Design decisions:
- An answer that stopped on `<|endoftext|>` keeps it as its last action (`complete`): `generate` drops it, but
  the policy chose it and must be credited or blamed for it.
- Rows use the fine-tuning layout (`gpt2.data.batching.collate`): `targets[b, t]` is the answer token at
  `t + 1`, -100 elsewhere, so every per-token tensor of the RL math is (B, T) with `targets != -100` the mask.
- Every stage's log-probs of the answer tokens run the LM head on the answer positions only
  (`gpt2.rlhf.losses.answer_logprobs`).
- A rollout stage's defaults differ from pretraining's: a small LR (the policy starts fine-tuned), no weight
  decay, frequent evaluation, and no torch.compile (every rollout has other shapes). FSDP is refused: each
  rank samples from the policy's whole weights, which FSDP keeps in shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gpt2.config import arg, check_sampling
from gpt2.data.batching import collate
from gpt2.decode import Decoder
from gpt2.errors import UserError
from gpt2.inference import generate
from gpt2.model import GPT
from gpt2.padding import pad_right
from gpt2.rlhf.tasks import as_text
from gpt2.tokenizer import EOT
from gpt2.train.config import TrainConfig


@dataclass
class RolloutHyper:
    """The sampling and policy-loss knobs of a rollout stage (its command's config carries the same names)."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    kl_coef: float = 0.0
    clip: float = 0.2


@dataclass
class RolloutConfig(TrainConfig):
    """The shared loop's flags with a rollout stage's defaults (a "step" is one rollout and its updates), plus
    the starting policy and the sampling flags. Subclasses set `stage` (its name in messages)."""

    stage: ClassVar[str] = "a rollout stage"
    model: str = arg("runs/finetune", "starting policy (the SFT model): a run folder, an HF folder or a hub name")
    max_new_tokens: int = arg(64, "longest sampled answer in tokens", minimum=1)
    temperature: float = arg(1.0, "sampling temperature of the rollouts")
    clip: float = arg(0.2, "policy ratio clip range", minimum=0)
    lr: float = arg(1e-5, "peak learning rate (reached after warmup)")
    warmup_steps: int = arg(5, "steps (rollouts) of linear LR warmup")
    weight_decay: float = arg(0.0, "AdamW weight decay, on 2-D weights only")
    eval_every: int = arg(10, "evaluate every N steps (rollouts) and at the end; 0 = never")
    save_every: int = arg(50, "checkpoint every N steps (rollouts); 0 = only at the end")
    compile: bool | None = arg(False, "torch.compile the training forward (off by default here: rollout shapes change "
                                      "every step, so a compiled forward would recompile)")

    def validate(self) -> None:
        super().validate()
        check_sampling(self.temperature, None, None)
        if self.parallel == "fsdp":
            raise UserError(f"--parallel fsdp: {self.stage} samples its rollouts on each rank, from the policy's "
                            "whole weights, which FSDP keeps in shards; use --parallel ddp")


def complete(prompt: list[int], answer: list[int], max_new_tokens: int, block_size: int) -> list[int]:
    """`generate` drops the final `<|endoftext|>`; put it back when that is why the answer stopped (it is
    an action the policy took and must be credited), i.e. when neither the token budget nor the context
    window ended it."""
    if len(answer) < max_new_tokens and len(prompt) + len(answer) < block_size:
        return answer + [EOT]
    return answer


def sample_answers(policy: GPT, prompts: list[list[int]], temperature: float, max_new_tokens: int,
                   generator: torch.Generator | None = None, decoder: Decoder | None = None) -> list[list[int]]:
    """One sampled answer per prompt, through `generate`, each with its ending `<|endoftext|>` (`complete`).
    `decoder`: a `Decoder(policy)` made after the last weight update, to share between the calls of one rollout
    (default: `generate` makes one per call)."""
    ids, masks = pad_right(prompts)
    answers = generate(policy, ids, masks, temperature, max_new_tokens, generator=generator, decoder=decoder)
    block = policy.config.block_size
    return [complete(p, a, max_new_tokens, block) for p, a in zip(prompts, answers)]


def answer_text(answer: list[int]) -> str:
    """An answer's text as a scorer reads it: its tokens without the ending `<|endoftext|>`, decoded as
    evaluation decodes them (`gpt2.rlhf.tasks.as_text`)."""
    return as_text(answer[:-1] if answer and answer[-1] == EOT else answer)


def answer_batch(prompts: list[list[int]], answers: list[list[int]], device: torch.device | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), both (B, T), in the fine-tuning layout, on `device` (None: on the host)."""
    input_ids, targets = collate(list(zip(prompts, answers)))
    return (input_ids, targets) if device is None else (input_ids.to(device), targets.to(device))


def answer_stats(answers: list[list[int]]) -> dict[str, float]:
    """Mean answer length in tokens (its `<|endoftext|>` included) and the share of answers that ended with
    `<|endoftext|>` (the others ran out of tokens or context). `answers` as `sample_answers` gives them."""
    return {"answer_len": sum(map(len, answers)) / len(answers),
            "ended": sum(bool(a) and a[-1] == EOT for a in answers) / len(answers)}
