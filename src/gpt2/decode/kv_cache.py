"""The KV cache of a batch of rows decoded together, and the rows themselves.

Design decisions:
- **Rows and shared columns.** A `KVCache` is pre-allocated once per batch, (B, nh, S, hs) per layer for keys
  and for values, zero-filled (a slot that is masked out still enters attention with weight 0, and 0 * NaN from
  uninitialised memory would be NaN). Its columns are time slots shared by all rows: every row writes its
  next token into the same column, so one forward of shape (B, 1) advances the whole batch. `valid[b, s]`
  says whether slot `s` of row `b` holds a real token; positions are passed separately, so a row's slots
  need not equal its positions. Prompts are left-aligned (each row's last real token in the prompt's last
  column), which makes right-padded input exact: a row's output never depends on its batch-mates.
- **Masks only where needed.** A step attends to the used columns only (`cache.length`), and without any
  mask when no used slot is padding (`cache.holes` is False: an unpadded batch), which is the common case
  and spares building and reading a mask. The flag is kept on the host, so a step needs no device sync.
- **Rows come and go.** `Rows.keep` drops finished rows from the cache (a batch gets cheaper as its prompts
  end); `Rows.stack` admits new rows by re-packing several caches into one, right-aligned to a common column
  and without the leading columns no row uses any more, so a long-running server's cache stays at most
  `block_size` + headroom columns wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2.model import GPTConfig


class KVCache:
    """Pre-allocated keys and values for a batch of rows (see the module docstring); a `gpt2.model.KVStore`.

    Between forwards, `length` columns are filled. `extend` claims the next T columns for a forward and
    returns its attention mask; attention then writes its keys/values there through `update`; `commit`
    makes them part of the cache once every layer has written."""

    def __init__(self, config: GPTConfig, batch_size: int, capacity: int, device=None, dtype=None):
        shape = (batch_size, config.n_head, capacity, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]  # (B, nh, S, hs)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]  # (B, nh, S, hs)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # (B, S)
        self.length = 0  # columns filled so far
        self.holes = False  # some filled slot is padding: attention needs a mask
        self._pending = 0  # columns claimed by the forward in progress

    @property
    def batch_size(self) -> int:
        return self.valid.size(0)

    @property
    def capacity(self) -> int:
        return self.valid.size(1)

    def extend(self, T: int, new_valid: torch.Tensor | None = None, any_padding: bool = False,
               ) -> torch.Tensor | None:
        """Claim T columns for the next forward. `new_valid` (B, T) marks which new slots are real (None = all,
        the decoding step); `any_padding` says whether any of them is not (the caller knows, without a sync).
        Returns the (B, 1, T, S_used) boolean mask, or None where plain causal attention is exact (no padding
        anywhere and either a first block or a single new token)."""
        start, end = self.length, self.length + T
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} columns > capacity {self.capacity}")
        self.valid[:, start:end] = True if new_valid is None else new_valid
        self.holes = self.holes or any_padding
        self._pending = T
        if not self.holes and (start == 0 or T == 1):
            return None
        q = torch.arange(start, end, device=self.valid.device)[:, None]  # (T, 1)
        k = torch.arange(end, device=self.valid.device)[None, :]  # (1, S)
        mask = (k <= q)[None] & self.valid[:, None, :end]  # (B, T, S): causal, real slots only
        # a query always sees itself, so no row is fully masked (padded queries would give NaN otherwise)
        mask |= (k == q)[None]
        return mask[:, None]  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the claimed columns' keys and values (B, nh, T, hs) for `layer`; return the used part of the
        cache, each (B, nh, S_used, hs)."""
        start, end = self.length, self.length + self._pending
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    @torch.inference_mode()
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given rows (in that order)."""
        self.k, self.v = [t[rows] for t in self.k], [t[rows] for t in self.v]
        self.valid = self.valid[rows]

    def used_span(self) -> tuple[int, int]:
        """(first, end): the columns some row still uses (leading ones may be unused after rows left)."""
        used = self.valid[:, : self.length].any(dim=0)  # (S,)
        first = int(used.float().argmax()) if bool(used.any()) else self.length
        return first, self.length

    @classmethod
    @torch.inference_mode()
    def stack(cls, caches: list[KVCache], headroom: int) -> KVCache:
        """The rows of all `caches` in one new cache, each right-aligned so that every row's next slot is the same
        column, without leading columns no row uses, with `headroom` free columns."""
        spans = [c.used_span() for c in caches]
        width = max(end - start for start, end in spans)
        first = caches[0].k[0]
        _, nh, _, hs = first.shape
        out = cls.__new__(cls)
        rows = [c.batch_size for c in caches]
        shape = (sum(rows), nh, width + headroom, hs)
        out.k = [first.new_zeros(shape) for _ in caches[0].k]
        out.v = [first.new_zeros(shape) for _ in caches[0].v]
        out.valid = torch.zeros(shape[0], shape[2], dtype=torch.bool, device=first.device)
        out.length, out._pending = width, 0
        out.holes = any(c.holes for c in caches) or len({end - start for start, end in spans}) > 1
        b = 0
        for c, n, (start, end) in zip(caches, rows, spans):
            span = end - start
            for dst, src in zip(out.k + out.v, c.k + c.v):
                dst[b:b + n, :, width - span:width] = src[:n, :, start:end]
            out.valid[b:b + n, width - span:width] = c.valid[:n, start:end]
            b += n
        return out


@dataclass
class Rows:
    """Sequences decoded together: their cache, each row's next position, and the logits (B, V) from
    which each row's next token is chosen."""

    cache: KVCache
    positions: list[int]  # position of each row's next token (its length so far)
    logits: torch.Tensor

    def __len__(self) -> int:
        return len(self.positions)

    def keep(self, keep: list[bool]) -> None:
        """Drop the rows whose `keep` is False."""
        if all(keep):
            return
        idx = [i for i, k in enumerate(keep) if k]
        rows = torch.tensor(idx, dtype=torch.long, device=self.logits.device)
        self.cache.select_rows(rows)
        self.positions = [self.positions[i] for i in idx]
        self.logits = self.logits[rows]

    @staticmethod
    def stack(parts: list[Rows], headroom: int) -> Rows:
        """Admit rows: one `Rows` holding all of `parts`' rows, in order (see `KVCache.stack`)."""
        cache = KVCache.stack([p.cache for p in parts], headroom)
        return Rows(cache, [q for p in parts for q in p.positions], torch.cat([p.logits for p in parts]))
