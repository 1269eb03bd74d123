"""The `gpt2 prepare alpaca` command; the work is `gpt2.data.alpaca`."""

from gpt2.commands import Command
from gpt2.data.alpaca import PrepareAlpacaConfig, prepare

COMMAND = Command("prepare alpaca", "validate, tokenize and split Stanford Alpaca for fine-tuning",
                  PrepareAlpacaConfig, prepare)
