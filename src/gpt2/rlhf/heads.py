"""Scalar heads on a GPT backbone: the reward model (one score per sequence) and PPO's actor-critic
(next-token logits plus one value per position).

Design decisions:
- A head is a single `nn.Linear(n_embd, 1)` on `GPT.hidden_states` (the final LayerNorm output), the
  InstructGPT / "N implementation details of RLHF" recipe, initialised with std 1 / sqrt(n_embd + 1).
- The reward is read at each row's last real token (`last_token_index`: the answer's `<|endoftext|>`).
  Rows are right-padded and attention is causal, so padding never reaches that position.
- A reward model may instead score an answer by its summed log-probability under the backbone's own LM head
  (`score="likelihood"`, no scalar head): a generative reward model, the form of DPO's implicit reward without
  the reference. It starts where the fine-tuned model's own judgement is (on a task the model half knows, its
  likelihood already ranks most right answers above wrong ones, which a fresh scalar head must learn from the
  pairs alone) and the Bradley-Terry loss trains the whole LM. Its bias: a longer answer has more log-probs to
  sum, so it suits answers of similar length (a task's), not open-ended chat. The mode is saved in
  `reward_model.json` beside the weights (`{"score": ...}`; a folder without it is a scalar-head one).
- Files: the backbone is saved with `GPT.save_pretrained` (a Hugging Face GPT-2 checkpoint that
  `transformers` loads as is; its LM head is the tied embedding) and the head beside it as
  `reward_head.safetensors` / `value_head.safetensors` with tensors `weight` (1, n_embd) and `bias` (1,).
  So a reward-model folder is also a loadable language model, and `RewardModel.from_pretrained(dir)`
  gets both parts back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from gpt2.errors import UserError
from gpt2.io import load_safetensors, save_safetensors, write_text_atomic
from gpt2.model import GPT
from gpt2.rlhf.losses import IGNORE, answer_logprobs, last_token_index, picked_logprobs, spread

REWARD_HEAD = "reward_head.safetensors"
REWARD_CONFIG = "reward_model.json"
SCORES = ("head", "likelihood")
VALUE_HEAD = "value_head.safetensors"


def scalar_head(n_embd: int) -> nn.Linear:
    head = nn.Linear(n_embd, 1)
    nn.init.normal_(head.weight, std=1 / (n_embd + 1) ** 0.5)
    nn.init.zeros_(head.bias)
    return head


def save_head(head: nn.Linear, path: Path) -> None:
    save_safetensors({"weight": head.weight, "bias": head.bias}, path)  # atomic, with a sha256


def load_head(head: nn.Linear, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path} not found: not a folder saved by `gpt2 reward` / `gpt2 ppo`")
    sd = load_safetensors(path)  # a corrupted file is a UserError naming it
    if set(sd) != {"weight", "bias"} or sd["weight"].shape != head.weight.shape:
        raise UserError(f"{path}: expected weight {tuple(head.weight.shape)} and bias, got "
                        f"{ {k: tuple(v.shape) for k, v in sd.items()} }")
    head.load_state_dict(sd)


class RewardModel(nn.Module):
    """GPT backbone + a score per row: `model(input_ids, targets) -> scores (B,)`, rows in the fine-tuning
    layout. `score="head"`: a scalar head on the last real token; `"likelihood"`: the answer's summed log-prob
    under the backbone's LM head (module docstring)."""

    def __init__(self, backbone: GPT, score: str = "head"):
        super().__init__()
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self.backbone, self.score = backbone, score
        self.head = scalar_head(backbone.config.n_embd) if score == "head" else None

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """input_ids, targets (B, T) right-padded, targets -100 outside the answer -> float32 scores (B,)."""
        if self.head is None:
            return answer_logprobs(self.backbone, input_ids, targets).sum(1)
        h = self.backbone.hidden_states(input_ids)  # (B, T, C)
        h_last = h[torch.arange(h.size(0), device=h.device), last_token_index(targets)]  # (B, C)
        return self.head(h_last).squeeze(-1).float()  # (B,)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.backbone.save_pretrained(directory)
        write_text_atomic(Path(directory) / REWARD_CONFIG, json.dumps({"score": self.score}) + "\n")
        if self.head is not None:
            save_head(self.head, Path(directory) / REWARD_HEAD)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> RewardModel:
        path = Path(directory)
        if any((path / "model" / name).is_file() for name in (REWARD_CONFIG, REWARD_HEAD)):
            path = path / "model"  # a run dir works too
        model = cls(GPT.from_pretrained(path), saved_score(path))
        if model.head is not None:
            load_head(model.head, path / REWARD_HEAD)
        return model


def saved_score(path: Path) -> str:
    """The score mode of the reward-model folder `path` (`reward_model.json`; "head" where there is none)."""
    file = path / REWARD_CONFIG
    if not file.is_file():
        return "head"
    text = file.read_text(errors="replace")
    try:
        score = json.loads(text).get("score")
    except (ValueError, AttributeError):
        score = None
    if score not in SCORES:
        raise UserError(f"{file}: expected {{\"score\": one of {', '.join(SCORES)}}}, got {text[:80]!r}")
    return score


class ActorCritic(nn.Module):
    """PPO's policy with a value head sharing its backbone: `model(input_ids) -> (logits, values)`."""

    def __init__(self, policy: GPT):
        super().__init__()
        self.policy = policy
        self.value_head = scalar_head(policy.config.n_embd)

    @property
    def config(self):
        return self.policy.config

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) -> logits (B, T, vocab_size), values (B, T)."""
        h = self.policy.hidden_states(input_ids)  # (B, T, C)
        logits = self.policy.lm_head(h)[..., : self.policy.config.vocab_size]
        return logits, self.value_head(h).squeeze(-1).float()

    def answer_logprobs_values(self, input_ids: torch.Tensor, targets: torch.Tensor,
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) rows in the fine-tuning layout -> the answer tokens' log-probs (B, T), 0 elsewhere, and the
        values (B, T), from one pass of the backbone; the LM head runs on the answer positions only."""
        h = self.policy.hidden_states(input_ids)  # (B, T, C)
        mask = targets != IGNORE
        logits = self.policy.logits(h[mask]).float()  # (N, V)
        return spread(picked_logprobs(logits, targets[mask]), mask), self.value_head(h).squeeze(-1).float()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The policy as a Hugging Face checkpoint, the value head beside it."""
        self.policy.save_pretrained(directory)
        save_head(self.value_head, Path(directory) / VALUE_HEAD)
