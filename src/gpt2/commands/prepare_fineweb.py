"""The `gpt2 prepare fineweb` command; the work is `gpt2.data.fineweb`."""

from gpt2.commands import Command
from gpt2.data.fineweb import PrepareFinewebConfig, run

COMMAND = Command("prepare fineweb", "tokenize FineWeb (or local text) into uint16 shards for pretraining",
                  PrepareFinewebConfig, run)
