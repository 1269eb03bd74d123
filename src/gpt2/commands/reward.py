"""The `gpt2 reward` command; the work is `gpt2.rlhf.reward`."""

from gpt2.commands import Command
from gpt2.rlhf.reward import RewardConfig, run

COMMAND = Command("reward", "train a reward model (GPT + scalar head) on preference pairs", RewardConfig, run)
