"""The `gpt2 finetune` command; the work is `gpt2.train.finetune`."""

from gpt2.commands import Command
from gpt2.train.finetune import PRESETS, FinetuneConfig, run

COMMAND = Command("finetune", "instruction-tune a pretrained GPT-2 on Alpaca (before/after answers in samples.md)",
                  FinetuneConfig, run, presets=PRESETS)
