"""The `gpt2 pretrain` command; the work is `gpt2.train.pretrain`."""

from gpt2.commands import Command
from gpt2.train.pretrain import PRETRAIN_PRESETS, PretrainConfig, run

COMMAND = Command("pretrain", "pretrain GPT-2 on token shards (one process or torchrun)", PretrainConfig, run,
                  presets=PRETRAIN_PRESETS)
