"""A model folder as users get it (a run's `model/`): what `transformers` loads as a whole, weights and tokenizer.

The model writes only what is its own, its config and weights (`save_pretrained`; a stage's model adds its head
beside them); the tokenizer files come from `gpt2.hf_tokenizer`. Joining the two here keeps the model free of
tokenizers while every exported folder still loads with `AutoTokenizer` and `pipeline("text-generation")`.
"""

from __future__ import annotations

import os
from typing import Protocol

from gpt2.hf_tokenizer import save_tokenizer_files
from gpt2.model import GPTConfig


class Exportable(Protocol):
    """A `GPT`, or a model built on one (`RewardModel`, `ActorCritic`): its config and its own files."""

    @property
    def config(self) -> GPTConfig: ...

    def save_pretrained(self, directory: str | os.PathLike) -> None: ...


def save_model_folder(model: Exportable, directory: str | os.PathLike) -> None:
    """Write `model`'s files and GPT-2's tokenizer files (its context window as their `model_max_length`) into
    `directory`; without the BPE files (offline, no cache) the weights are still written, with one warning."""
    model.save_pretrained(directory)
    save_tokenizer_files(directory, model.config.block_size)
