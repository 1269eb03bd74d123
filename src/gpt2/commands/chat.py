"""The `gpt2 chat` command; the work is `gpt2.serve.chat`."""

from gpt2.commands import Command
from gpt2.serve.chat import ChatConfig, run

COMMAND = Command("chat", "chat with a model in the terminal (the fine-tuning template, streamed answers)",
                  ChatConfig, run)
