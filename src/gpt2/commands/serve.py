"""The `gpt2 serve` command; the work is `gpt2.serve.server`."""

from gpt2.commands import Command
from gpt2.serve.server import ServeConfig, run

COMMAND = Command("serve", "OpenAI-compatible HTTP server with continuous batching and a web chat page",
                  ServeConfig, run)
