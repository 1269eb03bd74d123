"""The `gpt2 prepare hh` command; the work is `gpt2.data.preferences`."""

from gpt2.commands import Command
from gpt2.data.preferences import PrepareHHConfig, prepare

COMMAND = Command("prepare hh", "Anthropic HH-RLHF pairs -> prompt/chosen/rejected token ids",
                  PrepareHHConfig, prepare)
