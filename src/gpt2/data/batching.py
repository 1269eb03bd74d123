"""Batches for masked-target training (fine-tuning, DPO, the reward model, PPO): the layout and its order.

Design decisions:
- One padding helper, `gpt2.padding.pad_right`: token lists -> right-padded ids + 1/0 mask. Generation,
  evaluation, serving and the training layout all pad through it (`gpt2.inference` re-exports it).
- The training layout is the seed's, exactly (`collate`): `seq = question_ids + answer_ids`, right-padded
  with token 0 to the batch's longest `seq`; `targets[t] = seq[t + 1]` where position t + 1 is an answer
  position, else -100. So `F.cross_entropy(ignore_index=-100)` averages over answer tokens (and the final
  `<|endoftext|>`) only: the question and the padding are read but never trained on. The number of
  targets that are not -100 is the batch's weight in the training loop (`gpt2.train.loop`), so every
  answer token of a global batch counts the same however the batch is split.
- Length-grouped batches (`LengthGroupedBatcher`): each epoch, a seeded shuffle is cut into groups of
  `group_batches * batch_size` examples; each group is sorted by length and cut into batches, and the batch
  order is shuffled again. Batches hold similar lengths (little padding) while epochs stay random. The
  batch with the longest sequence goes first, so an out-of-memory batch shows up at step 1, not hours in.
  Under DDP the epoch's batch list is the same on every rank and rank r takes batches r, r+W, r+2W, ...
  (disjoint; the last `len % W` batches are left out that epoch so ranks take equal steps). The position
  (epoch, batch index) is the whole state: `state_dict()` / `load_state_dict()` resume exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from gpt2.errors import UserError
from gpt2.losses import IGNORE_INDEX
from gpt2.padding import pad_right

Example = tuple[list[int], list[int]]  # (question_ids, answer_ids)


def num_targets(targets: torch.Tensor) -> int:
    """Targets that count in the loss (not -100): a masked batch's weight."""
    return int((targets != IGNORE_INDEX).sum())


def collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, targets), LongTensor [B, T], T = the longest question + answer in the batch.

    input_ids[i] = seq + [0] * (T - len(seq)) with seq = question_ids + answer_ids;
    targets[i] = [-100] * (len(question_ids) - 1) + answer_ids + [-100] * (T - len(seq) + 1),
    i.e. targets[i][t] = seq[t + 1] where t + 1 is an answer position, else -100.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    for i, (q, a) in enumerate(examples):
        if not q or not a:
            raise ValueError(f"example {i}: question and answer must both be non-empty")
    input_ids, _ = pad_right([q + a for q, a in examples])  # (B, T)
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (q, a) in enumerate(examples):
        targets[i, len(q) - 1 : len(q) - 1 + len(a)] = torch.tensor(a, dtype=torch.long)  # answer shifted left
    return input_ids, targets


class LengthGroupedBatcher:
    """Endless stream of this rank's batches of example indices, grouped by length (module docstring).

    lengths: the token length of every example. group_batches: how many batches are formed from one
    sorted group (larger = less padding, less randomness). `next_batch()` wraps into the next epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, group_batches: int = 16):
        if batch_size < 1 or group_batches < 1:
            raise UserError("batch size and group size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.group_batches = batch_size, seed, group_batches
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._batches = self.epoch_batches(0)
        if not self._batches:
            raise UserError(f"{len(self.lengths)} examples make fewer batches of {batch_size} than there are "
                            f"ranks ({world_size}): lower the batch size")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for `epoch`, in order (a pure function of seed and epoch)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        group = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), group):
            chunk = sorted(order[start : start + group], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        if batches:  # longest batch first: a batch that does not fit in memory fails at step 1
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches[0], batches[longest] = batches[longest], batches[0]
        usable = len(batches) - len(batches) % self.world_size
        return batches[self.rank : usable : self.world_size]

    @property
    def batches_per_epoch(self) -> int:
        """Batches this rank takes per epoch (the same every epoch and on every rank)."""
        return len(self._batches)

    def next_batch(self) -> list[int]:
        if self.pos >= len(self._batches):
            self.epoch, self.pos = self.epoch + 1, 0
            self._batches = self.epoch_batches(self.epoch)
        batch = self._batches[self.pos]
        self.pos += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "num_examples": len(self.lengths),
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_examples", "batch_size", "world_size"):
            if state[key] != mine[key]:
                raise UserError(f"cannot resume: the checkpoint's batches were made with {key}={state[key]}, "
                                f"this run has {key}={mine[key]}")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._batches = self.epoch_batches(self.epoch)
