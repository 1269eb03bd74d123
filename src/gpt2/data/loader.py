"""`ShardLoader`: (x, y) batches for one rank from a split's token shards, shuffled or in order, resumable bit
for bit.

How tokens are dealt out:
- The split's shards, in index order, form one token stream of `num_tokens` tokens. Shards are arbitrary
  cuts of the document stream (the writer fills each to a fixed size, splitting documents), so a sequence
  may straddle two shards; nothing is dropped at shard boundaries (build-nanogpt's loader skips each
  shard's tail, and with several ranks multiplies by the process count twice in its bound check).
- The stream is cut into `num_windows = (num_tokens - 1) // T` windows of T tokens: window i is x =
  stream[iT : (i+1)T] and y = the same span shifted by one token. A batch is B windows, one per row.
- Order (`shuffle=True`, what `gpt2 pretrain` uses unless `--no-shuffle`): each epoch deals the windows in
  a seeded random permutation, `numpy.random.default_rng((seed, epoch)).permutation(num_windows)`, the
  same on every rank. Global step s takes permutation entries [s*W*B, (s+1)*W*B) and rank r rows
  [(s*W + r)*B, (s*W + r + 1)*B) of them, so ranks read disjoint windows, together each window once per
  epoch, and 1 rank x W*B rows sees the same windows per step as W ranks x B rows.
  Why windows and not blocks of B consecutive windows: the unit of shuffling decides what one batch
  mixes. With blocks, a batch is still B windows of one scene (or one file, or one document), which is the
  correlation that made in-order reading train measurably worse than nanoGPT's random windows (measured:
  docs/benchmarks.md, bench/train.py). Per-window shuffling gives every row an independent place in the
  corpus, like nanoGPT's sampling, but without replacement, so an epoch still covers every token once. The
  cost: B reads of T+1 tokens per batch instead of one read of B*T+1, slices of memory maps either way
  (negligible next to the step), and the permutation, 4 bytes per window (40 MB for FineWeb 10BT at T = 1024).
- Order (`shuffle=False`): window i of the epoch in stream order, so rank r at step s reads the B
  consecutive windows starting at (s*W + r)*B: one contiguous read; ranks together read the stream once.
- All ranks take the same number of steps per epoch (DDP needs it): `steps_per_epoch = num_windows //
  (B*W)`. Windows that do not fill one more step (fewer than B*W) are left out of that epoch (in shuffled
  order, different ones each epoch); after the last step the loader wraps to epoch + 1.
- Reads are slices of memory-mapped shards: only the tokens of a batch are ever copied (to int64).

Resume: `state_dict()` is {epoch, offset (tokens of the epoch consumed by all ranks together),
num_tokens, shuffle, seed}; it is the same on every rank, so saving rank 0's is enough. `load_state_dict`
continues from there (the permutation is a pure function of seed and epoch), so a resumed run sees exactly
the batches an uninterrupted one would. The state stores tokens, not steps, so it also loads into a loader
with another world size or micro batch as long as the offset falls on one of its step boundaries; anything
else is a `UserError`, as is a changed dataset, seed or order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2.data.shards import check_token_ids, list_shards, read_shard
from gpt2.errors import UserError


class ShardLoader:
    """Batches of rank `rank` of `world_size` from the `split` ("train" or "val") shards in `data_dir`, in a
    seeded random window order (`shuffle=True`) or in stream order.

    Attributes: `num_tokens` (tokens in the split), `window` (B*T, tokens per batch), `num_windows`
    (sequences of T in the split), `steps_per_epoch` (batches per rank per epoch), `epoch` and `step`
    (position), `shards` (paths, in stream order)."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, *, shuffle: bool = False, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size ({batch_size}) and sequence length ({seq_len}) must be >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.shards = list_shards(self.data_dir, split)
        if not self.shards:
            raise UserError(f"{self.data_dir}: no {split} shards (*_{split}_NNNNNN.bin); run `gpt2 prepare fineweb`")
        self._tokens = [read_shard(p) for p in self.shards]  # memory maps, validated
        lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset where each shard begins
        self.num_tokens = int(self._starts[-1])
        self.window = batch_size * seq_len
        self.num_windows = (self.num_tokens - 1) // seq_len
        self.steps_per_epoch = self.num_windows // (batch_size * world_size)
        if self.steps_per_epoch < 1:
            raise UserError(f"{self.data_dir}: the {split} split has {self.num_tokens} tokens, fewer than one "
                            f"step needs ({batch_size} x {seq_len} x {world_size} ranks + 1)")
        self.reset()

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self._set_position(0, 0)

    def _set_position(self, epoch: int, step: int) -> None:
        self.epoch = epoch
        self.step = step  # steps taken in this epoch (the same on every rank)
        self._order = self.epoch_order(epoch) if self.shuffle else None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The window permutation of `epoch` (shuffled order): a pure function of seed and epoch."""
        dtype = np.int32 if self.num_windows < 2**31 else np.int64
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows).astype(dtype)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), LongTensors of shape (B, T); y[b, t] is the token after x[b, t]."""
        if self.step == self.steps_per_epoch:
            self._set_position(self.epoch + 1, 0)
        first = (self.step * self.world_size + self.rank) * self.batch_size  # this batch's first window slot
        self.step += 1
        B, T = self.batch_size, self.seq_len
        if self._order is None:  # consecutive windows: one read of B*T + 1 tokens
            buf = torch.from_numpy(self._read(first * T, (first + B) * T + 1))  # (B*T + 1,)
            return buf[:-1].view(B, T), buf[1:].view(B, T)
        rows = torch.from_numpy(np.stack([self._read(int(w) * T, int(w) * T + T + 1)
                                          for w in self._order[first:first + B]]))  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]
    def _read(self, lo: int, hi: int) -> np.ndarray:
        """Stream tokens [lo, hi) as int64, copying only that span out of the shards it covers."""
        out = np.empty(hi - lo, dtype=np.int64)
        i = int(np.searchsorted(self._starts, lo, side="right")) - 1  # shard holding token lo
        filled = 0
        while filled < len(out):
            begin = lo + filled - int(self._starts[i])
            take = min(len(out) - filled, len(self._tokens[i]) - begin)
            out[filled:filled + take] = self._tokens[i][begin:begin + take]
            filled += take
            i += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """Position in the data; identical on every rank."""
        step = self.step
        epoch = self.epoch
        if step == self.steps_per_epoch:  # the wrap happens lazily; store it as the next epoch's start
            epoch, step = epoch + 1, 0
        return {"epoch": epoch, "offset": step * self.window * self.world_size, "num_tokens": self.num_tokens,
                "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_tokens") != self.num_tokens:
            raise UserError(f"{self.data_dir}: the {self.split} split has {self.num_tokens} tokens but the "
                            f"checkpoint was taken on {state.get('num_tokens')}; the data changed")
        order = (state.get("shuffle", False), state.get("seed", self.seed) if state.get("shuffle") else None)
        if order != (self.shuffle, self.seed if self.shuffle else None):
            raise UserError(f"cannot resume the {self.split} loader: the checkpoint read its data "
                            f"{'shuffled with seed ' + str(order[1]) if order[0] else 'in order'}, this run "
                            f"{'shuffled with seed ' + str(self.seed) if self.shuffle else 'in order'}")
        per_step = self.window * self.world_size
        offset = int(state["offset"])
        if offset % per_step or offset // per_step > self.steps_per_epoch:
            raise UserError(f"cannot resume the {self.split} loader at token {offset} of the epoch: it is not "
                            f"a multiple of batch x seq_len x world size ({per_step})")
        self._set_position(int(state["epoch"]), offset // per_step)


def checked_batch(loader: ShardLoader, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`loader.next_batch()` -> (x, y), refused in one line (naming the shard) when an id is outside a model's
    vocabulary of `vocab_size` ids (`gpt2.data.shards.check_token_ids`)."""
    x, y = loader.next_batch()
    check_token_ids(x.reshape(-1), vocab_size, loader.shards)
    check_token_ids(y.reshape(-1), vocab_size, loader.shards)
    return x, y
