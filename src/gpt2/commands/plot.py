"""`gpt2 plot RUN_DIR`: draw a run's `metrics.jsonl` as a loss graph (PNG), by default RUN_DIR/loss.png.

The graph is `gpt2.plots.plot_run`'s, the one the training loop redraws at every evaluation; this command
draws it again by hand, say for a run still in progress on another machine or into another file (`--out`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpt2.commands import Command
from gpt2.config import arg
from gpt2.errors import UserError
from gpt2.plots import plot_run


@dataclass
class PlotConfig:
    run_dir: str = arg(None, help="training run directory holding metrics.jsonl", positional=True,
                       metavar="RUN_DIR")
    out: str | None = arg(None, help="PNG to write; none = RUN_DIR/loss.png")


def run(cfg: PlotConfig) -> Path:
    if not cfg.run_dir:
        raise UserError("give the run directory: gpt2 plot RUN_DIR")
    path = plot_run(cfg.run_dir, cfg.out)
    print(f"wrote {path}")
    return path


COMMAND = Command("plot", "draw a run's loss graph (train/val loss, LR, eval metrics) to PNG", PlotConfig, run)
