"""The `gpt2 dpo` command; the work is `gpt2.rlhf.dpo`."""

from gpt2.commands import Command
from gpt2.rlhf.dpo import DPOConfig, run

COMMAND = Command("dpo", "align a fine-tuned model to preference pairs with DPO", DPOConfig, run)
