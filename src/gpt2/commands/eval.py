"""The `gpt2 eval hellaswag` and `gpt2 eval val-loss` commands; the work is `gpt2.evaluate`."""

from gpt2.commands import Command
from gpt2.evaluate import HellaSwagConfig, ValLossConfig, run_hellaswag, run_val_loss

COMMANDS = [
    Command("eval hellaswag", "HellaSwag accuracy (completion-style scoring, acc and acc_norm)",
            HellaSwagConfig, run_hellaswag),
    Command("eval val-loss", "mean next-token loss of a model on token shards", ValLossConfig,
            run_val_loss),
]
