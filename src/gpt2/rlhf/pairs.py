"""A training-loop task over preference pairs, shared by DPO and the reward model.

Design decisions:
- A batch is `collate_pairs(pairs)`: 2B rows in the fine-tuning layout, the B chosen answers first, then
  the B rejected ones, so one forward pass scores both sides of every pair.
- Batches come from the fine-tuning `LengthGroupedBatcher` (rank-aware, resumable, little padding), with a
  pair's length taken as prompt + its longer answer.
- A stage's loss is a mean over the batch's pairs and `loss_weight` is their number, so a step averages
  over every pair of the global batch (a short last batch of a length group weighs less).
- A stage only says how a batch becomes a loss (`pair_loss`); training steps and held-out evaluation both
  go through it, so the logged training and validation metrics are the same quantities.
- The two pair stages share their flags (`PairStageConfig`: the shared loop's `TrainConfig` plus model,
  data, batch size, epochs) and their setup (`run_pair_stage`): the run's length follows the rule of
  every command (`gpt2.train.loop.run_length`: `--max-steps` when given, else `--epochs` x steps per
  epoch), and evaluation on the held-out pairs defaults to once an epoch. Both live here, with the task,
  rather than in a command module: they are the common base of two commands (`gpt2.commands.dpo` and
  `gpt2.commands.reward` each subclass the config and pass their model and task to the setup), and a
  command module never imports another.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from gpt2.checkpoint import check_ids_fit, load_model
from gpt2.config import arg
from gpt2.data.batching import LengthGroupedBatcher
from gpt2.data.preferences import Pair, collate_pairs, highest_token_id, load_pairs, pair_length, split_file
from gpt2.distributed import DistInfo, all_gather_object, destroy_distributed, init_distributed
from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.train.config import EPOCHS_HELP, MAX_STEPS_HELP, TrainConfig, run_length
from gpt2.train.loop import train
from gpt2.train.task import Task


class PairTask(Task):
    """The loop's Task over preference pairs; subclasses define `pair_loss(model, input_ids, targets)`."""

    def __init__(self, train_pairs: list[Pair], val_pairs: list[Pair], batch_size: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, eval_batch_size: int | None = None):
        self.train_pairs, self.val_pairs = train_pairs, val_pairs
        self.batcher = LengthGroupedBatcher([pair_length(p) for p in train_pairs], batch_size, seed=seed,
                                            rank=rank, world_size=world_size)
        self.eval_batch_size = eval_batch_size or batch_size
        self.rank, self.world_size = rank, world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.batcher.batches_per_epoch

    def pair_loss(self, model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    # ---- the Task's methods

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return collate_pairs([self.train_pairs[i] for i in self.batcher.next_batch()])

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        device = next(model.parameters()).device
        input_ids, targets = (t.to(device, non_blocking=True) for t in batch)
        return self.pair_loss(model, input_ids, targets)

    def loss_weight(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Pair losses are means over pairs: the loop weights each micro batch by its number of pairs."""
        return batch[0].size(0) // 2

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics averaged over all held-out pairs (the loss as `val_loss`); each rank scores a disjoint
        share and the sums are gathered, so every rank returns the same numbers."""
        mine = self.val_pairs[self.rank::self.world_size]
        was_training = model.training
        model.eval()
        totals: dict[str, float] = defaultdict(float)
        try:
            for start in range(0, len(mine), self.eval_batch_size):
                chunk = mine[start:start + self.eval_batch_size]
                loss, metrics = self.loss(model, collate_pairs(chunk))
                for k, v in {"val_loss": loss, **metrics}.items():
                    totals[k] += float(v) * len(chunk)
        finally:
            model.train(was_training)
        gathered = all_gather_object((dict(totals), len(mine)))
        count = sum(n for _, n in gathered)
        keys = sorted({k for t, _ in gathered for k in t})
        return {k: sum(t.get(k, 0.0) for t, _ in gathered) / count for k in keys} if count else {}

    def state_dict(self) -> dict:
        return {"batcher": self.batcher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state["batcher"])


# ----------------------------------------------------------------------------- the stages' shared setup


@dataclass
class PairStageConfig(TrainConfig):
    """The shared loop's flags plus what a preference-pair stage needs."""

    model: str = arg("runs/finetune", "starting checkpoint (the SFT model): a run folder, a Hugging Face "
                                      "folder or a hub name")
    data: str = arg("data/hh", "folder written by `gpt2 prepare hh` (train.jsonl, val.jsonl)")
    batch_size: int = arg(8, "preference pairs per micro batch per process (each pair is two sequences)", minimum=1)
    grad_accum: int = arg(1, "micro batches per optimizer step", minimum=1)
    epochs: float = arg(1.0, EPOCHS_HELP)
    max_steps: int | None = arg(None, MAX_STEPS_HELP)
    eval_every: int | None = arg(None, "evaluate on the held-out pairs every N steps; default once an epoch")
    max_len: int | None = arg(None, "skip pairs longer than this many tokens (default: the model's context)", minimum=2)
    lr: float = arg(5e-6, "peak learning rate (reached after warmup)")
    warmup_steps: int = arg(10, "steps of linear LR warmup")
    weight_decay: float = arg(0.0, "AdamW weight decay, on 2-D weights only")


def load_train_val(cfg: PairStageConfig, model: GPT) -> tuple[list[Pair], list[Pair]]:
    """The prepared train and held-out pairs that fit in `--max-len` (at most `model`'s context); pairs with
    token ids past `model`'s vocabulary are refused in one line naming the file."""
    block_size = model.config.block_size
    max_len = min(cfg.max_len or block_size, block_size)
    train_file, val_file = split_file(cfg.data, "train"), split_file(cfg.data, "val")
    splits = {"train": load_pairs(train_file), "val": load_pairs(val_file) if val_file.is_file() else []}
    for split, file in (("train", train_file), ("val", val_file)):
        check_ids_fit(model, highest_token_id(splits[split]), f"--model {cfg.model}", str(file))
    fits = {k: [p for p in v if pair_length(p) <= max_len] for k, v in splits.items()}
    skipped = {k: len(splits[k]) - len(fits[k]) for k in splits}
    if any(skipped.values()):
        print(f"skipping pairs longer than {max_len} tokens: {skipped['train']} train, {skipped['val']} held-out",
              flush=True)
    if not fits["train"]:
        raise UserError(f"{train_file}: no preference pairs of at most {max_len} tokens")
    return fits["train"], fits["val"]


def run_pair_stage(cfg: PairStageConfig, command: str, make_model: Callable[[GPT], nn.Module],
                   make_task: Callable[[GPT, list[Pair], list[Pair], DistInfo], PairTask]) -> nn.Module:
    """Load the starting GPT and the pairs, build the stage's model and task, and train on the shared loop as
    `command` (the stage's command name, recorded in the run)."""
    cfg.validate()  # before the model loads: a bad flag is refused at once
    dist = init_distributed(cfg.device, cfg.dist_timeout)
    try:
        start = load_model(cfg.model)
        train_pairs, val_pairs = load_train_val(cfg, start)
        task = make_task(start, train_pairs, val_pairs, dist)
        steps_per_epoch = max(1, task.steps_per_epoch // cfg.grad_accum)
        cfg = replace(cfg, max_steps=run_length(cfg.max_steps, cfg.epochs, steps_per_epoch))
        if cfg.eval_every is None:
            cfg = replace(cfg, eval_every=steps_per_epoch if val_pairs else 0)
        if dist.is_main:
            print(f"{len(train_pairs)} train / {len(val_pairs)} held-out pairs; {cfg.max_steps} steps "
                  f"({steps_per_epoch} per epoch)", flush=True)
        model = make_model(start)
        train(model, task, cfg, cfg.grad_accum, dist=dist, run_config=cfg, command=command)
        return model
    finally:
        destroy_distributed()
