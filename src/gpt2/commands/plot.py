"""The `gpt2 plot` command; the work is `gpt2.plots`."""

from gpt2.commands import Command
from gpt2.plots import PlotConfig, run

COMMAND = Command("plot", "draw a run's loss graph (train/val loss, LR, eval metrics) to PNG", PlotConfig, run)
