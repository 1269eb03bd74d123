"""The `gpt2 ppo` command; the work is `gpt2.rlhf.ppo`."""

from gpt2.commands import Command
from gpt2.rlhf.ppo import PPOConfig, run

COMMAND = Command("ppo", "InstructGPT-style PPO of a fine-tuned policy against a reward model", PPOConfig, run)
