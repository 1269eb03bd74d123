"""`ShardLoader`: (x, y) batches for one rank from a split's token shards, resumable bit for bit.

How tokens are dealt out:
- The split's shards, in index order, form one token stream of `num_tokens` tokens. Shards are arbitrary
  cuts of the document stream (the writer fills each to a fixed size, splitting documents), so a batch may
  straddle two shards; nothing is dropped at shard boundaries (build-nanogpt's loader skips each shard's
  tail, and with several ranks multiplies by the process count twice in its bound check).
- The stream is cut into windows of B*T tokens; window w is x = stream[wBT : (w+1)BT] and y = the same
  span shifted by one token (so y's last token is the first token of window w+1). Window w goes to rank
  w % world_size: at step s of an epoch rank r reads window s * world_size + r. Ranks therefore read
  disjoint x spans, and together they read the stream once, in order.
- All ranks take the same number of steps per epoch (DDP needs it): `steps_per_epoch =
  (num_tokens - 1) // (B*T*world_size)`. The tail that does not fill one more window on every rank (fewer
  than B*T*world_size + 1 tokens) is not used; after the last step the loader wraps to epoch + 1 and
  starts again from token 0.
- Reads are slices of memory-mapped shards: only the B*T+1 tokens of a batch are ever copied (to int64).

Resume: `state_dict()` is {epoch, offset (tokens of the epoch consumed by all ranks together),
num_tokens}; it is the same on every rank, so saving rank 0's is enough. `load_state_dict` continues from
there, so a resumed run sees exactly the batches an uninterrupted one would. The state stores tokens, not
steps, so it also loads into a loader with another world size or batch size as long as the offset falls on
one of its step boundaries (same global batch); anything else is a `UserError`, as is a changed dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2.data.shards import list_shards, read_shard
from gpt2.errors import UserError


class ShardLoader:
    """Batches of rank `rank` of `world_size` from the `split` ("train" or "val") shards in `data_dir`.

    Attributes: `num_tokens` (tokens in the split), `window` (B*T, tokens per batch), `steps_per_epoch`
    (batches per rank per epoch), `epoch` and `step` (position), `shards` (paths, in stream order)."""

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size ({batch_size}) and sequence length ({seq_len}) must be >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.data_dir, self.split = Path(data_dir), split
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.shards = list_shards(self.data_dir, split)
        if not self.shards:
            raise UserError(f"{self.data_dir}: no {split} shards (*_{split}_NNNNNN.bin); run `gpt2 prepare fineweb`")
        self._tokens = [read_shard(p) for p in self.shards]  # memory maps, validated
        lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset where each shard begins
        self.num_tokens = int(self._starts[-1])
        self.window = batch_size * seq_len
        self.steps_per_epoch = (self.num_tokens - 1) // (self.window * world_size)
        if self.steps_per_epoch < 1:
            raise UserError(f"{self.data_dir}: the {split} split has {self.num_tokens} tokens, fewer than one "
                            f"step needs ({batch_size} x {seq_len} x {world_size} ranks + 1)")
        self.reset()

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self.epoch = 0
        self.step = 0  # steps taken in this epoch (the same on every rank)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), LongTensors of shape (B, T); y[b, t] is the token after x[b, t]."""
        if self.step == self.steps_per_epoch:
            self.epoch += 1
            self.step = 0
        start = (self.step * self.world_size + self.rank) * self.window
        buf = torch.from_numpy(self._read(start, start + self.window + 1))  # (B*T + 1,)
        self.step += 1
        x = buf[:-1].view(self.batch_size, self.seq_len)  # (B, T)
        y = buf[1:].view(self.batch_size, self.seq_len)  # (B, T)
        return x, y

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
        return {"epoch": epoch, "offset": step * self.window * self.world_size, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_tokens") != self.num_tokens:
            raise UserError(f"{self.data_dir}: the {self.split} split has {self.num_tokens} tokens but the "
                            f"checkpoint was taken on {state.get('num_tokens')}; the data changed")
        per_step = self.window * self.world_size
        offset = int(state["offset"])
        if offset % per_step or offset // per_step > self.steps_per_epoch:
            raise UserError(f"cannot resume the {self.split} loader at token {offset} of the epoch: it is not "
                            f"a multiple of batch x seq_len x world size ({per_step})")
        self.epoch, self.step = int(state["epoch"]), offset // per_step
