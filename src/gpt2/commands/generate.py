"""The `gpt2 generate` command; the work is `gpt2.generate`."""

from gpt2.commands import Command
from gpt2.generate import GenerateConfig, run

COMMAND = Command("generate", "sample continuations of prompts from a model", GenerateConfig, run)
